"""The index manifest: the commit point of a build and the description of what an index holds.

Written last, atomically (temp file, fsync, rename). Whatever generation it names is the one readers see.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from expertrag.errors import IndexFormatError
from expertrag.fileio import atomic_write_json, sha256_file

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


# field -> the JSON type it must have (checked on read: a hand-edited manifest fails with its name)
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "generation": int, "embedder": str, "embedding_dim": int, "dense_index": str,
    "passages": int, "documents": int, "files": dict, "bm25_dir": str, "dense_file": str, "sources": list,
    "created_at": str, "updated_at": str, "extra": dict,
}
_TYPE_NAMES = {int: "an integer", str: "a string", dict: "an object", list: "a list"}


def write_manifest(index_dir: Path, manifest: Manifest) -> None:
    """Atomic, with the ordinary file mode (0666 & ~umask), like every other artifact."""
    atomic_write_json(index_dir / MANIFEST, asdict(manifest), indent=2, sort_keys=True)


def _check_fields(path: Path, raw: dict[str, Any]) -> None:
    known = {f.name for f in fields(Manifest)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise IndexFormatError(f"{path}: unknown manifest field {unknown[0]!r}")
    for name, kind in _FIELD_TYPES.items():
        if name not in raw:
            if name in ("format_version", "generation", "embedder", "embedding_dim", "dense_index",
                        "passages", "documents"):
                raise IndexFormatError(f"{path}: manifest field {name!r} is missing")
            continue
        value = raw[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            got = "null" if value is None else type(value).__name__
            raise IndexFormatError(f"{path}: manifest field {name!r} must be {_TYPE_NAMES[kind]}, got {got}")
    for rel, digest in raw.get("files", {}).items():
        if not isinstance(digest, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise IndexFormatError(f"{path}: manifest field 'files' has a bad entry {rel!r}")


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise IndexFormatError(f"{path}: corrupt manifest ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise IndexFormatError(f"{path}: cannot read the manifest: {e.strerror or e}") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        found = raw.get("format_version") if isinstance(raw, dict) else None
        raise IndexFormatError(f"{path}: index format {found!r}, this version reads {FORMAT_VERSION}")
    _check_fields(path, raw)
    return Manifest(**raw)


def verify_files(index_dir: Path, manifest: Manifest) -> None:
    """Check every file the manifest lists against its checksum; name the first bad one."""
    for rel, digest in manifest.files.items():
        path = index_dir / rel
        if not path.exists():
            raise IndexFormatError(f"{path}: missing (listed in {index_dir / MANIFEST}); rebuild the index")
        try:
            actual = sha256_file(path)
        except OSError as e:
            raise IndexFormatError(f"{path}: cannot read: {e.strerror or e}") from None
        if actual != digest:
            raise IndexFormatError(f"{path}: checksum mismatch, the file is corrupt or truncated; rebuild the index")
