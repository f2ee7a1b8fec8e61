"""Assembles the command groups into one typer app."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="expertrag",
    help="Adaptive retrieval-augmented generation with a Mixture-of-Experts model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module adds its commands to `app` (or a sub-app) on import.
from expertrag.cli import (  # noqa: E402,F401
    ask,
    bench,
    bench_pipeline,
    demo,
    eval_cmd,
    eval_experts,
    eval_gates,
    eval_policy,
    eval_routing,
    expert,
    expert_train,
    index,
    merge_results,
    recall,
    serve,
    train,
    train_lm,
    train_retriever,
    train_router,
)
