"""`RouterGate`: the MoE router's affinity for the retrieval expert is the score (the router baseline)."""

from __future__ import annotations

from typing import Any

import numpy as np

from expertrag.gate.features import FeatureSpec
from expertrag.gate.models.base import GateModel
from expertrag.gate.models.scoring import EPS, best_threshold, check_binary, logit


class RouterGate(GateModel):
    """The retrieval expert's router affinity is the score: retrieve iff affinity >= threshold."""

    kind = "router"
    feature = "retrieval_affinity"

    def __init__(self, threshold: float = 0.5):
        super().__init__(FeatureSpec((self.feature,)), decision_threshold=threshold)

    @property
    def threshold(self) -> float:
        return self.decision_threshold

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return logit(X[:, 0])

    def fit(self, X: Any, y: Any, target_rate: float | None = None) -> RouterGate:
        X = self._check_X(X)
        yy = check_binary(y, X.shape[0])
        self.calibrator = None
        self.decision_threshold = best_threshold(np.clip(X[:, 0], EPS, 1 - EPS), yy, target_rate)
        return self

    @classmethod
    def _restore(cls, spec, params, tensors):
        return cls()
