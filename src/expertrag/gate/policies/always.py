"""`always`: retrieve for every question (standard RAG)."""

from __future__ import annotations

from expertrag.gate.policies.base import Policy
from expertrag.gate.types import Decision, GateContext


class AlwaysPolicy(Policy):
    name = "always"

    def decide(self, ctx: GateContext) -> Decision:
        return Decision(retrieve=True, score=1.0, stage="fixed", policy=self.name)
