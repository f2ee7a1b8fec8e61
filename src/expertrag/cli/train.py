"""`expertrag train ...`: training commands (owned by the model/ package)."""

from __future__ import annotations

import typer

from expertrag.cli.app import app

train_app = typer.Typer(help="Train the MoE language model and the retrieval gate.", no_args_is_help=True)
app.add_typer(train_app, name="train")
