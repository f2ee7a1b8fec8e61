"""Reciprocal-rank fusion (Cormack et al., 2009): score(d) = sum_r w_r / (k + rank_r(d))."""

from __future__ import annotations

from collections.abc import Sequence


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], weights: Sequence[float], k: int = 60
                           ) -> list[tuple[int, float]]:
    """Fuse ranked id lists (best first) into one list of (id, fused score), best first.

    Ties break by the first ranking's order, then by id, so the result is deterministic."""
    if len(rankings) != len(weights):
        raise ValueError("one weight per ranking")
    scores: dict[int, float] = {}
    first_seen: dict[int, tuple[int, int]] = {}
    for r, (ranking, weight) in enumerate(zip(rankings, weights, strict=True)):
        for rank, doc in enumerate(ranking, start=1):
            scores[doc] = scores.get(doc, 0.0) + weight / (k + rank)
            first_seen.setdefault(doc, (r, rank))
    return sorted(scores.items(), key=lambda item: (-item[1], first_seen[item[0]], item[0]))
