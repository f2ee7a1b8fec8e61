"""`expertrag train ...`: train the MoE language model and the retrieval gate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig

train_app = typer.Typer(help="Train the MoE language model and the retrieval gate.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("gate")
def train_gate_cmd(
    labels: Path = typer.Option(..., "--labels", "-l", help="label file from `expertrag label`"),
    index: Path = typer.Option(..., "--index", "-i", help="index the gate is trained for"),
    out: Path | None = typer.Option(None, "--out", "-o", help="gate folder (default: INDEX/gate)"),
    objective: str | None = typer.Option(None, "--objective", help="supervised | gumbel | reinforce (default: config)"),
    no_probe: bool = typer.Option(False, "--no-probe", help="query-only features (no closed-book probe per question)"),
    limit: int | None = typer.Option(None, "--limit", help="first N labelled questions only"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    reuse_traces: bool = typer.Option(True, "--reuse-traces/--no-reuse-traces",
                                      help="take probe features from the labels' closed-book traces where the "
                                           "provenance sidecar shows the same model set-up (else probe)"),
    as_json: bool = typer.Option(False, "--json", help="print the training report as JSON"),
) -> None:
    """Train every gate the labels allow (adaptive fast+full, skr-knn, popularity, entropy, router)."""
    from expertrag.gate.labels import read_labels
    from expertrag.gate.train import retrieval_rate_warning, train_artifacts
    from expertrag.pipeline.build import gate_dir, load_pipeline
    from expertrag.pipeline.labeling import gate_examples, trace_reuse

    config = ExpertRAGConfig.load(config_path)
    if objective is not None:
        config.gate = config.gate.model_copy(update={"objective": objective})
        config.gate = type(config.gate).model_validate(config.gate.model_dump())
    records = read_labels(labels)[:limit]
    rag = load_pipeline(index, config, "never")
    mnt, why = None, "--no-reuse-traces"
    if reuse_traces and not no_probe:
        mnt, why = trace_reuse(rag, model_description(config), label_provenance(labels))
    stats: dict = {}
    examples = gate_examples(rag, records, probe=not no_probe, gate=config.gate, trace_max_new_tokens=mnt,
                             stats=stats)
    if not no_probe and stats.get("probes_run"):
        print(f"note: {stats['probes_run']} of {len(records)} probes run" + (f" ({why})" if why else ""),
              file=sys.stderr)
    report = train_artifacts(examples, config.gate, out or gate_dir(index))
    report["feature_extraction"] = stats
    from expertrag.gate.models import write_json_atomic

    write_json_atomic(Path(out or gate_dir(index)) / "report.json", report)
    if as_json:
        print(json.dumps(report, default=str))
        return
    print(json.dumps(report, indent=2, default=str))
    rate = report.get("full", report.get("fast", {})).get("validation", {}).get("retrieval_rate")
    if rate is not None and (warning := retrieval_rate_warning(rate)):
        print(f"warning: {warning}")


def model_description(config: ExpertRAGConfig) -> dict:
    """The model part of the label settings (as `expertrag label` records it in the provenance)."""
    from expertrag.model.auto_backend import describe

    return {"setup": describe(config.model), "config": config.model.model_dump(mode="json")}


def label_provenance(labels: Path) -> dict | None:
    """The label file's provenance sidecar (LABELS.provenance.json), or None when there is none.
    Split files (PREFIX_train.jsonl) have no sidecar of their own: they name their source's in theirs."""
    from expertrag.errors import InputError

    path = labels.with_suffix(".provenance.json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"unreadable provenance of the labels: {e}", path=path) from None
