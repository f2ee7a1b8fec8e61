"""`flare`: FLARE's low-probability-token trigger (Jiang et al. 2023) on the closed-book draft."""

from __future__ import annotations

import math

from expertrag.gate.features import probe_features
from expertrag.gate.policies.base import Policy
from expertrag.gate.types import Decision, GateContext


class FlarePolicy(Policy):
    """FLARE's trigger: retrieve when any drafted token has probability < theta (an empty draft retrieves).
    Score: 1 - the smallest token probability."""

    name = "flare"

    def __init__(self, theta: float = 0.2):
        self.theta = float(theta)

    def requires(self) -> frozenset[str]:
        return frozenset({"logprobs"})

    def decide(self, ctx: GateContext) -> Decision:
        probe = ctx.probe()
        f = probe_features(probe)
        if not probe.logprobs:
            return Decision(retrieve=True, score=1.0, stage="probe", policy=self.name, features=f)
        p_min = math.exp(f["min_logprob"])
        return Decision(retrieve=p_min < self.theta, score=1.0 - p_min, stage="probe", policy=self.name,
                        features=f)

    @classmethod
    def from_config(cls, config, artifacts_dir):
        return cls(config.flare_threshold)
