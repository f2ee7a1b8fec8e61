"""RoutingTally: routing counts per MoE layer and retrieval-expert counts per example kind, accumulated
over steps (and saved with the training state so a resumed run reports what an uninterrupted one does)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from expertrag.model.train.examples import KINDS
from expertrag.moe.types import MoEAux


class RoutingTally:
    """Expert pick counts [layers, E] and, per example kind, [tokens, fire, want, affinity sum]."""

    def __init__(self, layers: list[int], num_experts: int):
        self.layers, self.e = layers, num_experts
        self.counts = torch.zeros(len(layers), num_experts, dtype=torch.float64)
        # per kind: [tokens, fire, want, affinity sum] summed over MoE layers
        self.retr = {k: [0.0, 0.0, 0.0, 0.0] for k in KINDS}

    def reset_counts(self) -> None:
        self.counts.zero_()

    def state(self) -> dict[str, Any]:
        return {"counts": self.counts.clone(), "retr": {k: list(v) for k, v in self.retr.items()}}

    def load(self, s: dict[str, Any]) -> None:
        self.counts.copy_(s["counts"])
        self.retr = {k: list(v) for k, v in s["retr"].items()}

    def shares(self) -> list[list[float]]:
        return (self.counts / self.counts.sum(1, keepdim=True).clamp(min=1)).tolist()

    def retrieval(self) -> dict[str, dict[str, float]]:
        out = {}
        for k, (tok, fire, want, aff) in self.retr.items():
            if tok:
                out[k] = {"tokens": int(tok / max(len(self.layers), 1)), "fire_rate": fire / tok,
                          "want_rate": want / tok, "mean_affinity": aff / tok}
        return out


@torch.no_grad()
def tally_routing(sinks: Sequence[RoutingTally], auxes: Sequence[MoEAux], mask: torch.Tensor,
                  kind_rows: Mapping[str, torch.Tensor], has_passages: torch.Tensor, num_experts: int,
                  top_k: int) -> None:
    """Add one micro-batch's routing to every sink, over real tokens only (mask [B, T]): per MoE layer the
    top-k FFN expert picks, and per example kind (kind_rows: [B] bool each) how many tokens the router wants
    the retrieval expert for, how many it fires for (passages present: has_passages [B]) and the mean
    retrieval affinity."""
    e, k = num_experts, top_k
    B, T = mask.shape
    flat_mask = mask.reshape(-1)
    for li, a in enumerate(auxes):
        rl = a.router_logits
        top = rl[:, :e].topk(k, dim=-1)
        counts = torch.bincount(top.indices[flat_mask].reshape(-1), minlength=e).double().cpu()
        for st in sinks:
            st.counts[li] += counts
        if rl.shape[1] > e:
            want = (rl[:, e] > top.values[:, -1]).view(B, T)
            fire = want & has_passages[:, None]
            aff = torch.softmax(rl.float(), -1)[:, e].view(B, T)
            for kd, rows in kind_rows.items():
                m = mask & rows[:, None]
                if bool(m.any()):
                    add = (float(m.sum()), float((fire & m).sum()), float((want & m).sum()), float((aff * m).sum()))
                    for st in sinks:
                        st.retr[kd] = [x + y for x, y in zip(st.retr[kd], add, strict=True)]
