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
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on the last line"),
) -> None:
    """Gate quality without generating answers: each policy's decisions on labelled questions, accuracy read
    off the labels, precision/recall/AUROC and the threshold sweep. Use labels the gate was not trained on."""
    from expertrag.eval.gate_eval import build_policies, evaluate_gates, write_gate_report
    from expertrag.eval.results import write_json
    from expertrag.pipeline.build import gate_dir, load_pipeline
    from expertrag.pipeline.rag import PipelineGateContext

    config = ExpertRAGConfig.load(config_path)
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
    result = evaluate_gates(lambda r: PipelineGateContext(rag, r.question, dict(r.metadata), None), built, records,
                            settings=settings, progress=None if not as_json else False,
                            config=ec.provenance(config, index, gate, list(labels)))
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
