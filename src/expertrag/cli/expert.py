"""`expertrag expert ...`: register, inspect, train and retire domain experts."""

from __future__ import annotations

import typer

from expertrag.cli.app import app

expert_app = typer.Typer(help="Domain experts: register, list, show, train and retire them.", no_args_is_help=True)
app.add_typer(expert_app, name="expert")
