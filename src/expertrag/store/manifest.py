"""The index manifest: the commit point of a build and the description of what an index holds.

Written last, atomically (temp file, fsync, rename). Whatever generation it names is the one readers see.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expertrag.errors import IndexFormatError
from expertrag.fileio import atomic_write_bytes, sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    format_version: int
    generation: int
    embedder: str
    embedding_dim: int
    dense_index: str
    passages: int
    documents: int
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    bm25_dir: str = ""
    dense_file: str = ""
    sources: list[str] = field(default_factory=list)
    created_at: str = ""
    updated_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def write_manifest(index_dir: Path, manifest: Manifest) -> None:
    data = json.dumps(asdict(manifest), indent=2, sort_keys=True).encode()
    atomic_write_bytes(index_dir / MANIFEST, data)


def read_manifest(index_dir: Path) -> Manifest:
    path = index_dir / MANIFEST
    if not index_dir.exists():
        raise IndexFormatError(f"{index_dir}: index directory not found (build it with `expertrag index`)")
    if not path.exists():
        raise IndexFormatError(
            f"{path}: no manifest, so {index_dir} is not a finished index (build it with `expertrag index`)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        found = raw.get("format_version") if isinstance(raw, dict) else None
        raise IndexFormatError(f"{path}: index format {found!r}, this version reads {FORMAT_VERSION}")
    try:
        return Manifest(**raw)
    except TypeError as e:
        raise IndexFormatError(f"{path}: manifest fields do not match ({e})") from None


def verify_files(index_dir: Path, manifest: Manifest) -> None:
    """Check every file the manifest lists against its checksum; name the first bad one."""
    for rel, digest in manifest.files.items():
        path = index_dir / rel
        if not path.exists():
            raise IndexFormatError(f"{path}: missing (listed in {index_dir / MANIFEST}); rebuild the index")
        if sha256_file(path) != digest:
            raise IndexFormatError(f"{path}: checksum mismatch, the file is corrupt or truncated; rebuild the index")
