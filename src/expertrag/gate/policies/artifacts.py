"""The policies' files in an index's `gate/` folder (written by `expertrag train gate`; see ARTIFACTS).

fast.json/.safetensors and full.json/.safetensors (adaptive), skr_knn.json + skr_knn.npz, popularity.json,
entropy.json and router.json (tuned thresholds, used when the config leaves them null), band.json (the
fast gate's training-score distances from its threshold, for the quantile probe band). Everything is
written through `expertrag.fileio`'s atomic writer; a missing or corrupt file raises GateArtifactError.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from expertrag.fileio import atomic_path
from expertrag.gate.models import (
    VERSION,
    GateArtifactError,
    GateModel,
    check_version,
    load_gate,
    read_json_artifact,
    write_json_atomic,
)

ARTIFACTS: dict[str, str] = {
    "fast": "fast.json",
    "full": "full.json",
    "skr_knn": "skr_knn.json",
    "skr_knn_arrays": "skr_knn.npz",
    "popularity": "popularity.json",
    "entropy": "entropy.json",
    "router": "router.json",
    "report": "report.json",
    "band": "band.json",
}
TRAIN_HINT = "train it with `expertrag train gate`"
POPULARITY_FORMAT = "expertrag-gate-popularity"
SKR_FORMAT = "expertrag-gate-skr-knn"


def artifact_path(artifacts_dir: str | os.PathLike[str] | None, key: str, policy: str) -> Path:
    """The existing file ARTIFACTS[key] in `artifacts_dir`, or a GateArtifactError saying how to make it."""
    if artifacts_dir is None:
        raise GateArtifactError(f"policy '{policy}' needs trained gate artifacts but no gate folder was given; "
                                f"{TRAIN_HINT}")
    path = Path(artifacts_dir) / ARTIFACTS[key]
    if not path.is_file():
        raise GateArtifactError(f"policy '{policy}' needs {path}, which does not exist; {TRAIN_HINT}")
    return path


def tuned_threshold(config_value: float | None, artifacts_dir: Any, key: str, policy: str,
                    check: Callable[[GateModel], float]) -> float:
    """The config's threshold, or (when null) the one `check` reads off the trained gate ARTIFACTS[key]."""
    if config_value is not None:
        return float(config_value)
    return check(load_gate(artifact_path(artifacts_dir, key, policy)))


# ----------------------------------------------------------------------------------------------- popularity


def save_popularity(artifacts_dir: str | os.PathLike[str], global_threshold: float,
                    thresholds: Mapping[str, float]) -> Path:
    path = Path(artifacts_dir) / ARTIFACTS["popularity"]
    write_json_atomic(path, {"format": POPULARITY_FORMAT, "version": VERSION,
                             "global_threshold": global_threshold, "thresholds": dict(thresholds)})
    return path


def load_popularity(artifacts_dir: str | os.PathLike[str] | None, policy: str) -> tuple[float, dict[str, Any]]:
    """(global threshold, per-relation thresholds) from popularity.json."""
    path = artifact_path(artifacts_dir, "popularity", policy)
    doc = read_json_artifact(path, "popularity thresholds")
    check_version(path, doc, POPULARITY_FORMAT, "popularity thresholds")
    try:
        return float(doc["global_threshold"]), dict(doc.get("thresholds") or {})
    except (KeyError, TypeError, ValueError) as e:
        raise GateArtifactError(f"{path}: corrupt popularity thresholds: {e}") from None


# -------------------------------------------------------------------------------------------------- skr-knn


def save_skr_knn(artifacts_dir: str | os.PathLike[str], embeddings: np.ndarray, labels: np.ndarray,
                 k: int) -> Path:
    """skr_knn.npz (the arrays) then skr_knn.json (which names them), each atomically."""
    d = Path(artifacts_dir)
    npz = d / ARTIFACTS["skr_knn_arrays"]
    # a file object: np.savez given a path would append ".npz" to the temporary name
    with atomic_path(npz) as tmp, open(tmp, "wb") as f:
        np.savez(f, embeddings=embeddings, labels=labels)
    path = d / ARTIFACTS["skr_knn"]
    write_json_atomic(path, {"format": SKR_FORMAT, "version": VERSION, "k": int(k), "count": int(labels.size),
                             "dim": int(embeddings.shape[1]), "arrays": npz.name})
    return path


def load_skr_knn(artifacts_dir: str | os.PathLike[str] | None, policy: str,
                 build: Callable[[np.ndarray, np.ndarray, int], Any], k: int | None = None) -> Any:
    """build(embeddings, labels, k) from skr_knn.json + .npz (k from the file unless given); a corrupt
    file, or arrays `build` rejects (ValueError), raise GateArtifactError naming the file."""
    path = artifact_path(artifacts_dir, "skr_knn", policy)
    doc = read_json_artifact(path, "skr-knn index")
    check_version(path, doc, SKR_FORMAT, "skr-knn index")
    npz = path.parent / ARTIFACTS["skr_knn_arrays"]
    if not npz.is_file():
        raise GateArtifactError(f"{npz}: skr-knn arrays not found; {TRAIN_HINT}")
    try:
        with np.load(npz, allow_pickle=False) as z:
            e, lab = z["embeddings"], z["labels"]
        if e.shape != (doc["count"], doc["dim"]):
            raise ValueError(f"arrays hold {e.shape}, {path.name} says ({doc['count']}, {doc['dim']})")
        return build(e, lab, int(k if k is not None else doc["k"]))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise GateArtifactError(f"{npz}: corrupt skr-knn index: {e}") from None


BAND_FORMAT = "expertrag-gate-band"
BAND_POINTS = 101  # distance quantiles at 0, 0.01, ..., 1


def band_distances(scores: Any, threshold: float) -> list[float]:
    """Quantiles 0, 0.01, ..., 1 of |score - threshold| over the fast gate's training scores."""
    d = np.abs(np.asarray(scores, dtype=np.float64) - float(threshold))
    return [float(x) for x in np.quantile(d, np.linspace(0, 1, BAND_POINTS))] if d.size else [0.0] * BAND_POINTS


def write_band(artifacts_dir: str | os.PathLike[str], threshold: float, scores: Any) -> dict[str, Any]:
    doc = {"format": BAND_FORMAT, "version": VERSION, "threshold": float(threshold), "n": int(np.size(scores)),
           "distance_quantiles": band_distances(scores, threshold)}
    write_json_atomic(Path(artifacts_dir) / ARTIFACTS["band"], doc)
    return doc


def read_band(artifacts_dir: str | os.PathLike[str] | None, quantile: float) -> tuple[float, float] | None:
    """(low, high) = threshold -+ the `quantile` of training distances (interpolated between the stored
    quantiles), or None when the folder has no band.json (a gate trained before it existed)."""
    if artifacts_dir is None:
        return None
    path = Path(artifacts_dir) / ARTIFACTS["band"]
    if not path.is_file():
        return None
    doc = read_json_artifact(path, "probe band file")
    check_version(path, doc, BAND_FORMAT, "probe band file")
    try:
        t = float(doc["threshold"])
        qs = [float(x) for x in doc["distance_quantiles"]]
        if len(qs) < 2 or not all(np.isfinite(qs)) or not np.isfinite(t):
            raise ValueError("need finite threshold and >= 2 distance quantiles")
    except (KeyError, TypeError, ValueError) as e:
        raise GateArtifactError(f"{path}: corrupt probe band file: {e}") from None
    d = float(np.interp(quantile, np.linspace(0, 1, len(qs)), qs))
    return t - d, t + d
