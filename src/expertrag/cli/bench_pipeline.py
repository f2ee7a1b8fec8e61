"""`expertrag bench pipeline`: experiment 2, every policy on a 50/50 mixed workload of labelled questions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from expertrag.cli import eval_common as ec
from expertrag.cli.bench import bench_app
from expertrag.config import ExpertRAGConfig
from expertrag.errors import InputError


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
    settings = config.eval
    names = ec.parse_policies(policies, settings.policies)
    n = settings.workload_size if size is None else size
    if n < 2:
        raise InputError("--size must be at least 2")
    ec.check_index(index)
    if not data.is_dir():
        raise InputError("no such data folder", path=data)
    qfiles = sorted((data / "questions").glob("*.jsonl"))
    if not qfiles:
        raise InputError("no question files (questions/*.jsonl)", path=data)
    label_paths = list(labels) if labels else sorted((data / "labels").glob("*.jsonl"))
    if not label_paths:
        raise InputError(f"no label files: pass --labels or put them in {data / 'labels'}")
    label_map = ec.read_label_files(label_paths)
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
    factory = ec.make_factory(index, config, gate)
    prov = ec.provenance(config, index, gate, label_paths)
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
        json_path, report_path = ec.write_eval(result, out)
        bench |= {"eval_json": str(json_path), "report": str(report_path)}
    if as_json:
        print(json.dumps(bench))
    else:
        print(f"workload: {len(wl.questions)} questions; available " +
              ", ".join(f"{k} {v}" for k, v in wl.available.items()))
        for note in wl.notes:
            print(f"  {note}")
        ec.print_policies(result)
