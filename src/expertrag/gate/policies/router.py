"""`router`: retrieve when the MoE router's affinity for the retrieval expert is high."""

from __future__ import annotations

from expertrag.errors import ExpertRAGError
from expertrag.gate.features import probe_features
from expertrag.gate.models import GateArtifactError, GateModel, RouterGate
from expertrag.gate.policies.artifacts import ARTIFACTS, TRAIN_HINT, tuned_threshold
from expertrag.gate.policies.base import Policy
from expertrag.gate.types import Decision, GateContext, Probe


class RouterPolicy(Policy):
    """Retrieve when the MoE router's affinity for the retrieval expert >= threshold. Score: the affinity."""

    name = "router"

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def requires(self) -> frozenset[str]:
        return frozenset({"retrieval_affinity"})

    def decide(self, ctx: GateContext) -> Decision:
        probe: Probe = ctx.probe()
        if probe.retrieval_affinity is None:
            raise ExpertRAGError("policy 'router' needs a model with a retrieval expert (the probe reported no "
                                 "retrieval_affinity); set model.checkpoint to a checkpoint from `expertrag train lm`, "
                                 "or pick another policy")
        a = float(probe.retrieval_affinity)
        return Decision(retrieve=a >= self.threshold, score=a, stage="probe", policy=self.name,
                        features=probe_features(probe))

    @classmethod
    def from_config(cls, config, artifacts_dir):
        def check(g: GateModel) -> float:
            if not isinstance(g, RouterGate):
                raise GateArtifactError(f"{artifacts_dir}/{ARTIFACTS['router']}: not a router gate; {TRAIN_HINT}")
            return g.threshold
        return cls(tuned_threshold(config.router_threshold, artifacts_dir, "router", cls.name, check))
