"""`expertrag train ...`: train the MoE language model and the retrieval gate."""

from __future__ import annotations

import json
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
    as_json: bool = typer.Option(False, "--json", help="print the training report as JSON"),
) -> None:
    """Train every gate the labels allow (adaptive fast+full, skr-knn, popularity, entropy, router)."""
    from expertrag.gate.labels import read_labels
    from expertrag.gate.train import retrieval_rate_warning, train_artifacts
    from expertrag.pipeline.build import gate_dir, load_pipeline
    from expertrag.pipeline.labeling import gate_examples

    config = ExpertRAGConfig.load(config_path)
    if objective is not None:
        config.gate = config.gate.model_copy(update={"objective": objective})
        config.gate = type(config.gate).model_validate(config.gate.model_dump())
    records = read_labels(labels)[:limit]
    rag = load_pipeline(index, config, "never")
    examples = gate_examples(rag, records, probe=not no_probe)
    report = train_artifacts(examples, config.gate, out or gate_dir(index))
    if as_json:
        print(json.dumps(report, default=str))
        return
    print(json.dumps(report, indent=2, default=str))
    rate = report.get("full", report.get("fast", {})).get("validation", {}).get("retrieval_rate")
    if rate is not None and (warning := retrieval_rate_warning(rate)):
        print(f"warning: {warning}")
