"""`expertrag bench ...`: benchmarks that compare against a reference in one run and report ratios.

Each benchmark lives in `expertrag.bench.<name>` as `run(...) -> dict`; with --json the dict is printed
as the last line.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from expertrag.cli.app import app

bench_app = typer.Typer(help="Benchmarks (ratios against reference implementations).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(show_header=True, header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in result.items():
            if isinstance(value, float):
                value = f"{value:.4g}"
            table.add_row(key, str(value))
        Console().print(table)


@bench_app.command("retrieval")
def bench_retrieval(
    data: Path | None = typer.Option(None, help="shared data folder (corpora/, questions/); default: the packaged wiki corpus"),
    limit: int = typer.Option(3000, help="passages to index for the build measurements"),
    queries: int = typer.Option(200, help="search queries timed per mode"),
    backend: str = typer.Option("torch", help="embed backend of the index: torch, onnx, onnx-int8 or auto"),
    threads: int | None = typer.Option(None, help="torch/ONNX Runtime intra-op threads (default: torch's)"),
    index: Path | None = typer.Option(None, "--index", help="time searches on this built index instead of building one"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
) -> None:
    """Search latency of our retrievers vs calling bm25s/faiss directly; build throughput; peak RSS."""
    from expertrag.bench.retrieval import run
    from expertrag.retrieval.embedder import resolve_backend

    resolve_backend(backend)  # a bad name fails here, in one line, before any build
    _emit(run(data=data, limit=limit, num_queries=queries, progress=not as_json, backend=backend,
              threads=threads, index_dir=index), as_json)


@bench_app.command("build-memory")
def bench_build_memory(
    data: Path = typer.Option(..., "--data", help="shared data folder (corpora/): documents are taken from it in a fixed order"),
    sizes: str = typer.Option("2000,5000,15000", "--sizes", help="comma-separated document counts, one fresh build each"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config for every build (default: embed_backend auto)"),
    threads: int = typer.Option(1, help="torch/OMP threads of each build"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
) -> None:
    """Peak RSS of `expertrag index` at each size, each build in its own process; ratio largest/smallest."""
    from expertrag.bench.build_memory import parse_sizes, run

    # the per-size lines go to stderr, so they stay on with --json (stdout)
    result = run(data, parse_sizes(sizes), config=config_path, threads=threads, progress=True)
    if as_json:
        print(json.dumps(result))
        return
    flat = {k: v for k, v in result.items() if k != "sizes"}
    for row in result["sizes"]:
        for key in ("passages", "wall_s", "peak_rss_mb", "embed_backend"):
            flat[f"{row['documents']}_{key}"] = row[key]
    _emit(flat, False)


@bench_app.command("scale")
def bench_scale(
    data: Path = typer.Option(..., "--data", help="shared data folder: corpora/ (wiki_vital, retrievalqa_passages) "
                                                  "and questions/nq_open_dev.jsonl"),
    sizes: str = typer.Option("100000,300000,1000000", "--sizes", help="comma-separated passage counts, one "
                                                                        "fresh build each"),
    work: Path = typer.Option(Path("/tmp/expertrag-scale"), "--work", help="folder for the derived corpora and "
                                                                           "indexes (GBs at 1M passages)"),
    real_period: int = typer.Option(500, "--real-period", help="about 1 passage in N gets the real embedder, the "
                                                                "rest the hashed random-projection stand-in"),
    queries: int = typer.Option(300, "--queries", help="questions timed per search mode"),
    threads: int = typer.Option(1, help="torch/OMP threads of each child process"),
    timeout_s: float = typer.Option(3600, "--timeout-s", help="limit per build (and per search run), seconds"),
    keep: bool = typer.Option(False, "--keep", help="keep each index after its search timing"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
) -> None:
    """Build time, disk size, peak RSS and search latency (BM25, IVF-PQ, hybrid) at 100k-1M derived passages."""
    from expertrag.bench.scale import parse_sizes, run

    result = run(data, parse_sizes(sizes), work=work, threads=threads, real_period=real_period, queries=queries,
                 timeout_s=timeout_s, keep=keep, progress=True)
    if as_json:
        print(json.dumps(result))
        return
    flat: dict = {"threads": result["threads"], "real_period": result["real_period"]}
    for row in result["sizes"]:
        n = row["passages_requested"]
        if "error" in row:
            flat[f"{n}_error"] = row["error"]
            continue
        flat.update({f"{n}_build_s": row["build_wall_s"], f"{n}_peak_rss_mb": row["build_peak_rss_mb"],
                     f"{n}_disk_mb": row["disk_mb"]["total"]})
        for mode in ("bm25", "dense", "hybrid"):
            flat[f"{n}_{mode}_p50_ms"] = row["search"][mode]["p50_ms"]
            flat[f"{n}_{mode}_p99_ms"] = row["search"][mode]["p99_ms"]
    _emit(flat, False)


@bench_app.command("bm25")
def bench_bm25(
    data: Path = typer.Option(..., "--data", help="shared data folder: corpora/ (wiki_vital, retrievalqa_passages) "
                                                  "and questions/nq_open_dev.jsonl"),
    sizes: str = typer.Option("100000,300000,1000000", "--sizes", help="comma-separated passage counts"),
    work: Path = typer.Option(Path("/tmp/expertrag-bm25"), "--work", help="folder for the derived corpora and "
                                                                          "the indexes (removed after each size)"),
    queries: int = typer.Option(200, "--queries", help="questions whose hits are compared between the builds"),
    timeout_s: float = typer.Option(3600, "--timeout-s", help="limit per build, seconds"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
) -> None:
    """Peak RSS and time of the streamed BM25 build against bm25s's in-memory one, and their hits compared."""
    from expertrag.bench.bm25_memory import run
    from expertrag.bench.scale import parse_sizes

    result = run(data, parse_sizes(sizes), work=work, queries=queries, timeout_s=timeout_s, progress=True)
    if as_json:
        print(json.dumps(result))
        return
    flat: dict = {"threads": result["threads"]}
    for row in result["sizes"]:
        n = row["passages"]
        for mode in ("read", "memory", "stream"):
            flat[f"{n}_{mode}_peak_rss_mb"] = row[mode]["peak_rss_mb"]
        flat[f"{n}_stream_over_memory_above_read"] = row["stream_over_memory"]["above_read"]
        flat[f"{n}_stream_over_memory_time"] = row["stream_over_memory"]["time"]
        flat[f"{n}_same_top10"] = f"{row['agreement']['same_top_k']}/{row['agreement']['questions']}"
    _emit(flat, False)


@bench_app.command("embed")
def bench_embed(
    data: Path | None = typer.Option(None, help="shared data folder (corpora/, questions/); default: the packaged wiki corpus, no recall"),
    limit: int = typer.Option(2000, help="passages embedded by every backend"),
    rounds: int = typer.Option(1, help="passes over the passages"),
    threads: int = typer.Option(1, help="intra-op threads of torch and ONNX Runtime alike"),
    batch_size: int = typer.Option(64, "--batch-size", help="passages per forward"),
    recall: bool = typer.Option(True, "--recall/--no-recall", help="with --data: answer recall of each backend's index"),
    rss: bool = typer.Option(True, "--rss/--no-rss", help="peak RSS of each backend in a fresh process"),
    backends: str | None = typer.Option(None, "--backends", help="comma-separated backends (torch is always "
                                                                 "measured: the reference); default: every one installed"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
) -> None:
    """Passages/s, peak RSS and cosine to torch of each embedding backend (torch, onnx, onnx-int8, openvino),
    interleaved on the same passages; with --data, answer-recall@1/5/20 of each backend's index."""
    from expertrag.bench.embed import run

    chosen = [b.strip() for b in backends.split(",") if b.strip()] if backends is not None else None
    result = run(data=data, limit=limit, rounds=rounds, threads=threads, batch_size=batch_size,
                 with_recall=recall, with_rss=rss, progress=not as_json, backends=chosen)
    if as_json:
        print(json.dumps(result))
        return
    flat = {k: v for k, v in result.items() if not isinstance(v, dict)}
    for b, row in result["backends"].items():
        for key, value in row.items():
            if key == "recall":
                for mode, r in value.items():
                    for m in ("recall@1", "recall@5", "recall@20"):
                        flat[f"{b}_{mode}_{m}"] = r[m]
            else:
                flat[f"{b}_{key}"] = value
    _emit(flat, False)


@bench_app.command("moe")
def bench_moe(
    tokens: int = typer.Option(2048, help="tokens per forward+backward"),
    repeats: int = typer.Option(10, help="timed repetitions"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
) -> None:
    """Forward+backward throughput of our MoE layer vs transformers' Mixtral sparse MoE block."""
    from expertrag.bench.moe import run

    _emit(run(tokens=tokens, repeats=repeats), as_json)


@bench_app.command("generate")
def bench_generate(
    max_new_tokens: int = typer.Option(32, help="tokens generated per prompt"),
    prompts: int = typer.Option(4, help="number of prompts"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
    backends: str | None = typer.Option(None, "--backends",
                                        help="compare generator backends instead, e.g. native,transformers,llamacpp,"
                                             "llamacpp:q8_0+native: "
                                             "closed-book and 5-passage prompts, 24 tokens, per phase"),
    threads: str = typer.Option("1,2", "--threads", help="with --backends: torch thread counts to measure"),
    rounds: int = typer.Option(3, "--rounds", min=1, help="with --backends: timed rounds"),
    config_path: Path | None = typer.Option(None, "--config", help="with --backends: YAML config (model section)"),
) -> None:
    """Generation tokens/s of our model vs transformers' generate on SmolLM2, greedy; or, with --backends,
    the generator backends per phase (prefill, decode, end to end, RSS)."""
    if backends is None:
        from expertrag.bench.generate import run

        _emit(run(max_new_tokens=max_new_tokens, num_prompts=prompts), as_json)
        return
    from expertrag.bench.backends import backend_update
    from expertrag.bench.backends import run as run_backends
    from expertrag.config import ExpertRAGConfig
    from expertrag.errors import InputError
    from expertrag.model.backend import BACKENDS
    from expertrag.model.config import ModelConfig

    names = [b.strip() for b in backends.split(",") if b.strip()]
    for name in names:  # each name validated as the config fields it stands for
        try:
            ModelConfig.model_validate(backend_update(name))
        except ValueError:
            raise InputError(f"--backends: {name!r} is not a backend; give a comma-separated subset of "
                             f"{', '.join(BACKENDS)}, llamacpp may carry a file type and a long-prompt engine, "
                             "e.g. llamacpp:q8_0 or llamacpp:q8_0+native") from None
    if not names:
        raise InputError("--backends: give at least one backend")
    try:
        counts = [int(t) for t in threads.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--threads {threads!r}: give comma-separated integers, e.g. 1,2") from None
    if not counts or min(counts) < 1:
        raise InputError("--threads: give at least one count, each >= 1")
    result = run_backends(names, counts, rounds, ExpertRAGConfig.load(config_path))
    if as_json:
        print(json.dumps(result))
        return
    flat = {f"{n}.{k}": v for n, s in result["backends"].items() for k, v in s.items()}
    flat.update({k: v for k, v in result.items() if not isinstance(v, dict | list)})
    flat.update({f"greedy_identical_to_native.{n}": v for n, v in result.get("greedy_identical_to_native", {}).items()})
    _emit(flat, False)


@bench_app.command("upcycled")
def bench_upcycled(
    max_new_tokens: int = typer.Option(32, help="tokens generated per prompt"),
    prompts: int = typer.Option(4, help="number of prompts"),
    rounds: int = typer.Option(2, help="timed rounds"),
    checkpoint: Path | None = typer.Option(None, help="MoE checkpoint folder (default: freshly upcycled)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
) -> None:
    """Memory and generation tokens/s of the upcycled MoE configuration vs the dense model."""
    from expertrag.bench.upcycled import run

    _emit(run(max_new_tokens=max_new_tokens, num_prompts=prompts, rounds=rounds, checkpoint=checkpoint), as_json)


@bench_app.command("serve")
def bench_serve(
    index: Path = typer.Option(..., "--index", "-i", help="index directory to serve"),
    questions: Path | None = typer.Option(None, "--questions", help="question file (default: the shipped demo questions)"),
    requests: int = typer.Option(32, "--requests", min=1, help="requests per concurrency level"),
    concurrency: str = typer.Option("1,4,16", "--concurrency", help="comma-separated concurrency levels"),
    policy: str = typer.Option("always", "--policy", help="retrieval policy of every answer"),
    max_tokens: int = typer.Option(16, "--max-tokens", min=1, help="tokens generated per answer"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch intra-op threads (both sides)"),
    ray_replicas: str = typer.Option("", "--ray-replicas", help="also `serve --ray` with these pipeline replica "
                                     "counts, e.g. 1,2 (the same load; needs Ray Serve)"),
    rounds: int = typer.Option(1, "--rounds", min=1, help="split each level's requests into this many blocks, "
                               "the servers taking turns in rotating order (against load drift)"),
    batch_wait_ms: float | None = typer.Option(None, "--batch-wait-ms", min=0, help="serve.batch_wait_ms of every "
                                               "server (default: the service's)"),
    ray_max_ongoing: int | None = typer.Option(None, "--ray-max-ongoing", min=1, help="serve.ray."
                                               "max_ongoing_requests of each pipeline replica (default: the "
                                               "service's)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
) -> None:
    """Load test of `expertrag serve` on loopback vs the in-process pipeline: answers/s, latency
    percentiles, errors, HTTP overhead at concurrency 1 and the gain from batching; with --ray-replicas, the
    same load on `serve --ray` (Ray's overhead at 1 replica, the 2-replica ratio, peak RSS per replica)."""
    from expertrag.bench.serve import run
    from expertrag.errors import InputError

    try:
        levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
    except ValueError:
        raise InputError(f"--concurrency {concurrency!r}: give comma-separated integers, e.g. 1,4,16") from None
    if not levels or min(levels) < 1:
        raise InputError("--concurrency: give at least one level, each >= 1")
    try:
        replicas = tuple(int(c) for c in ray_replicas.split(",") if c.strip())
    except ValueError:
        raise InputError(f"--ray-replicas {ray_replicas!r}: give comma-separated integers, e.g. 1,2") from None
    if replicas and min(replicas) < 1:
        raise InputError("--ray-replicas: each count must be >= 1")
    if replicas:
        from expertrag.serve.ray_serve import require_serve

        require_serve()  # one line naming the extra, before minutes of in-process load
    result = run(index, questions=questions, requests=requests, concurrency=levels, policy=policy,
                 max_tokens=max_tokens, threads=threads, progress=not as_json, ray_replicas=replicas,
                 rounds=rounds, batch_wait_ms=batch_wait_ms, ray_max_ongoing=ray_max_ongoing)
    if as_json:
        print(json.dumps(result))
    else:
        flat = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
        for lv in result["levels"]:
            flat[f"c{lv['concurrency']}_answers_per_s"] = lv["answers_per_s"]
            flat[f"c{lv['concurrency']}_p50_ms"] = lv["p50_ms"]
        flat["in_process_answers_per_s"] = result["in_process"]["answers_per_s"]
        for r in result.get("ray", []):
            for lv in r["levels"]:
                flat[f"ray{r['replicas']}_c{lv['concurrency']}_answers_per_s"] = lv["answers_per_s"]
                flat[f"ray{r['replicas']}_c{lv['concurrency']}_p50_ms"] = lv["p50_ms"]
        _emit(flat, False)


@bench_app.command("ray")
def bench_ray(
    data: Path | None = typer.Option(None, help="shared data folder (its corpora/wiki_vital.jsonl); default: the packaged wiki corpus"),
    passages: int = typer.Option(1000, "--passages", help="documents of the corpus slice (vital summaries: ~1 passage each)"),
    threads: int = typer.Option(1, help="intra-op threads per worker and for the single-process build"),
    questions: int = typer.Option(16, "--questions", help="packaged demo questions (0-16) labelled single-process "
                                                          "and on 1 and 2 model actors; 0 skips labelling"),
    batch_size: int = typer.Option(4, "--batch-size", help="labelling batch size (the same in every run)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
) -> None:
    """Index build throughput: single process vs Ray Data with 1 and 2 workers, each build in a fresh
    process and output folder; Ray's overhead at 1 worker, the 2-worker speed-up, the driver's peak RSS.
    Then labelling throughput (questions/min) single-process vs `label --ray` with 1 and 2 model actors."""
    from expertrag.bench.ray_index import run

    _emit(run(data=data, passages=passages, threads=threads, progress=not as_json, questions=questions,
              batch_size=batch_size), as_json)
