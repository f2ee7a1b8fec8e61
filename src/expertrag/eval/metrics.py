"""Answer, retrieval, ranking and latency metrics as pure functions (tested against hand-computed cases).

Answer normalisation and "contains the answer" live in `expertrag.answers`, AUROC and precision/recall in
`expertrag.classification` (leaves that the pipeline and the gate import too); they are re-exported here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from expertrag.answers import contains_answer, normalize_answer
from expertrag.classification import auroc, precision_recall_f1


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if not p or not g:
        return float(p == g)
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    return max((_f1(prediction, g) for g in golds), default=0.0)


def answer_recall_at_k(passages: Sequence[str], golds: Sequence[str], k: int) -> float:
    """1 if a gold answer occurs in one of the first k passages (SQuAD-normalised), else 0."""
    return float(any(contains_answer(p, golds) for p in passages[:k]))


def mean_or_nan(values: Sequence[float]) -> float:
    """The mean, or NaN for no values (an undefined metric; null in the result JSON)."""
    return float(np.mean(values)) if len(values) else float("nan")


def ratio_or_nan(num: float, den: float) -> float:
    """num / den, or NaN when den is 0."""
    return float(num / den) if den else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def latency_summary(ms: Sequence[float]) -> dict[str, float]:
    return {
        "latency_ms_mean": float(np.mean(ms)) if len(ms) else float("nan"),
        "latency_ms_p50": percentile(ms, 50),
        "latency_ms_p95": percentile(ms, 95),
        "latency_ms_p99": percentile(ms, 99),
    }


__all__ = [
    "answer_recall_at_k", "auroc", "contains_answer", "exact_match", "latency_summary", "mean_or_nan",
    "normalize_answer", "percentile", "precision_recall_f1", "ratio_or_nan", "token_f1",
]
