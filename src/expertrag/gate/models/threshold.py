"""`ThresholdGate`: one scalar feature against a threshold (the entropy baseline's tuned threshold)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from expertrag.classification import auroc
from expertrag.gate.features import FeatureSpec
from expertrag.gate.models.base import GateModel
from expertrag.gate.models.scoring import best_threshold, check_binary


class ThresholdGate(GateModel):
    """One scalar feature against a threshold: retrieve iff value >= threshold ("above") or <= ("below").

    score = sigmoid(sign * (value - threshold) / scale), 0.5 exactly at the threshold; scale is the
    feature's training std (1 until fitted).
    """

    kind = "threshold"

    def __init__(self, feature: str, threshold: float = 0.0,
                 direction: Literal["above", "below", "auto"] = "above", scale: float = 1.0):
        super().__init__(FeatureSpec((feature,)))
        if direction not in ("above", "below", "auto"):
            raise ValueError(f"direction must be 'above', 'below' or 'auto', got {direction!r}")
        self.feature = feature
        self.threshold = float(threshold)
        self.direction = direction
        self.scale = float(scale)

    @property
    def _sign(self) -> float:
        return -1.0 if self.direction == "below" else 1.0

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return self._sign * (X[:, 0] - self.threshold) / self.scale

    def fit(self, X: Any, y: Any, target_rate: float | None = None) -> ThresholdGate:
        """Pick direction (when "auto": the one with AUROC >= 0.5) and the threshold maximising F1 of
        retrieve (or giving target_rate) on these rows."""
        X = self._check_X(X)
        yy = check_binary(y, X.shape[0])
        v = X[:, 0]
        if self.direction == "auto":
            self.direction = "above" if auroc(yy, v) >= 0.5 else "below"
        sign = self._sign
        self.threshold = sign * best_threshold(sign * v, yy, target_rate)
        std = float(v.std())
        self.scale = std if std > 1e-12 else 1.0
        self.decision_threshold, self.calibrator = 0.5, None
        return self

    def _params(self) -> dict[str, Any]:
        return {"feature": self.feature, "threshold": self.threshold, "direction": self.direction,
                "scale": self.scale}

    @classmethod
    def _restore(cls, spec, params, tensors):
        g = cls(str(params["feature"]), float(params["threshold"]), params["direction"], float(params["scale"]))
        if g.spec != spec:
            raise ValueError("spec does not match the feature")
        return g
