"""The one atomic writer: whole files or nothing, the ordinary file mode, folders committed whole."""

from __future__ import annotations

import json
import os
import stat

import pytest

from expertrag.fileio import atomic_path, atomic_write_json, atomic_write_text, commit_dir


def test_atomic_path_replaces_whole_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"  # untouched by the failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_files_get_the_ordinary_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "m.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_atomic_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"v": float("nan")})
    assert not (tmp_path / "x.json").exists()
    atomic_write_json(tmp_path / "x.json", {"v": 1.5})
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": 1.5}


def test_commit_dir_moves_a_finished_folder_into_place(tmp_path):
    tmp = tmp_path / ".work.tmp"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "sub" / "f.bin").write_bytes(b"x" * 10)
    commit_dir(tmp, tmp_path / "final")
    assert (tmp_path / "final" / "sub" / "f.bin").read_bytes() == b"x" * 10 and not tmp.exists()
