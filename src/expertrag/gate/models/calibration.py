"""The calibrator: a map from a gate's raw log-odds z to a probability, fitted on held-out rows.

- "platt" (default): sigmoid(a*z + b) fitted by logistic regression with Platt's smoothed targets. It is
  strictly monotone (a > 0), so it never changes the ranking (AUROC) and works on small splits; where the
  split's best slope is <= 0 (it ranks against the model: seen with ~3 positives in 69 rows) the slope is
  fixed at 1 and only the offset is fitted, rather than inverting the ranking learned on the training rows;
- "isotonic": a monotone step-linear map (can merge nearby scores into ties; needs more data).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from expertrag.gate.models.scoring import check_binary, sigmoid


def _fit_offset(z: np.ndarray, t: np.ndarray, steps: int = 50) -> float:
    """b minimising the log loss of sigmoid(z + b) against soft targets t (Newton's method; convex in b)."""
    b = 0.0
    for _ in range(steps):
        p = sigmoid(z + b)
        h = float(np.sum(p * (1 - p)))
        if h < 1e-12:
            break
        step = float(np.sum(p - t)) / h
        b -= float(np.clip(step, -5.0, 5.0))
        if abs(step) < 1e-10:
            break
    return b


@dataclass
class Calibrator:
    """Maps raw log-odds to a calibrated probability (see the module doc)."""

    method: Literal["platt", "isotonic"]
    a: float = 1.0
    b: float = 0.0
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)

    @classmethod
    def fit(cls, z: Any, y: Any, method: str = "platt") -> Calibrator:
        z = np.asarray(z, dtype=np.float64).ravel()
        yy = check_binary(y, z.size)
        if method == "platt":
            from sklearn.linear_model import LogisticRegression

            n_pos = int(yy.sum())
            n_neg = yy.size - n_pos
            hi, lo = (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2)  # Platt's smoothed targets
            t = np.where(yy == 1, hi, lo)
            xx = np.concatenate([z, z]).reshape(-1, 1)
            lab = np.concatenate([np.ones_like(yy), np.zeros_like(yy)])
            w = np.concatenate([t, 1 - t])
            lr = LogisticRegression(C=1e6, max_iter=1000).fit(xx, lab, sample_weight=w)
            a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
            if a <= 0:
                # The split ranks against the model (small splits with few positives do): a negative slope
                # would invert the ranking learned on the training rows. Keep the ranking; fit the base rate.
                a, b = 1.0, _fit_offset(z, t)
            return cls("platt", a=a, b=b)
        if method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(z, yy)
            return cls("isotonic", xs=[float(x) for x in iso.X_thresholds_],
                       ys=[float(x) for x in iso.y_thresholds_])
        raise ValueError(f"unknown calibration method {method!r}; use 'platt' or 'isotonic'")

    def __call__(self, z: Any) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        if self.method == "platt":
            return sigmoid(self.a * z + self.b)
        return np.interp(z, np.asarray(self.xs), np.asarray(self.ys))

    def to_dict(self) -> dict[str, Any]:
        if self.method == "platt":
            return {"method": "platt", "a": self.a, "b": self.b}
        return {"method": "isotonic", "xs": self.xs, "ys": self.ys}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibrator:
        if d["method"] == "platt":
            return cls("platt", a=float(d["a"]), b=float(d["b"]))
        if d["method"] == "isotonic":
            xs, ys = [float(x) for x in d["xs"]], [float(x) for x in d["ys"]]
            if len(xs) != len(ys) or not xs:
                raise ValueError("isotonic calibrator needs equally many xs and ys")
            return cls("isotonic", xs=xs, ys=ys)
        raise ValueError(f"unknown calibration method {d['method']!r}")
