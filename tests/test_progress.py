"""Progress bars on long steps: shown when stderr is a terminal, absent when it is not (CI, pipes, files)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

ROWS = [
    {"id": f"d{i}", "title": f"Topic {i}", "contents": f"Passage number {i} is about subject {i} and nothing else."}
    for i in range(6)
]
BAR_MARKS = ("embed:", "passage/s", "%|")  # what a tqdm bar of the embed step prints


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                PYTHONPATH=src + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))


def test_index_build_shows_no_bars_when_stderr_is_not_a_terminal(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "expertrag", "index", "--corpus", str(_corpus(tmp_path)),
                           "--out", str(tmp_path / "idx")], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "6 passages from 6 documents" in proc.stdout  # the build ran and reported
    for mark in BAR_MARKS:
        assert mark not in proc.stderr, proc.stderr
    assert "\r" not in proc.stderr


def test_index_build_shows_the_embed_bar_on_a_terminal(tmp_path):
    """The same command with a pseudo-terminal as stderr: the bar says what is done and how much is left."""
    leader, follower = pty.openpty()
    # a fresh pty is 0 columns wide, and tqdm fits its bar to the width: give it a normal terminal's size
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "expertrag", "index", "--corpus", str(_corpus(tmp_path)),
                             "--out", str(tmp_path / "idx")], stdout=subprocess.PIPE, stderr=follower,
                            env=_env())
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 300)
        if not ready:
            proc.kill()
            pytest.fail("no output from the build for 300 s")
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(leader)
    tty_err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, tty_err
    assert "embed:" in tty_err and "6/6" in tty_err, tty_err


def test_demo_wait_for_background_build_is_quiet_off_a_terminal(tmp_path, capsys):
    """The demo's wait on its background build: one summary line, no bar, when stderr is not a terminal."""
    from expertrag.cli.demo import STATUS_FILE, Clock, wait_background

    status = tmp_path / STATUS_FILE
    # a real child that reports progress the way background_build does, then finishes
    code = (
        "import json, sys, time\n"
        "p = sys.argv[1]\n"
        "for done in (0, 512, 1024):\n"
        "    open(p, 'w').write(json.dumps({'phase': 'embed', 'done': done, 'total': 1024})); time.sleep(0.3)\n"
        "open(p, 'w').write(json.dumps({'phase': 'done', 'passages': 1030, 'documents': 1000,"
        " 'embedded': 1024, 'seconds': 0.9}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(status)])
    wait_background(proc, tmp_path, Clock())
    captured = capsys.readouterr()
    assert "index complete: 1030 passages from 1000 articles; embedded 1024" in captured.out
    assert "%|" not in captured.err and "passage/s" not in captured.err and "\r" not in captured.err


def test_demo_wait_reports_a_failed_background_build(tmp_path, capsys):
    from expertrag.cli.demo import LOG_FILE, Clock, wait_background

    (tmp_path / LOG_FILE).write_text("Traceback ...\nOSError: disk full\n", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    wait_background(proc, tmp_path, Clock())
    out = capsys.readouterr().out
    assert "background build failed (exit 3): OSError: disk full" in out
    assert "next run resumes it" in out


def test_gguf_conversion_bar_is_quiet_off_a_terminal(capsys):
    """transformers' own GGUF-conversion bar (tqdm with disable=False) is held to 'only on a terminal'."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from expertrag.model.loading import _quiet_off_terminal

    original = gguf_utils.tqdm

    def converts(n):  # stands in for load_gguf_checkpoint: iterates through the module's tqdm like it does
        return sum(1 for _ in gguf_utils.tqdm(range(n), desc="Converting and de-quantizing GGUF tensors..."))

    assert _quiet_off_terminal(converts)(50) == 50
    assert "Converting" not in capsys.readouterr().err
    assert gguf_utils.tqdm is original  # put back afterwards
    converts(5)  # unwrapped, the library's bar writes even to a non-terminal: the wrapper is what silences it
    assert "Converting" in capsys.readouterr().err
