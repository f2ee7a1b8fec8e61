"""Expert utilisation over a run: the MoE routers' token shares per layer, their entropy and collapse flags."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from expertrag.eval.metrics import mean_or_nan


def expert_utilisation(usages: Iterable[Mapping[str, Any]], dominant_above: float = 0.5) -> dict[str, Any] | None:
    """Mean per-layer token share (one vector per answer, averaged), the entropy of the FFN experts'
    share (nats, and divided by log E), the retrieval expert's mean share, and collapse flags. None when no
    answer reported expert shares (a dense model)."""
    from expertrag.moe.stats import LayerStats, collapse_flags

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    with_r: dict[str, bool] = {}
    r_shares = []
    for u in usages:
        layers = (u or {}).get("layers") or {}
        has_r = (u or {}).get("retrieval_expert_share") is not None
        if has_r:
            r_shares.append(float(u["retrieval_expert_share"]))
        for layer, share in layers.items():
            v = np.asarray(share, dtype=np.float64)
            if layer in sums and sums[layer].shape != v.shape:
                continue  # a different model's answer: ignore rather than mix
            sums[layer] = sums.get(layer, 0) + v
            counts[layer] = counts.get(layer, 0) + 1
            with_r[layer] = with_r.get(layer, False) or has_r
    if not sums:
        return None
    out_layers = {}
    stats = []
    for layer in sorted(sums, key=lambda s: int(s) if s.lstrip("-").isdigit() else s):
        mean = sums[layer] / counts[layer]
        ffn = mean[:-1] if with_r[layer] and mean.size > 1 else mean
        p = ffn / ffn.sum() if ffn.sum() > 0 else ffn
        nz = p[p > 0]
        ent = float(-(nz * np.log(nz)).sum())
        out_layers[layer] = {"share": [round(float(x), 5) for x in mean], "entropy": ent,
                             "normalized_entropy": ent / math.log(p.size) if p.size > 1 else float("nan"),
                             "retrieval_share": float(mean[-1]) if with_r[layer] else None,
                             "answers": counts[layer]}
        lid = int(layer) if layer.lstrip("-").isdigit() else len(stats)
        stats.append(LayerStats(layer=lid, token_share=p.tolist(), mean_prob=[], router_entropy=float("nan"),
                                retrieval_rate=None, dropped_tokens=0))
    flags = collapse_flags(stats, dominant_above=dominant_above)
    return {"layers": out_layers, "retrieval_slot": any(with_r.values()),
            "retrieval_expert_share": mean_or_nan(r_shares) if r_shares else None,
            "collapse": [f.message() for f in flags], "collapsed_layers": sorted({f.layer for f in flags})}
