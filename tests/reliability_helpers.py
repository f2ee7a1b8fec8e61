"""Helpers shared by the reliability tests (issue 10): in-process CLI runs and an unprivileged subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _hypothesis_outside_the_repo() -> None:
    """Hypothesis keeps caches in ./.hypothesis; the tests use database=None and keep the rest in /tmp."""
    import tempfile

    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "expertrag-hypothesis")


_hypothesis_outside_the_repo()
_PROGRESS = re.compile(r"\d+%\|")  # a library's progress bar (weights loading), not our output
LONG = os.environ.get("EXPERTRAG_LONG_TESTS", "") not in ("", "0")


def cli(*argv: str) -> tuple[int, str, str]:
    """Run `expertrag ARGV` in this process: (exit code, stdout, stderr). Any exception other than
    SystemExit escapes, and a test sees it as the traceback a user would have seen."""
    from expertrag.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["expertrag", *argv]
    code: int | None = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return int(code or 0), out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if not _PROGRESS.search(ln)]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def run_unprivileged(*argv: str) -> subprocess.CompletedProcess:
    """`python -m expertrag ARGV` without the power to ignore file permissions. As root that means
    dropping CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (setpriv), so a permission test means what it says."""
    import pytest

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "expertrag", *argv]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: file permissions cannot be tested")
        cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
