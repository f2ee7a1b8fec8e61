"""`LogisticGate`: standardisation + L2 logistic regression (scikit-learn), weights exported as arrays."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from expertrag.gate.features import FeatureSpec
from expertrag.gate.models.artifacts import vec
from expertrag.gate.models.base import GateModel
from expertrag.gate.models.scoring import check_binary, standardisation


class LogisticGate(GateModel):
    """Standardisation + L2 logistic regression (scikit-learn lbfgs); weights exported as arrays."""

    kind = "logistic"

    def __init__(self, spec: FeatureSpec, c: float = 1.0, class_weight: Literal["balanced", "none"] = "balanced"):
        super().__init__(spec)
        self.c = float(c)
        self.class_weight = class_weight
        self.mean = np.zeros(spec.dim)
        self.std = np.ones(spec.dim)
        self.coef = np.zeros(spec.dim)
        self.intercept = 0.0

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean) / self.std) @ self.coef + self.intercept

    def fit(self, X: Any, y: Any) -> LogisticGate:
        from sklearn.linear_model import LogisticRegression

        X = self._check_X(X)
        yy = check_binary(y, X.shape[0])
        self.mean, self.std = standardisation(X)
        lr = LogisticRegression(C=self.c, class_weight=None if self.class_weight == "none" else "balanced",
                                max_iter=2000)
        lr.fit((X - self.mean) / self.std, yy)
        self.coef, self.intercept = lr.coef_[0].astype(np.float64), float(lr.intercept_[0])
        self.decision_threshold, self.calibrator = 0.5, None
        return self

    def load_torch(self, net: Any) -> None:
        """Take coef/intercept from a torch Linear(dim, 1) (see gate.models.torch_nets)."""
        sd = net.state_dict()
        self.coef = sd["weight"].detach().cpu().numpy()[0].astype(np.float64)
        self.intercept = float(sd["bias"].item())

    def _params(self):
        return {"c": self.c, "class_weight": self.class_weight}

    def _tensors(self):
        return {"mean": self.mean, "std": self.std, "coef": self.coef, "intercept": np.array([self.intercept])}

    @classmethod
    def _restore(cls, spec, params, tensors):
        g = cls(spec, float(params["c"]), params["class_weight"])
        g.mean, g.std, g.coef = (vec(tensors, k, spec.dim) for k in ("mean", "std", "coef"))
        g.intercept = float(vec(tensors, "intercept", 1)[0])
        return g
