"""`expertrag bench ray`: index build throughput, single process against Ray Data with 1 and 2 workers.

The same corpus slice is built three times (or more), each in a fresh process and a fresh output folder, so
no build profits from another's loaded model or page cache of vectors, and each process's peak RSS is its
own: that is the driver's peak; the Ray embedding workers are separate processes, each reporting its own
peak just before it is stopped (the Ray Data chunking actors, a tokenizer each, are not measured). A Ray build
starts its local cluster in that process; the cluster start is timed apart from the build, and the build
time includes starting the actors (each loads its tokenizer and embedder), since that is what Ray costs.
Every worker and the single-process build use `threads` intra-op threads.

Labelling throughput (`questions` > 0): the packaged demo questions (16 at most) are labelled on the
single-process build's index by `label_questions` in a fresh process and by `label_on_ray` with 1 and 2 model
actors, each in a fresh process, same batches. Single-process figures are given with and without its model
load; the Ray ones include the actors' model loads (each actor loads its own; that is what Ray costs, and on
16 questions it is a large share), the cluster start is timed apart. All three label files must be the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from expertrag.errors import InputError
from expertrag.peak_rss import peak_rss_mb


def _write_slice(data: Path | None, passages: int, path: Path) -> int:
    """The first `passages` documents of wiki_vital (or the packaged wiki corpus) as JSONL; returns how
    many were written. Vital-article summaries are short, so nearly every document is one passage."""
    import dataclasses

    from expertrag.data.readers import iter_documents
    from expertrag.data.wiki_offline import iter_wiki_offline_documents

    if data is None:
        docs = iter_wiki_offline_documents(limit=passages)
    else:
        corpus = data / "corpora" / "wiki_vital.jsonl"
        if not corpus.exists():
            raise InputError("no corpora/wiki_vital.jsonl under --data", path=data)
        docs = iter_documents([corpus])
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            if n >= passages:
                break
            d = dataclasses.asdict(doc)
            f.write(json.dumps({k: d[k] for k in ("id", "title", "contents", "metadata")}, ensure_ascii=False)
                    + "\n")
            n += 1
    return n


@contextlib.contextmanager
def _timed(result: dict, key: str) -> Iterator[None]:
    """Seconds the block took, into result[key] (not set when the block raises: no figure for a failure)."""
    t = time.perf_counter()
    yield
    result[key] = time.perf_counter() - t


@contextlib.contextmanager
def _ray_cluster(result: dict, workers: int, threads: int) -> Iterator[None]:
    """A local Ray cluster of workers x threads CPUs for the block; its start is timed apart from the work
    (result["cluster_start_s"]), since a long-lived cluster would pay it once, not per build."""
    from expertrag.retrieval.ray_build import ray_session

    with contextlib.ExitStack() as stack:
        with _timed(result, "cluster_start_s"):
            stack.enter_context(ray_session(None, num_cpus=workers * threads))
        yield


def _one(mode: str, corpus: Path, out: Path, workers: int, threads: int) -> dict:
    """One build in this (fresh) process; prints nothing but its result."""
    import torch

    from expertrag.data.readers import iter_documents

    torch.set_num_threads(threads)
    result: dict = {"mode": mode, "workers": workers if mode == "ray" else 0}
    if mode == "single":
        from expertrag.retrieval.builder import build_index

        with _timed(result, "build_s"):
            report = build_index(out, iter_documents([corpus]), progress=False)
        result["cluster_start_s"] = 0.0
    else:
        from expertrag.retrieval.ray_build import build_index_on_ray

        with _ray_cluster(result, workers, threads), _timed(result, "build_s"):
            report = build_index_on_ray(out, iter_documents([corpus]), progress=False, num_workers=workers,
                                        threads_per_worker=threads)
    result["passages"] = report.passages
    result["timings"] = report.timings
    result["driver_peak_rss_mb"] = _peak_rss_mb()
    result["worker_peak_rss_mb"] = report.worker_peak_rss_mb  # each embedding actor's; [] in process
    return result


def _label_one(mode: str, index: Path, questions: Path, out: Path, workers: int, threads: int,
               batch_size: int) -> dict:
    """One labelling run in this (fresh) process; prints nothing but its result."""
    import torch

    from expertrag.data.questions import load_questions
    from expertrag.pipeline.build import PipelineSections

    torch.set_num_threads(threads)
    qs = load_questions(questions)
    settings = PipelineSections()  # the package defaults (greedy, pipeline.max_new_tokens)
    result: dict = {"mode": mode, "workers": workers if mode == "label-ray" else 0, "questions": len(qs)}
    if mode == "label-single":
        from expertrag.pipeline.build import load_pipeline
        from expertrag.pipeline.labeling import label_questions

        with _timed(result, "load_s"):
            rag = load_pipeline(index, settings, "always")
        with _timed(result, "label_s"):
            label_questions(rag, qs, out, batch_size=batch_size, progress=False)
        result["cluster_start_s"] = 0.0
    else:
        from expertrag.pipeline.ray_work import label_on_ray

        # label_s includes the actors' model loads: each actor loads its own, which is what Ray costs
        with _ray_cluster(result, workers, threads), _timed(result, "label_s"):
            label_on_ray(index, settings, qs, out, batch_size=batch_size, num_workers=workers,
                         threads_per_worker=threads, progress=False)
        result["load_s"] = None
    result["labels"] = out.read_text(encoding="utf-8")
    return result


def _fresh(args: list[str], env: dict, what: str) -> dict:
    """One mode of this module (`__main__` below) in a fresh process: its result is stdout's last line."""
    proc = subprocess.run([sys.executable, "-m", "expertrag.bench.ray_index", *args], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label_rows(index: Path, n: int, workers: tuple[int, ...], threads: int, batch_size: int, tmp: Path,
                env: dict, progress: bool) -> dict:
    from importlib.resources import files

    source = Path(str(files("expertrag.assets").joinpath("demo_questions.jsonl")))
    questions = tmp / "questions.jsonl"
    questions.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:n]),
                         encoding="utf-8")
    rows = []
    for k, (mode, w) in enumerate([("label-single", 0)] + [("label-ray", w) for w in workers]):
        row = _fresh([mode, str(questions), str(tmp / f"labels-{k}.jsonl"), str(w), str(threads), "--index",
                      str(index), "--batch-size", str(batch_size)], env, f"{mode} labelling")
        rows.append(row)
        if progress:
            print(f"{mode} workers={w}: {row['questions']} questions in {row['label_s']:.1f} s "
                  f"(+{row['cluster_start_s']:.1f} s cluster start)", file=sys.stderr)
    single = rows[0]
    q = single["questions"]
    out: dict = {"label_questions": q, "label_batch_size": batch_size,
                 "label_single_load_s": single["load_s"], "label_single_s": single["label_s"],
                 "label_single_q_per_min": 60 * q / single["label_s"],
                 "label_single_with_load_q_per_min": 60 * q / (single["label_s"] + single["load_s"])}
    for row in rows[1:]:
        w = row["workers"]
        if row["labels"] != single["labels"]:
            raise RuntimeError(f"labelling on Ray with {w} workers wrote a different label file")
        out[f"label_ray{w}_s"] = row["label_s"]
        out[f"label_ray{w}_cluster_start_s"] = row["cluster_start_s"]
        out[f"label_ray{w}_q_per_min"] = 60 * q / row["label_s"]
    out["label_files_identical"] = True
    return out


def _peak_rss_mb() -> float:
    return peak_rss_mb() or 0.0


def run(data: Path | None = None, passages: int = 1000, workers: tuple[int, ...] = (1, 2), threads: int = 1,
        progress: bool = True, questions: int = 0, batch_size: int = 4) -> dict:
    if passages < 1:
        raise InputError(f"--passages must be at least 1, got {passages}")
    if not 0 <= questions <= 16:
        raise InputError(f"--questions must be between 0 and 16 (the packaged demo questions), got {questions}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    from expertrag.retrieval.ray_build import require_ray

    require_ray()
    rows = []
    with tempfile.TemporaryDirectory(prefix="expertrag-bench-ray-") as tmp:
        corpus = Path(tmp) / "slice.jsonl"
        n_docs = _write_slice(data, passages, corpus)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for k, (mode, w) in enumerate([("single", 0)] + [("ray", w) for w in workers]):
            out = Path(tmp) / f"index-{k}"
            row = _fresh([mode, str(corpus), str(out), str(w), str(threads)], env, f"{mode} build")
            row["passages_per_s"] = row["passages"] / row["build_s"]
            rows.append(row)
            if progress:
                print(f"{mode} workers={w}: {row['passages']} passages in {row['build_s']:.1f} s "
                      f"(+{row['cluster_start_s']:.1f} s cluster start), driver peak RSS "
                      f"{row['driver_peak_rss_mb']:.0f} MB", file=sys.stderr)
        labelling = (_label_rows(Path(tmp) / "index-0", questions, workers, threads, batch_size, Path(tmp), env,
                                 progress) if questions else {})
    single = rows[0]
    result: dict = {"documents": n_docs, "passages": single["passages"], "threads_per_worker": threads,
                    "load_average_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
                    "single_s": single["build_s"], "single_passages_per_s": single["passages_per_s"],
                    "single_driver_peak_rss_mb": single["driver_peak_rss_mb"]}
    for row in rows[1:]:
        w = row["workers"]
        if row["passages"] != single["passages"]:
            raise RuntimeError(f"Ray build with {w} workers indexed {row['passages']} passages, "
                               f"single-process {single['passages']}")
        result[f"ray{w}_s"] = row["build_s"]
        result[f"ray{w}_cluster_start_s"] = row["cluster_start_s"]
        result[f"ray{w}_embed_s"] = row["timings"]["embed_s"]
        result[f"ray{w}_passages_per_s"] = row["passages_per_s"]
        result[f"ray{w}_time_vs_single"] = row["build_s"] / single["build_s"]
        result[f"ray{w}_with_start_vs_single"] = (row["build_s"] + row["cluster_start_s"]) / single["build_s"]
        result[f"ray{w}_driver_peak_rss_mb"] = row["driver_peak_rss_mb"]
        result[f"ray{w}_worker_peak_rss_mb"] = row["worker_peak_rss_mb"]
    if 1 in workers and 2 in workers:
        result["ray2_speedup_vs_ray1"] = result["ray1_s"] / result["ray2_s"]
    result["single_embed_s"] = single["timings"]["embed_s"]
    result.update(labelling)
    return result


if __name__ == "__main__":  # one build, in the fresh process `run` starts
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["single", "ray", "label-single", "label-ray"])
    p.add_argument("corpus", type=Path)  # the questions for the label modes
    p.add_argument("out", type=Path)
    p.add_argument("workers", type=int)
    p.add_argument("threads", type=int)
    p.add_argument("--index", type=Path)
    p.add_argument("--batch-size", type=int, default=4)
    a = p.parse_args()
    if a.mode.startswith("label"):
        print(json.dumps(_label_one(a.mode, a.index, a.corpus, a.out, a.workers, a.threads, a.batch_size)))
    else:
        print(json.dumps(_one(a.mode, a.corpus, a.out, a.workers, a.threads)))
