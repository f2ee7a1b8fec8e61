"""Routing statistics per layer and expert, and a collapse detector whose flags a caller can log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from expertrag.moe.types import MoEAux


@dataclass
class LayerStats:
    """token_share[i]: fraction of the kept FFN token-slots that expert i got (sums to 1; uniform = 1/E).
    mean_prob[i]: mean router probability of slot i over all slots, retrieval slot last if present.
    router_entropy: mean per-token entropy (nats) of the router softmax over all slots.
    retrieval_rate: fraction of tokens that used the retrieval expert (None without one)."""

    layer: int
    token_share: list[float]
    mean_prob: list[float]
    router_entropy: float
    retrieval_rate: float | None
    dropped_tokens: int


@dataclass
class CollapseFlag:
    layer: int
    expert: int
    kind: Literal["starved", "dominant"]
    share: float
    threshold: float

    def message(self) -> str:
        rel = "<" if self.kind == "starved" else ">"
        return (
            f"layer {self.layer} expert {self.expert} {self.kind}: token share {self.share:.3f} "
            f"{rel} {self.threshold:.3f}"
        )


@torch.no_grad()
def layer_stats(aux: MoEAux, layer: int = 0) -> LayerStats:
    logits = aux.router_logits.float()
    has_r = aux.retrieval_affinity is not None
    e = logits.shape[-1] - int(has_r)
    counts = aux.tokens_per_expert.float()
    ffn = counts[:e]
    share = ffn / ffn.sum().clamp(min=1.0)
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1).mean()
    n = logits.shape[0]
    return LayerStats(
        layer=layer,
        token_share=share.tolist(),
        mean_prob=p.mean(0).tolist(),
        router_entropy=float(entropy),
        retrieval_rate=float(counts[e] / max(n, 1)) if has_r else None,
        dropped_tokens=int(aux.dropped_tokens),
    )


def collapse_flags(
    stats: LayerStats | Sequence[LayerStats],
    starved_below: float | None = None,
    dominant_above: float = 0.5,
) -> list[CollapseFlag]:
    """Experts whose token share is < starved_below (default 1/(4E)) or > dominant_above (0.5).

    Shares are of token-slots, so with top_k >= 2 no expert can exceed 1/k: a collapse onto k experts
    then shows up as the other experts being starved.
    """
    items = [stats] if isinstance(stats, LayerStats) else list(stats)
    flags: list[CollapseFlag] = []
    for s in items:
        e = len(s.token_share)
        lo = 1.0 / (4 * e) if starved_below is None else starved_below
        for i, share in enumerate(s.token_share):
            if share < lo:
                flags.append(CollapseFlag(s.layer, i, "starved", share, lo))
            elif share > dominant_above:
                flags.append(CollapseFlag(s.layer, i, "dominant", share, dominant_above))
    return flags
