"""Binary-classification metrics (AUROC, precision/recall/F1) shared by gate training and evaluation.

A leaf module (numpy only): the gate fits and reports with it, the evaluation harness scores with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties 1/2.
    NaN when only one class is present."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    # rank-sum (Mann-Whitney U) with average ranks for ties
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allv))
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    rank_of = np.empty(len(allv))
    rank_of[order] = ranks
    u = rank_of[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def precision_recall_f1(labels: Iterable[bool], predictions: Iterable[bool]) -> dict[str, float]:
    tp = fp = fn = 0
    for y, p in zip(labels, predictions, strict=True):
        tp += bool(y and p)
        fp += bool(p and not y)
        fn += bool(y and not p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
