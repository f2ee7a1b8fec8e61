"""Router probabilities (any MoE implementation) -> the typed `RouterStats`, and the question's token span.

Both torch backends use this: ours from `MoEAux.router_logits`, transformers' from `router_logits`
(`output_router_logits=True`). The statistics are over a chosen set of prompt tokens; the pipeline asks for
the question's tokens so the chat template and system prompt, identical for every question, do not dilute
the signal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from expertrag.model.backend import LayerRouterStats, RouterStats


def router_stats(probs: Mapping[int, torch.Tensor], span: Literal["question", "prompt"], *,
                 affinity: Mapping[int, float] | None = None,
                 usage: Mapping[int, Sequence[float]] | None = None) -> RouterStats | None:
    """probs: MoE layer index -> [T, E] router probabilities of the counted tokens (the same T per layer)."""
    layers: dict[int, LayerRouterStats] = {}
    tops: dict[int, torch.Tensor] = {}
    n_tok = 0
    for li, p in sorted(probs.items()):
        p = p.float()
        if p.ndim != 2 or p.shape[0] == 0:
            continue
        n_tok = int(p.shape[0])
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        top = p.argmax(-1)
        tops[li] = top
        share = torch.bincount(top, minlength=p.shape[1]).float() / n_tok
        layers[li] = LayerRouterStats(float(ent), [round(float(s), 4) for s in share],
                                      None if affinity is None else affinity.get(li))
    if not layers:
        return None
    order = sorted(tops)
    agree = None
    if len(order) > 1:
        agree = float(torch.stack([(tops[a] == tops[b]).float().mean() for a, b in zip(order, order[1:], strict=False)
                                   ]).mean())
    use = {li: [round(float(s), 4) for s in usage[li]] for li in usage} if usage is not None else \
        {li: s.expert_share for li, s in layers.items()}
    return RouterStats(layers, agree, span, n_tok, use)


def span_token_mask(tokenizer: Any, text: str, add_special_tokens: bool, ids: Sequence[int], span: str
                    ) -> list[bool] | None:
    """Which of `ids` (= tokenizer(text, add_special_tokens=...)) cover the last occurrence of `span` in
    `text`; None when it does not occur or the tokenizer gives no offsets (then count the whole prompt)."""
    start = text.rfind(span) if span else -1
    if start < 0:
        return None
    end = start + len(span)
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return None
    if list(enc["input_ids"]) != list(ids):
        return None
    mask = [a < end and b > start and b > a for a, b in enc["offset_mapping"]]
    return mask if any(mask) else None
