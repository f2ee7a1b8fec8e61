"""Gate artifact files: the JSON documents and safetensors weight files under an index's `gate/` folder.

A gate model is `<name>.json` (format, version, kind, FeatureSpec, threshold, calibrator, hyper-parameters)
plus `<name>.safetensors` for weight arrays (sha256 recorded in the JSON, which is written last, so a JSON
on disk always names complete weights). No pickle. Every file is written through `expertrag.fileio`'s
atomic writer (fsync of file and directory). The policies' own artifacts (popularity, skr-knn) use the same
readers and version check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from expertrag.errors import ExpertRAGError
from expertrag.fileio import atomic_path, atomic_write_text, sha256_file

FORMAT = "expertrag-gate"
VERSION = 1


class GateArtifactError(ExpertRAGError):
    """A missing, corrupt or incompatible gate artifact (the message names the file).

    Evaluation skips a policy whose artifacts raise this (with the message as the reason); any other error
    from building or running a policy is a bug and propagates."""


def write_json_atomic(path: str | os.PathLike[str], doc: Any) -> None:
    """The gate folder's JSON layout (indent 1, NaN rejected), written atomically."""
    atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")


def write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Write float64 arrays to a safetensors file; returns the JSON's `tensors` entry (file name, sha256)."""
    from safetensors.numpy import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(tmp))
    return {"file": path.name, "sha256": sha256_file(path)}


def read_tensors(path: Path, tref: Any) -> dict[str, np.ndarray]:
    """The arrays named by the gate JSON `path`'s `tensors` entry, checked against its sha256."""
    if not isinstance(tref, dict) or not isinstance(tref.get("file"), str):
        raise GateArtifactError(f"{path}: corrupt gate file (bad 'tensors' entry)")
    tpath = path.parent / Path(tref["file"]).name
    if not tpath.is_file():
        raise GateArtifactError(f"{tpath}: weights of gate {path} not found")
    if sha256_file(tpath) != tref.get("sha256"):
        raise GateArtifactError(f"{tpath}: checksum mismatch (corrupt or from another save of {path.name})")
    try:
        from safetensors.numpy import load_file

        return load_file(str(tpath))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise GateArtifactError(f"{tpath}: corrupt weights file: {e}") from None


def vec(tensors: Mapping[str, np.ndarray], key: str, n: int) -> np.ndarray:
    return arr(tensors, key, (n,))


def arr(tensors: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """tensors[key] as float64 of exactly `shape`, all finite (else ValueError: the loader names the file)."""
    if key not in tensors:
        raise ValueError(f"tensor '{key}' missing")
    a = np.asarray(tensors[key], dtype=np.float64)
    if a.shape != shape:
        raise ValueError(f"tensor '{key}' has shape {a.shape}, expected {shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"tensor '{key}' has non-finite values")
    return a


def read_json_artifact(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """A JSON object from `path`, or a GateArtifactError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise GateArtifactError(f"{path}: {what} not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GateArtifactError(f"{path}: corrupt {what} (not valid JSON: {e})") from None
    if not isinstance(doc, dict):
        raise GateArtifactError(f"{path}: corrupt {what} (expected a JSON object)")
    return doc


def check_version(path: str | os.PathLike[str], doc: Mapping[str, Any], fmt: str, what: str) -> None:
    if doc.get("format") != fmt:
        raise GateArtifactError(f"{path}: not an ExpertRAG {what} (format {doc.get('format')!r}, expected {fmt!r})")
    if doc.get("version") != VERSION:
        raise GateArtifactError(
            f"{path}: {what} format version {doc.get('version')!r}, this ExpertRAG reads version {VERSION}; "
            f"retrain with `expertrag train gate`")
