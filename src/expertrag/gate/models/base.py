"""`GateModel`, the base of every gate model: a feature vector -> P(retrieval needed), with a threshold.

Every model computes raw log-odds z(x); the uncalibrated score is sigmoid(z). `calibrate(X, y)` fits a
`Calibrator` (gate.models.calibration) from z to a probability on held-out data. Calibration keeps
decisions: the decision threshold is mapped through the calibrator too. Use `tune_threshold` afterwards to
choose a new one.

Subclasses set `kind` (listed in `GATE_KINDS` by the package __init__) and implement `fit`, `_logits` and the (de)serialisation hooks `_params`, `_tensors`, `_restore`.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from expertrag.gate.features import FeatureError, FeatureSpec
from expertrag.gate.models.artifacts import (
    FORMAT,
    VERSION,
    GateArtifactError,
    check_version,
    read_json_artifact,
    read_tensors,
    write_json_atomic,
    write_tensors,
)
from expertrag.gate.models.calibration import Calibrator
from expertrag.gate.models.scoring import best_threshold, logit, sigmoid

# kind -> class, the table `load_gate` dispatches on; filled by the package __init__ (importing any module
# of the package runs it first, so the table is complete whenever load_gate can be called).
GATE_KINDS: dict[str, type[GateModel]] = {}


class GateModel(ABC):
    """Base of all gate models (see the module doc)."""

    kind: ClassVar[str]

    def __init__(self, spec: FeatureSpec, decision_threshold: float = 0.5):
        self.spec = spec
        self.decision_threshold = float(decision_threshold)
        self.calibrator: Calibrator | None = None

    # -- scoring
    def _check_X(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != self.spec.dim:
            raise FeatureError(f"{self.kind} gate expects {self.spec.dim} features per row, got shape {X.shape}")
        return X

    @abstractmethod
    def _logits(self, X: np.ndarray) -> np.ndarray:
        """Raw log-odds that retrieval is needed, one per row."""

    @abstractmethod
    def fit(self, X: Any, y: Any) -> GateModel:
        """Fit on feature rows X and targets y (1 = retrieval needed). Resets calibration."""

    def logits(self, X: Any) -> np.ndarray:
        return self._logits(self._check_X(X))

    def score_batch(self, X: Any) -> np.ndarray:
        """P(retrieval needed) per row (calibrated when `calibrate` was called)."""
        z = self.logits(X)
        return self.calibrator(z) if self.calibrator is not None else sigmoid(z)

    def score(self, x: Any) -> float:
        return float(self.score_batch(np.asarray(x, dtype=np.float64).reshape(1, -1))[0])

    def decide(self, score: float) -> bool:
        return bool(score >= self.decision_threshold)

    def predict_batch(self, X: Any) -> np.ndarray:
        return self.score_batch(X) >= self.decision_threshold

    # -- post-hoc
    def calibrate(self, X: Any, y: Any, method: str = "platt") -> GateModel:
        """Fit the calibrator on held-out rows; the decision threshold is carried through it.
        A gate is calibrated once (refit it to calibrate again)."""
        if self.calibrator is not None:
            raise ValueError(f"{self.kind} gate is already calibrated; fit it again before re-calibrating")
        z = self.logits(X)
        z0 = logit(self.decision_threshold)
        self.calibrator = Calibrator.fit(z, y, method)
        self.decision_threshold = float(self.calibrator(z0))
        return self

    def tune_threshold(self, X: Any, y: Any, target_rate: float | None = None) -> float:
        """Choose the decision threshold on these rows (max F1 of retrieve, or a target retrieval rate)."""
        self.decision_threshold = best_threshold(self.score_batch(X), y, target_rate)
        return self.decision_threshold

    # -- persistence
    def _params(self) -> dict[str, Any]:
        return {}

    def _tensors(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    @abstractmethod
    def _restore(cls, spec: FeatureSpec, params: dict[str, Any], tensors: dict[str, np.ndarray]) -> GateModel:
        ...

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `path` (JSON) and, for models with weights, `path` with suffix .safetensors (written first)."""
        path = Path(path)
        doc: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "spec": self.spec.to_dict(),
            "decision_threshold": self.decision_threshold,
            "calibrator": self.calibrator.to_dict() if self.calibrator else None,
            "params": self._params(), "tensors": None,
        }
        tensors = self._tensors()
        if tensors:
            doc["tensors"] = write_tensors(path.with_suffix(".safetensors"), tensors)
        write_json_atomic(path, doc)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GateModel:
        model = load_gate(path)
        if cls is not GateModel and not isinstance(model, cls):
            raise GateArtifactError(f"{path}: holds a '{model.kind}' gate, expected '{cls.kind}'")
        return model


def load_gate(path: str | os.PathLike[str]) -> GateModel:
    """Load any gate model written by `GateModel.save`, dispatching on its kind."""
    path = Path(path)
    doc = read_json_artifact(path, "gate file")
    check_version(path, doc, FORMAT, "gate file")
    kind = doc.get("kind")
    if kind not in GATE_KINDS:
        raise GateArtifactError(f"{path}: unknown gate kind {kind!r}; known: {', '.join(GATE_KINDS)}")
    tref = doc.get("tensors")
    tensors = read_tensors(path, tref) if tref is not None else {}
    try:
        spec = FeatureSpec.from_dict(doc["spec"])
        model = GATE_KINDS[kind]._restore(spec, dict(doc.get("params") or {}), tensors)
        model.decision_threshold = float(doc["decision_threshold"])
        if not math.isfinite(model.decision_threshold):
            raise ValueError("decision_threshold is not finite")
        cal = doc.get("calibrator")
        model.calibrator = Calibrator.from_dict(cal) if cal is not None else None
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise GateArtifactError(f"{path}: corrupt gate file: {e}") from None
    return model
