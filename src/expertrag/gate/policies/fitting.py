"""Fitting the baselines' parameters on labelled training questions (the learned gates fit in gate.train)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def best_popularity_threshold(s_pop: Sequence[float], closed: Sequence[float], open_: Sequence[float]) -> float:
    """Threshold t maximising the adaptive accuracy of "retrieve iff s_pop < t" (Mallen et al.): the sum
    of open-book correctness below t and closed-book correctness at or above it. Candidates: min(s_pop)
    (never retrieve), midpoints between distinct values, max + 1 (always). Ties go to the lower t."""
    s = np.asarray(s_pop, dtype=np.float64)
    c = np.asarray(closed, dtype=np.float64)
    o = np.asarray(open_, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no questions with s_pop to fit a popularity threshold on")
    order = np.argsort(s, kind="mergesort")
    ss, cc, oo = s[order], np.concatenate([[0.0], np.cumsum(c[order])]), np.concatenate([[0.0], np.cumsum(o[order])])
    u = np.unique(ss)
    cands = np.concatenate([[u[0]], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    k = np.append(np.searchsorted(ss, u, "left"), ss.size)  # questions retrieved at each candidate
    acc = oo[k] + (cc[-1] - cc[k])
    return float(cands[int(np.argmax(acc))])


def popularity_thresholds(s_pop: Sequence[float], relations: Sequence[str | None], closed: Sequence[float],
                          open_: Sequence[float], *, min_questions: int = 10) -> tuple[float, dict[str, float]]:
    """The global threshold and one per relation with at least `min_questions` training questions."""
    s, c, o = (np.asarray(a, dtype=np.float64) for a in (s_pop, closed, open_))
    rel = np.asarray([r if r is not None else "" for r in relations], dtype=object)
    thresholds = {}
    for r in sorted(set(rel) - {""}):
        m = rel == r
        if m.sum() >= min_questions:
            thresholds[r] = best_popularity_threshold(s[m], c[m], o[m])
    return best_popularity_threshold(s, c, o), thresholds
