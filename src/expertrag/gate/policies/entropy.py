"""`entropy`: retrieve when the closed-book draft is uncertain (mean token entropy over a threshold)."""

from __future__ import annotations

from expertrag.gate.features import probe_features
from expertrag.gate.models import GateArtifactError, GateModel, ThresholdGate
from expertrag.gate.policies.artifacts import ARTIFACTS, TRAIN_HINT, tuned_threshold
from expertrag.gate.policies.base import Policy
from expertrag.gate.types import Decision, GateContext


class EntropyPolicy(Policy):
    """Retrieve when the closed-book draft's mean token entropy >= threshold (an empty draft retrieves).
    Score: the mean token entropy (nats)."""

    name = "entropy"

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def requires(self) -> frozenset[str]:
        return frozenset({"entropy_approx"})  # a top-k approximation works, with a warning at start-up

    def decide(self, ctx: GateContext) -> Decision:
        probe = ctx.probe()
        f = probe_features(probe)
        h = f["mean_token_entropy"]
        r = not probe.entropies or h >= self.threshold
        return Decision(retrieve=r, score=h, stage="probe", policy=self.name, features=f)

    @classmethod
    def from_config(cls, config, artifacts_dir):
        def check(g: GateModel) -> float:
            if not (isinstance(g, ThresholdGate) and g.feature == "mean_token_entropy" and g.direction == "above"):
                raise GateArtifactError(f"{artifacts_dir}/{ARTIFACTS['entropy']}: not a threshold on "
                                        f"mean_token_entropy (above); {TRAIN_HINT}")
            return g.threshold
        return cls(tuned_threshold(config.entropy_threshold, artifacts_dir, "entropy", cls.name, check))
