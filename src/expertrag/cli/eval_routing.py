"""`expertrag eval-routing`: what the retrieval expert is routed for, per prompt segment."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from expertrag.cli import eval_common as ec
from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig
from expertrag.errors import InputError


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
    from expertrag.eval.results import write_json
    from expertrag.eval.routing import render_routing_markdown, retrieval_routing
    from expertrag.eval.sampling import select_questions
    from expertrag.fileio import atomic_write_text
    from expertrag.pipeline.build import load_pipeline

    config = ExpertRAGConfig.load(config_path)
    if not config.model.checkpoint:
        raise InputError("eval-routing needs model.checkpoint (an MoE checkpoint from `expertrag train lm`) in --config")
    if limit is not None and limit <= 0:
        raise InputError("--limit must be positive")
    ec.check_index(index)
    questions = select_questions(load_questions(ec.check_file(dataset, "question file")), limit, seed, dataset.stem)
    label_map = ec.read_label_files(list(labels or []))
    rag = load_pipeline(index, config, "always", generator=ec.load_generator(config))
    try:
        result = retrieval_routing(rag, questions, label_map, progress=None if not as_json else False)
    except ValueError as e:
        raise InputError(str(e)) from None
    result["config"] = ec.provenance(config, index, None, list(labels or []))
    json_path = write_json(result, out / "routing.json")
    md = out / "routing.md"
    atomic_write_text(md, render_routing_markdown(result))
    if as_json:
        print(json.dumps({k: result[k] for k in ("n", "by_label")}
                         | {m: {s: {k: v[k] for k in ("fired", "affinity")} for s, v in result[m].items()}
                            for m in ("closed_book", "open_book")} | {"json": str(json_path), "report": str(md)}))
    else:
        print(md.read_text(encoding="utf-8"))
        print(f"wrote {json_path} and {md}")
