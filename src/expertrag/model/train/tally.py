"""RoutingTally: routing counts per MoE layer and retrieval-expert counts per example kind, accumulated
over steps (and saved with the training state so a resumed run reports what an uninterrupted one does)."""

from __future__ import annotations

from typing import Any

import torch

from expertrag.model.train.examples import KINDS


class RoutingTally:
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
