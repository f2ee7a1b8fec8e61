"""`expertrag eval` and `expertrag bench pipeline`: every retrieval policy end to end, JSON + Markdown report.

Both load the generator and the index once and build one `ExpertRAG` per policy around them, with the
answer and retrieval caches off (policies must not share answers). A policy whose artifacts are missing
is reported as skipped with the reason; the others run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from expertrag.cli.app import app
from expertrag.cli.bench import bench_app
from expertrag.config import ExpertRAGConfig
from expertrag.errors import ExpertRAGError, InputError


def _settings(config: ExpertRAGConfig):
    from expertrag.eval.config import EvalConfig

    s = getattr(config, "eval", None)  # the `eval:` section, once ExpertRAGConfig has it
    return s if isinstance(s, EvalConfig) else EvalConfig()


def parse_policies(text: str | None, default: list[str]) -> list[str]:
    from expertrag.gate.policies import POLICIES

    names = [p.strip() for p in (text.split(",") if text is not None else default) if p.strip()]
    if names == ["all"]:
        return list(POLICIES)
    if not names:
        raise InputError("--policies needs at least one policy")
    bad = [p for p in names if p not in POLICIES]
    if bad:
        raise InputError(f"unknown policy {', '.join(map(repr, bad))}; choose from {', '.join(POLICIES)} (or 'all')")
    return list(dict.fromkeys(names))


def parse_ks(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return list(default)
    if text.strip().lower() in ("", "none", "off"):
        return []
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise InputError(f"--k-sweep must be comma-separated integers, got {text!r}") from None
    if any(k <= 0 for k in ks):
        raise InputError("--k-sweep needs positive k")
    return ks


def _check_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"no such {what}", path=path)
    if not path.is_file():
        raise InputError(f"not a file ({what})", path=path)
    return path


def _check_index(path: Path) -> Path:
    if not path.is_dir():
        raise InputError("no such index directory (build one with `expertrag index`)", path=path)
    return path


def read_label_files(paths: list[Path]) -> dict[str, Any]:
    """id -> LabelRecord over all files; the first file naming an id wins."""
    from expertrag.gate.labels import read_labels

    out: dict[str, Any] = {}
    for p in paths:
        for r in read_labels(_check_file(p, "label file")):
            out.setdefault(r.id, r)
    return out


def _generator(config: ExpertRAGConfig) -> Any:
    from expertrag.pipeline.build import load_generator

    return load_generator(config)


def make_factory(index_dir: Path, config: ExpertRAGConfig, gate: Path | None, generator: Any = None):
    """policy name -> ExpertRAG sharing one Index and one generator (loaded now), caches off."""
    from expertrag.gate.policies import make_policy
    from expertrag.pipeline.build import gate_dir
    from expertrag.pipeline.rag import ExpertRAG
    from expertrag.retrieval.index import Index

    index = Index(index_dir, config.retrieval)
    generator = generator if generator is not None else _generator(config)
    pcfg = config.pipeline.model_copy(update={"answer_cache_size": 0, "retrieval_cache_size": 0, "cache_path": None})
    artifacts = gate if gate is not None else gate_dir(index_dir)

    def factory(policy: str) -> ExpertRAG:
        return ExpertRAG(index, generator, make_policy(policy, config.gate, artifacts), pcfg, policy)

    return factory


def _provenance(config: ExpertRAGConfig, index: Path, gate: Path | None, labels: list[Path]) -> dict[str, Any]:
    from expertrag.fileio import sha256_file

    return {"index": str(index), "gate": str(gate) if gate else None,
            "labels": {str(p): sha256_file(p) for p in labels}, "expertrag": config.model_dump(mode="json")}


def _print_policies(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for col in ("policy", "n", "acc", "EM", "F1", "retrieval", "mean ms", "p95 ms", "p99 ms", "speed-up"):
        table.add_column(col, justify="left" if col == "policy" else "right")

    def f(v: Any, d: int = 3) -> str:
        return "–" if v is None else f"{v:.{d}f}" if isinstance(v, float) else str(v)

    s = result["summary"]
    for p, o in s["policies"].items():
        table.add_row(p, f(o["n"]), f(o["accuracy"]), f(o["em"]), f(o["f1"]), f(o["retrieval_rate"]),
                      f(o["latency_ms_mean"], 0), f(o["latency_ms_p95"], 0), f(o["latency_ms_p99"], 0),
                      f(o["speedup_vs_always"], 2))
    Console().print(table)
    for p, why in s["skipped"].items():
        print(f"skipped {p}: {why}")
    print(f"speed-up {s['adaptive_policy']} vs always: {f(s['speedup_adaptive_vs_always'], 2)} overall, "
          f"{f(s['speedup_no_retrieval_half'], 2)} on the no-retrieval half")


def _write(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    from expertrag.eval.report import write_report
    from expertrag.eval.results import write_json

    return write_json(result, out / "eval.json"), write_report(result, out)


@app.command("eval")
def eval_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    dataset: list[Path] = typer.Option(..., "--dataset", "-d", help="question file with gold answers (repeatable)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: eval.json, report.md and figures"),
    policies: str | None = typer.Option(None, "--policies", "-p",
                                        help="comma-separated policies, or 'all' (default: eval.policies)"),
    labels: list[Path] | None = typer.Option(None, "--labels", help="label file from `expertrag label` (repeatable)"),
    gate: Path | None = typer.Option(None, "--gate", help="gate artifacts folder (default: INDEX/gate)"),
    limit: int | None = typer.Option(None, "--limit", help="questions per dataset, sampled by --seed"),
    seed: int | None = typer.Option(None, "--seed", help="sampling seed (default: eval.seed)"),
    k_sweep: str | None = typer.Option(None, "--k-sweep", help="context dilution k values, e.g. 1,3,5,10,20; 'none' skips"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on the last line"),
) -> None:
    """Evaluate retrieval policies end to end: accuracy, latency, gate quality, threshold sweep, dilution."""
    from expertrag.data.questions import load_questions
    from expertrag.eval.runner import evaluate

    config = ExpertRAGConfig.load(config_path)
    settings = _settings(config)
    names = parse_policies(policies, settings.policies)
    ks = parse_ks(k_sweep, settings.k_sweep)
    if limit is not None and limit <= 0:
        raise InputError("--limit must be positive")
    _check_index(index)
    files: dict[str, Path] = {}
    for p in dataset:
        _check_file(p, "question file")
        name = p.stem if p.stem not in files else f"{p.stem}-{len(files)}"
        files[name] = p
    questions = {name: load_questions(p) for name, p in files.items()}
    label_paths = list(labels or [])
    label_map = read_label_files(label_paths)
    factory = make_factory(index, config, gate)
    result = evaluate(factory, questions, names, labels=label_map, limit=limit if limit is not None else settings.limit,
                      seed=settings.seed if seed is None else seed, progress=None if not as_json else False,
                      k_sweep=ks, settings=settings, files=files,
                      config=_provenance(config, index, gate, label_paths))
    json_path, report_path = _write(result, out)
    if as_json:
        print(json.dumps(result["summary"] | {"eval_json": str(json_path), "report": str(report_path)}))
    else:
        _print_policies(result)
        print(f"wrote {json_path} and {report_path}")


@bench_app.command("pipeline")
def bench_pipeline(
    data: Path = typer.Option(..., "--data", help="shared data folder (questions/*.jsonl with gold answers)"),
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    labels: list[Path] | None = typer.Option(None, "--labels", help="label files (default: DATA/labels/*.jsonl)"),
    size: int | None = typer.Option(None, "--size", help="questions in the mixed workload (default: eval.workload_size)"),
    policies: str | None = typer.Option("all", "--policies", "-p", help="comma-separated policies, or 'all'"),
    gate: Path | None = typer.Option(None, "--gate", help="gate artifacts folder (default: INDEX/gate)"),
    seed: int | None = typer.Option(None, "--seed", help="workload seed (default: eval.seed)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="also write eval.json and report.md here"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
) -> None:
    """Experiment 2: a 50/50 mix of closed-book-answerable and retrieval-needing questions, every policy."""
    from expertrag.data.questions import load_questions
    from expertrag.eval.runner import evaluate
    from expertrag.eval.workload import mixed_workload

    config = ExpertRAGConfig.load(config_path)
    settings = _settings(config)
    names = parse_policies(policies, settings.policies)
    n = settings.workload_size if size is None else size
    if n < 2:
        raise InputError("--size must be at least 2")
    _check_index(index)
    if not data.is_dir():
        raise InputError("no such data folder", path=data)
    qfiles = sorted((data / "questions").glob("*.jsonl"))
    if not qfiles:
        raise InputError("no question files (questions/*.jsonl)", path=data)
    label_paths = list(labels) if labels else sorted((data / "labels").glob("*.jsonl"))
    if not label_paths:
        raise InputError(f"no label files: pass --labels or put them in {data / 'labels'}")
    label_map = read_label_files(label_paths)
    by_id: dict[str, Any] = {}
    for f in qfiles:
        for q in load_questions(f):
            by_id.setdefault(q.id, q)
    s = seed if seed is not None else settings.seed
    wl = mixed_workload(label_map.values(), by_id, n, s, retrieve_fraction=settings.workload_retrieve_fraction,
                        fallback_both_wrong=settings.workload_fallback_both_wrong,
                        keep_balance=settings.workload_keep_balance)
    if not wl.questions:
        raise InputError("no usable labelled questions for the workload (available: "
                         + ", ".join(f"{k} {v}" for k, v in wl.available.items()) + ")")
    factory = make_factory(index, config, gate)
    prov = _provenance(config, index, gate, label_paths)
    from expertrag.fileio import sha256_file

    prov["question_files"] = {str(f): sha256_file(f) for f in qfiles}
    result = evaluate(factory, {"workload": wl.questions}, names, labels=wl.labels, groups=wl.groups, seed=s,
                      progress=None if not as_json else False, k_sweep=[], settings=settings, config=prov)
    result["workload"] = wl.summary()
    summ = result["summary"]
    bench = {
        "size": len(wl.questions), "workload": wl.summary(),
        "policies": {p: {k: o[k] for k in ("accuracy", "retrieval_rate", "latency_ms_mean", "latency_ms_p50",
                                            "latency_ms_p95", "latency_ms_p99", "em", "f1", "n", "speedup_vs_always")}
                     for p, o in summ["policies"].items()},
        "speedup_adaptive_vs_always": summ["speedup_adaptive_vs_always"],
        "speedup_no_retrieval_half": summ["speedup_no_retrieval_half"],
        "adaptive_policy": summ["adaptive_policy"], "skipped": summ["skipped"],
    }
    if out is not None:
        json_path, report_path = _write(result, out)
        bench |= {"eval_json": str(json_path), "report": str(report_path)}
    if as_json:
        print(json.dumps(bench))
    else:
        print(f"workload: {len(wl.questions)} questions; available " +
              ", ".join(f"{k} {v}" for k, v in wl.available.items()))
        for note in wl.notes:
            print(f"  {note}")
        _print_policies(result)


@app.command("eval-gates")
def eval_gates_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    labels: list[Path] = typer.Option(..., "--labels", "-l",
                                      help="label file from `expertrag label` (repeatable); held-out questions"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: gates.json, gates.md and figures"),
    policies: str | None = typer.Option(None, "--policies", "-p",
                                        help="comma-separated policies, or 'all' (default: eval.policies)"),
    gate: Path | None = typer.Option(None, "--gate", help="gate artifacts folder (default: INDEX/gate)"),
    limit: int | None = typer.Option(None, "--limit", help="first N labelled questions only"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on the last line"),
) -> None:
    """Gate quality without generating answers: each policy's decisions on labelled questions, accuracy read
    off the labels, precision/recall/AUROC and the threshold sweep. Use labels the gate was not trained on."""
    from expertrag.eval.gate_eval import build_policies, evaluate_gates, write_gate_report
    from expertrag.eval.results import write_json
    from expertrag.pipeline.build import gate_dir, load_pipeline
    from expertrag.pipeline.rag import PipelineGateContext

    config = ExpertRAGConfig.load(config_path)
    settings = _settings(config)
    names = parse_policies(policies, settings.policies)
    if limit is not None and limit <= 0:
        raise InputError("--limit must be positive")
    _check_index(index)
    records = list(read_label_files(list(labels)).values())[:limit]
    if not records:
        raise InputError("the label files hold no records")
    rag = load_pipeline(index, config, "never", generator=_generator(config))
    artifacts = gate if gate is not None else gate_dir(index)
    built, skipped = build_policies(names, config.gate, artifacts)
    result = evaluate_gates(lambda r: PipelineGateContext(rag, r.question, dict(r.metadata), None), built, records,
                            settings=settings, progress=None if not as_json else False,
                            config=_provenance(config, index, gate, list(labels)))
    result["skipped"] = skipped | result["skipped"]
    json_path = write_json(result, out / "gates.json")
    report_path = write_gate_report(result, out)
    summary = {"n": result["n"], "baselines": result["baselines"], "skipped": result["skipped"],
               "policies": {p: {k: r["overall"][k] for k in ("accuracy", "retrieval_rate", "stages")}
                            | {k: (r["overall"]["gate_quality"] or {}).get(k) for k in ("precision", "recall", "f1", "auroc")}
                            for p, r in result["results"].items()}}
    if as_json:
        print(json.dumps(summary | {"gates_json": str(json_path), "report": str(report_path)}, default=str))
    else:
        print(report_path.read_text(encoding="utf-8").split("## Figures")[0])
        print(f"wrote {json_path} and {report_path}")


@app.command("merge-results")
def merge_results_cmd(
    files: list[Path] = typer.Argument(..., help="eval.json (from `eval` / `bench pipeline --out`) or gates.json "
                                                 "(from `eval-gates`) files over disjoint questions"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the merged JSON and report"),
    as_json: bool = typer.Option(False, "--json", help="print the merged summary as JSON on the last line"),
) -> None:
    """Pool results over disjoint question sets (cross-fitted folds, each judged by the gate trained on the
    others) and recompute every aggregate from the pooled per-question records."""
    from expertrag.eval.gate_eval import GATES_FORMAT, merge_gate_results, write_gate_report
    from expertrag.eval.merge import merge_results
    from expertrag.eval.results import FORMAT, write_json

    parts = []
    for f in files:
        _check_file(f, "result file")
        try:
            parts.append(json.loads(f.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"not a JSON result file: {e}", path=f) from None
        fmt = parts[-1].get("format") if isinstance(parts[-1], dict) else None
        if fmt not in (FORMAT, GATES_FORMAT):
            raise InputError(f"unknown result format {fmt!r} (want {FORMAT} or {GATES_FORMAT})", path=f)
    formats = {p["format"] for p in parts}
    if len(formats) > 1:
        raise InputError("cannot merge eval.json with gates.json results")
    try:
        if formats == {GATES_FORMAT}:
            merged = merge_gate_results(parts)
            json_path, report_path = write_json(merged, out / "gates.json"), write_gate_report(merged, out)
            summary = {"n": merged["n"], "baselines": merged["baselines"],
                       "policies": {p: r["overall"] | {"sweep_best": (r.get("sweep") or {}).get("best")}
                                    for p, r in merged["results"].items()}}
        else:
            merged = merge_results(parts)
            json_path, report_path = _write(merged, out)
            summary = merged["summary"]
    except ValueError as e:
        raise InputError(str(e)) from None
    if as_json:
        print(json.dumps(summary | {"json": str(json_path), "report": str(report_path)}, default=str))
    else:
        print(f"merged {len(parts)} results -> {json_path} and {report_path}")


@app.command("eval-routing")
def eval_routing_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="question file"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: routing.json and routing.md"),
    labels: list[Path] | None = typer.Option(None, "--labels", help="label files: affinity per label"),
    limit: int | None = typer.Option(None, "--limit", help="questions, sampled by --seed"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config; model.checkpoint must be an MoE "
                                                                   "checkpoint with a retrieval expert"),
    as_json: bool = typer.Option(False, "--json", help="print the segment summary as JSON on the last line"),
) -> None:
    """What the retrieval expert is routed for: firing share and router affinity per prompt segment
    (passages, question, template), closed- and open-book, per MoE layer and per label."""
    from expertrag.data.questions import load_questions
    from expertrag.eval.routing import render_routing_markdown, retrieval_routing
    from expertrag.eval.results import write_json
    from expertrag.eval.sampling import select_questions
    from expertrag.pipeline.build import load_pipeline

    config = ExpertRAGConfig.load(config_path)
    if not config.model.checkpoint:
        raise InputError("eval-routing needs model.checkpoint (an MoE checkpoint from `expertrag train lm`) in --config")
    if limit is not None and limit <= 0:
        raise InputError("--limit must be positive")
    _check_index(index)
    questions = select_questions(load_questions(_check_file(dataset, "question file")), limit, seed, dataset.stem)
    label_map = read_label_files(list(labels or []))
    rag = load_pipeline(index, config, "always", generator=_generator(config))
    try:
        result = retrieval_routing(rag, questions, label_map, progress=None if not as_json else False)
    except ValueError as e:
        raise InputError(str(e)) from None
    result["config"] = _provenance(config, index, None, list(labels or []))
    json_path = write_json(result, out / "routing.json")
    md = out / "routing.md"
    md.write_text(render_routing_markdown(result), encoding="utf-8")
    if as_json:
        print(json.dumps({k: result[k] for k in ("n", "by_label")}
                         | {m: {s: {k: v[k] for k in ("fired", "affinity")} for s, v in result[m].items()}
                            for m in ("closed_book", "open_book")} | {"json": str(json_path), "report": str(md)}))
    else:
        print(md.read_text(encoding="utf-8"))
        print(f"wrote {json_path} and {md}")
