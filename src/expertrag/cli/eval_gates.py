"""`expertrag eval-gates`: each policy's decisions on labelled questions, no answers generated."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from expertrag.cli import eval_common as ec
from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig
from expertrag.errors import InputError


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
    bootstrap: int | None = typer.Option(None, "--bootstrap", help="bootstrap resamples for the 95%% intervals "
                                                                   "(default: eval.bootstrap; 0 = none)"),
    time_answers: int = typer.Option(0, "--time-answers", help="answer the first N questions closed- and "
                                     "open-book (never / always) to measure answer time, so the gate's cost is "
                                     "reported as a share of it (0 = gate ms only)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on the last line"),
) -> None:
    """Gate quality without generating answers: each policy's decisions on labelled questions, accuracy read
    off the labels, precision/recall/AUROC and the threshold sweep. Use labels the gate was not trained on."""
    from expertrag.eval.gate_eval import build_policies, evaluate_gates, write_gate_report
    from expertrag.eval.results import write_json
    from expertrag.pipeline.build import gate_dir, load_pipeline
    from expertrag.pipeline.rag import PipelineGateContext

    config = ExpertRAGConfig.load(config_path)
    if bootstrap is not None:
        if bootstrap < 0:
            raise InputError("--bootstrap must be >= 0")
        config.eval = config.eval.model_copy(update={"bootstrap": bootstrap})
    if time_answers < 0:
        raise InputError("--time-answers must be >= 0")
    settings = config.eval
    names = ec.parse_policies(policies, settings.policies)
    if limit is not None and limit <= 0:
        raise InputError("--limit must be positive")
    ec.check_index(index)
    records = list(ec.read_label_files(list(labels)).values())[:limit]
    if not records:
        raise InputError("the label files hold no records")
    rag = load_pipeline(index, config, "never", generator=ec.load_generator(config))
    artifacts = gate if gate is not None else gate_dir(index)
    built, skipped = build_policies(names, config.gate, artifacts)
    answer_ms = measure_answer_ms(rag, records[:time_answers]) if time_answers else None
    result = evaluate_gates(BatchedContexts(rag, records, PipelineGateContext.many), built, records,
                            settings=settings, progress=None if not as_json else False,
                            config=ec.provenance(config, index, gate, list(labels)), answer_ms=answer_ms)
    result["skipped"] = skipped | result["skipped"]
    json_path = write_json(result, out / "gates.json")
    report_path = write_gate_report(result, out)
    summary = {"n": result["n"], "baselines": result["baselines"], "skipped": result["skipped"],
               "answer_ms": answer_ms,
               "policies": {p: {k: r["overall"][k] for k in ("accuracy", "retrieval_rate", "stages")}
                            | {k: (r["overall"]["gate_quality"] or {}).get(k) for k in ("precision", "recall", "f1", "auroc")}
                            | {"auroc_ci": r["overall"].get("auroc_ci"), "cost": r["overall"].get("cost"),
                               "operating": r["overall"].get("operating")}
                            for p, r in result["results"].items()}}
    if as_json:
        print(json.dumps(summary | {"gates_json": str(json_path), "report": str(report_path)}, default=str))
    else:
        print(report_path.read_text(encoding="utf-8").split("## Figures")[0])
        print(f"wrote {json_path} and {report_path}")


class BatchedContexts:
    """record -> its GateContext, built 64 at a time (one embedding batch and dense search each) in the order
    the evaluation asks for them; a context is handed out once and then dropped (its probe holds a KV cache)."""

    def __init__(self, rag, records, many, size: int = 64):
        self.rag, self.many, self.size = rag, many, size
        self.position = {r.id: i for i, r in enumerate(records)}
        self.records = records
        self.pending: dict[str, object] = {}

    def __call__(self, r):
        if r.id not in self.pending:
            i = self.position[r.id]
            part = self.records[i:i + self.size]
            for rec, ctx in zip(part, self.many(self.rag, [(x.question, dict(x.metadata)) for x in part]),
                                strict=True):
                self.pending[rec.id] = ctx
        return self.pending.pop(r.id)


def measure_answer_ms(rag, records) -> dict[str, float]:
    """Mean wall time (ms) of a whole closed-book (never) and open-book (always) answer over these questions,
    after one untimed warm-up answer each: the denominators of the gate's share of answer time."""
    from expertrag.gate.policies import make_policy

    out: dict[str, float] = {"questions": float(len(records))}
    caches = rag.answer_cache, rag.retrieval_cache
    rag.answer_cache = rag.retrieval_cache = None  # a cached answer would time the cache, not the model
    try:
        for branch, name in (("closed", "never"), ("open", "always")):
            policy = make_policy(name)
            rag.answer(records[0].question, policy=policy)
            times = [rag.answer(r.question, policy=policy).timings.total_ms for r in records]
            out[branch] = sum(times) / len(times)
    finally:
        rag.answer_cache, rag.retrieval_cache = caches
    return out
