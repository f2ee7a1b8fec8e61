"""`never`: answer closed-book, always (the lower baseline)."""

from __future__ import annotations

from expertrag.gate.policies.base import Policy
from expertrag.gate.types import Decision, GateContext


class NeverPolicy(Policy):
    name = "never"

    def decide(self, ctx: GateContext) -> Decision:
        return Decision(retrieve=False, score=0.0, stage="fixed", policy=self.name)
