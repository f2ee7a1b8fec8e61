"""Numeric helpers every gate model shares: the logistic link, label checks, threshold choice, standardisation."""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def check_binary(y: Any, n: int) -> np.ndarray:
    """y as int64 0/1 labels, one per feature row, with both classes present (else ValueError)."""
    yy = np.asarray(y).ravel()
    if yy.size != n:
        raise ValueError(f"{n} feature rows but {yy.size} labels")
    if not np.isin(yy, (0, 1)).all():
        raise ValueError("labels must be 0/1 (1 = retrieval needed)")
    yy = yy.astype(np.int64)
    if n and (yy.min() == yy.max()):
        raise ValueError("training data has only one class; a gate needs questions of both kinds")
    return yy


def best_threshold(values: Any, y: Any, target_rate: float | None = None) -> float:
    """Threshold t for the rule "retrieve iff value >= t" on training data.

    Candidates: the smallest value (retrieve all), midpoints between consecutive distinct values, and just
    above the largest (retrieve none). Maximises F1 of "retrieve", or, with target_rate, matches that
    retrieval rate as closely as possible. Ties go to the higher threshold (fewer retrievals).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    yb = np.asarray(y).astype(bool).ravel()
    if v.size == 0 or v.size != yb.size:
        raise ValueError(f"need equally many values and labels, got {v.size} and {yb.size}")
    u = np.unique(v)
    cands = np.concatenate([[u[0]], (u[:-1] + u[1:]) / 2, [np.nextafter(u[-1], np.inf)]])
    sv, sp = np.sort(v), np.sort(v[yb])
    n_pred = np.append(v.size - np.searchsorted(sv, u, "left"), 0)
    tp = np.append(sp.size - np.searchsorted(sp, u, "left"), 0)
    if target_rate is not None:
        obj = -np.abs(n_pred / v.size - target_rate)
    else:
        denom = n_pred + sp.size
        obj = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    i = len(obj) - 1 - int(np.argmax(obj[::-1]))
    return float(cands[i])


def standardisation(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std (std 1 for constant columns)."""
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)
