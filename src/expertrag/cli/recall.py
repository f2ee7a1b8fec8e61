"""`expertrag recall`: retrieval quality on a question file."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig
from expertrag.errors import InputError


@app.command("recall")
def recall_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="question file ({id, question, golden_answers} JSONL)"),
    ks: str = typer.Option("1,5,20", "--k", help="comma-separated cut-offs"),
    modes: str = typer.Option("bm25,dense,hybrid", "--modes", help="comma-separated search modes"),
    limit: int | None = typer.Option(None, "--limit", help="first N questions only"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on the last line"),
) -> None:
    """Answer-recall@k (a gold answer in a top-k passage, SQuAD-normalised) for each search mode, and
    gold-passage recall@k (share of `metadata.gold_passage_ids` among the top k) where questions name them."""
    from expertrag.data.questions import load_questions
    from expertrag.eval.retrieval import answer_recall
    from expertrag.retrieval.index import Index
    from expertrag.retrieval.types import MODES

    try:
        cutoffs = sorted({int(k) for k in ks.split(",") if k.strip()})
    except ValueError:
        raise InputError(f"--k must be comma-separated integers, got {ks!r}") from None
    if not cutoffs or cutoffs[0] <= 0:
        raise InputError("--k needs positive cut-offs")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    for m in mode_list:
        if m not in MODES:
            raise InputError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    questions = load_questions(dataset)[:limit]
    idx = Index(index, ExpertRAGConfig.load(config_path).retrieval)
    result = answer_recall(idx, questions, cutoffs, mode_list, progress=None if not as_json else False)
    result["dataset"] = str(dataset)
    result["index_passages"] = len(idx)
    if as_json:
        print(json.dumps(result))
        return
    header = "mode     " + "".join(f"recall@{k:<4}" for k in cutoffs)
    print(f"{result['questions']} questions, {len(idx)} passages\n{header}")
    for m, row in result["modes"].items():
        print(f"{m:<9}" + "".join(f"{row[f'recall@{k}']:<11.3f}" for k in cutoffs))
    if result["questions_with_gold_passages"]:
        print(f"gold-passage recall ({result['questions_with_gold_passages']} questions name gold passages)\n"
              + header.replace("recall@", "gold@  "))
        for m, row in result["modes"].items():
            print(f"{m:<9}" + "".join(f"{row[f'gold_recall@{k}']:<11.3f}" for k in cutoffs))
