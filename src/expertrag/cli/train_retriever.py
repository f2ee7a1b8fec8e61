"""`expertrag train retriever`: inverse-cloze fine-tuning of the sentence embedder (retrieval/ict.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from expertrag.cli.train import train_app


@train_app.command("retriever")
def train_retriever_cmd(
    data: list[Path] = typer.Option(..., "--data", "-d", help="corpus file or folder (the formats `expertrag index` "
                                                             "reads); repeatable. Pairs come from its passages"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the trained model (replaced if it exists); "
                                                     "index with `retrieval.embedder: OUT`"),
    budget_min: float = typer.Option(25.0, "--budget-min", help="wall-clock training budget in minutes"),
    max_pairs: int = typer.Option(4000, "--max-pairs", help="ICT pairs to sample (at most one per record)"),
    batch_size: int = typer.Option(32, "--batch-size", help="pairs per batch (in-batch negatives: batch-1)"),
    lr: float = typer.Option(2e-5, "--lr", help="peak learning rate (linear warm-up and decay)"),
    epochs: int = typer.Option(1, "--epochs", help="passes over the pairs (the budget may end training first)"),
    seed: int = typer.Option(0, "--seed", help="seeds pair sampling, batch order and initialisation"),
    base: str = typer.Option("all-MiniLM-L6-v2", "--base", help="embedder to start from (packaged name or folder)"),
    threads: int | None = typer.Option(None, "--threads", help="torch threads (default: torch's own)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip bad corpus records and report counts"),
    as_json: bool = typer.Option(False, "--json", help="print the training report as JSON"),
) -> None:
    """Fine-tune the retriever's embedder with the inverse cloze task: a sentence of a passage is the query,
    the rest of that passage its positive, the batch's other passages its negatives
    (MultipleNegativesRankingLoss). Training on the corpus you will search is the point of ICT."""
    from expertrag.data.readers import IngestReport, iter_documents
    from expertrag.errors import InputError
    from expertrag.retrieval.ict import ict_pairs, train_ict

    for name, value in (("--max-pairs", max_pairs), ("--batch-size", batch_size), ("--epochs", epochs)):
        if value <= 0:
            raise InputError(f"{name} must be positive, got {value}")
    if budget_min <= 0 or lr <= 0:
        raise InputError(f"--budget-min and --lr must be positive, got {budget_min} and {lr}")
    if threads is not None:
        import torch

        if threads <= 0:
            raise InputError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    report = IngestReport()
    started = time.perf_counter()
    records = list(iter_documents(data, skip_bad=skip_bad, report=report))
    pairs = ict_pairs(records, max_pairs=max_pairs, seed=seed)
    print(f"{len(pairs)} ICT pairs from {len(records)} records in {time.perf_counter() - started:.1f} s; "
          f"training for at most {budget_min:g} min", file=sys.stderr)
    every = max(1, len(pairs) // batch_size // 20)
    t0 = time.monotonic()

    def on_step(step: int) -> None:
        if step % every == 0:
            print(f"  step {step}, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

    result = train_ict(pairs, out, base=base, budget_s=budget_min * 60, batch_size=batch_size, lr=lr,
                       epochs=epochs, seed=seed, sources=[str(p) for p in data], on_step=on_step)
    result["records"] = len(records)
    result["skipped_records"] = report.skipped
    if as_json:
        print(json.dumps(result))
        return
    print(json.dumps(result, indent=2))
    print(f"index with it: set `retrieval.embedder: {out}` in a config and run `expertrag index ... --config`")
