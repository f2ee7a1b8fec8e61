"""File helpers shared by every part that writes artifacts: checksums and the one atomic writer.

Every artifact the project writes (manifests, gate files, labels, checkpoints, converted weights, results)
goes through `atomic_path`: the data is written to a temporary file beside the target, fsynced, renamed over
the target, and the directory is fsynced, so a reader (or a process killed at any point) sees the old file or
the new one, never a part.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _default_mode() -> int:
    # mkstemp creates 0600 files; artifacts should get the mode an ordinary open() would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it atomically becomes `path`.

    For libraries that write to a path themselves (numpy, safetensors, faiss, torch): write to the yielded
    path, and the file appears at `path` complete and durable. On an exception the temporary file is removed
    and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      sort_keys: bool = False) -> None:
    """JSON with `allow_nan=False`: NaN/Infinity are not JSON and strict parsers reject them."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def atomic_write_lines(path: str | os.PathLike[str], lines: Iterator[str] | list[str]) -> None:
    """One record per line (JSONL); each line gets a trailing newline."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line.rstrip("\n") + "\n")


def commit_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """The folder counterpart of `atomic_path`: fsync every file of the finished folder `tmp` and the folder
    itself, rename it to `final` (which must not exist) and fsync the parent, so the folder appears whole
    and survives a crash."""
    tmp, final = Path(tmp), Path(final)
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename inside `directory` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
