"""Answer, retrieval, ranking and latency metrics as pure functions (tested against hand-computed cases).

Answer normalisation follows the SQuAD v1.1 evaluation script: lower case, drop punctuation, drop the
articles a/an/the, collapse whitespace.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


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


def contains_answer(text: str, golds: Sequence[str]) -> float:
    """PopQA-style accuracy: a normalised gold answer occurs in the normalised text (on word boundaries)."""
    t = f" {normalize_answer(text)} "
    return float(any(n and f" {n} " in t for n in (normalize_answer(g) for g in golds)))


def answer_recall_at_k(passages: Sequence[str], golds: Sequence[str], k: int) -> float:
    """1 if a gold answer occurs in one of the first k passages (SQuAD-normalised), else 0."""
    return float(any(contains_answer(p, golds) for p in passages[:k]))


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
