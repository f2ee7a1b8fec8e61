"""Gate models: a feature vector -> P(retrieval needed), with a decision threshold.

Every model computes raw log-odds z(x); the uncalibrated score is sigmoid(z). `calibrate(X, y)` fits a map
from z to a probability on held-out data:
- "platt" (default): sigmoid(a*z + b) fitted by logistic regression with Platt's smoothed targets. It is
  strictly monotone (a > 0), so it never changes the ranking (AUROC) and works on small splits; where the
  split's best slope is <= 0 (it ranks against the model: seen with ~3 positives in 69 rows) the slope is
  fixed at 1 and only the offset is fitted, rather than inverting the ranking learned on the training rows;
- "isotonic": a monotone step-linear map (can merge nearby scores into ties; needs more data).
Calibration keeps decisions: the decision threshold is mapped through the calibrator too. Use
`tune_threshold` afterwards to choose a new one.

Files: `<name>.json` (format, version, kind, FeatureSpec, threshold, calibrator, hyper-parameters) plus
`<name>.safetensors` for weight arrays (sha256 recorded in the JSON, which is written last). No pickle.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from expertrag.errors import ExpertRAGError
from expertrag.classification import auroc
from expertrag.fileio import sha256_file
from expertrag.gate.features import FeatureError, FeatureSpec

FORMAT = "expertrag-gate"
VERSION = 1
_EPS = 1e-12


class GateArtifactError(ExpertRAGError):
    """A missing, corrupt or incompatible gate artifact (the message names the file)."""


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _check_binary(y: Any, n: int) -> np.ndarray:
    yy = np.asarray(y).ravel()
    if yy.size != n:
        raise ValueError(f"{n} feature rows but {yy.size} labels")
    if not np.isin(yy, (0, 1)).all():
        raise ValueError("labels must be 0/1 (1 = retrieval needed)")
    yy = yy.astype(np.int64)
    if n and (yy.min() == yy.max()):
        raise ValueError("training data has only one class; a gate needs questions of both kinds")
    return yy


def best_threshold(values: Any, y: Any, target_rate: float | None = None) -> float:
    """Threshold t for the rule "retrieve iff value >= t" on training data.

    Candidates: the smallest value (retrieve all), midpoints between consecutive distinct values, and just
    above the largest (retrieve none). Maximises F1 of "retrieve", or, with target_rate, matches that
    retrieval rate as closely as possible. Ties go to the higher threshold (fewer retrievals).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    yb = np.asarray(y).astype(bool).ravel()
    if v.size == 0 or v.size != yb.size:
        raise ValueError(f"need equally many values and labels, got {v.size} and {yb.size}")
    u = np.unique(v)
    cands = np.concatenate([[u[0]], (u[:-1] + u[1:]) / 2, [np.nextafter(u[-1], np.inf)]])
    sv, sp = np.sort(v), np.sort(v[yb])
    n_pred = np.append(v.size - np.searchsorted(sv, u, "left"), 0)
    tp = np.append(sp.size - np.searchsorted(sp, u, "left"), 0)
    if target_rate is not None:
        obj = -np.abs(n_pred / v.size - target_rate)
    else:
        denom = n_pred + sp.size
        obj = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    i = len(obj) - 1 - int(np.argmax(obj[::-1]))
    return float(cands[i])


# ---------------------------------------------------------------------------------------------- calibration


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
        yy = _check_binary(y, z.size)
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


# ------------------------------------------------------------------------------------------------ the models


def standardisation(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std (std 1 for constant columns)."""
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)


class GateModel(ABC):
    """Base of all gate models. Subclasses implement `fit`, `_logits` and the (de)serialisation hooks."""

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
        """Write `path` (JSON) and, for models with weights, `path` with suffix .safetensors."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "spec": self.spec.to_dict(),
            "decision_threshold": self.decision_threshold,
            "calibrator": self.calibrator.to_dict() if self.calibrator else None,
            "params": self._params(), "tensors": None,
        }
        tensors = self._tensors()
        if tensors:
            tpath = path.with_suffix(".safetensors")
            tmp = tpath.with_name(tpath.name + ".tmp")
            save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, tpath)
            doc["tensors"] = {"file": tpath.name, "sha256": sha256_file(tpath)}
        write_json_atomic(path, doc)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GateModel:
        model = load_gate(path)
        if cls is not GateModel and not isinstance(model, cls):
            raise GateArtifactError(f"{path}: holds a '{model.kind}' gate, expected '{cls.kind}'")
        return model


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
        yy = _check_binary(y, X.shape[0])
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
        yy = _check_binary(y, X.shape[0])
        self.calibrator = None
        self.decision_threshold = best_threshold(np.clip(X[:, 0], _EPS, 1 - _EPS), yy, target_rate)
        return self

    @classmethod
    def _restore(cls, spec, params, tensors):
        return cls()


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
        yy = _check_binary(y, X.shape[0])
        self.mean, self.std = standardisation(X)
        lr = LogisticRegression(C=self.c, class_weight=None if self.class_weight == "none" else "balanced",
                                max_iter=2000)
        lr.fit((X - self.mean) / self.std, yy)
        self.coef, self.intercept = lr.coef_[0].astype(np.float64), float(lr.intercept_[0])
        self.decision_threshold, self.calibrator = 0.5, None
        return self

    def _params(self):
        return {"c": self.c, "class_weight": self.class_weight}

    def _tensors(self):
        return {"mean": self.mean, "std": self.std, "coef": self.coef, "intercept": np.array([self.intercept])}

    @classmethod
    def _restore(cls, spec, params, tensors):
        g = cls(spec, float(params["c"]), params["class_weight"])
        g.mean, g.std, g.coef = (_vec(tensors, k, spec.dim) for k in ("mean", "std", "coef"))
        g.intercept = float(_vec(tensors, "intercept", 1)[0])
        return g


class MLPGate(GateModel):
    """Standardisation + one tanh hidden layer, trained in torch (Adam, BCE with class weighting),
    evaluated in numpy from the exported weights."""

    kind = "mlp"

    def __init__(self, spec: FeatureSpec, hidden: int = 32, epochs: int = 300, lr: float = 0.01,
                 weight_decay: float = 1e-4, class_weight: Literal["balanced", "none"] = "balanced", seed: int = 0):
        super().__init__(spec)
        self.hidden, self.epochs, self.lr, self.weight_decay = int(hidden), int(epochs), float(lr), float(weight_decay)
        self.class_weight, self.seed = class_weight, int(seed)
        self.mean, self.std = np.zeros(spec.dim), np.ones(spec.dim)
        self.w1 = np.zeros((self.hidden, spec.dim))
        self.b1 = np.zeros(self.hidden)
        self.w2 = np.zeros((1, self.hidden))
        self.b2 = np.zeros(1)

    def _logits(self, X: np.ndarray) -> np.ndarray:
        h = np.tanh(((X - self.mean) / self.std) @ self.w1.T + self.b1)
        return h @ self.w2[0] + self.b2[0]

    def fit(self, X: Any, y: Any) -> MLPGate:
        import torch

        X = self._check_X(X)
        yy = _check_binary(y, X.shape[0])
        self.mean, self.std = standardisation(X)
        net = make_torch_net("mlp", self.spec.dim, self.hidden, self.seed)
        xt = torch.from_numpy((X - self.mean) / self.std)
        yt = torch.from_numpy(yy.astype(np.float64))
        n_pos = float(yy.sum())
        pw = (len(yy) - n_pos) / n_pos if self.class_weight == "balanced" else 1.0
        sp = torch.nn.functional.softplus  # BCE with logits, pos_weight pw: -log sigmoid(z) = softplus(-z)
        opt = Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        with torch_single_thread():
            for _ in range(self.epochs):
                opt.zero_grad()
                z = net(xt).squeeze(1)
                loss = (pw * yt * sp(-z) + (1 - yt) * sp(z)).mean()
                loss.backward()
                opt.step()
        self._load_net(net)
        self.decision_threshold, self.calibrator = 0.5, None
        return self

    def _load_net(self, net: Any) -> None:
        sd = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in net.state_dict().items()}
        self.w1, self.b1, self.w2, self.b2 = sd["0.weight"], sd["0.bias"], sd["2.weight"], sd["2.bias"]

    def _params(self):
        return {"hidden": self.hidden, "epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
                "class_weight": self.class_weight, "seed": self.seed}

    def _tensors(self):
        return {"mean": self.mean, "std": self.std, "w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    @classmethod
    def _restore(cls, spec, params, tensors):
        g = cls(spec, int(params["hidden"]), int(params["epochs"]), float(params["lr"]),
                float(params["weight_decay"]), params["class_weight"], int(params["seed"]))
        h, d = g.hidden, spec.dim
        g.mean, g.std = _vec(tensors, "mean", d), _vec(tensors, "std", d)
        g.w1, g.b1 = _arr(tensors, "w1", (h, d)), _vec(tensors, "b1", h)
        g.w2, g.b2 = _arr(tensors, "w2", (1, h)), _vec(tensors, "b2", 1)
        return g


GATE_KINDS: dict[str, type[GateModel]] = {
    c.kind: c for c in (ThresholdGate, RouterGate, LogisticGate, MLPGate)
}


# ----------------------------------------------------------------------------------------- torch interop


class Adam:
    """Adam with L2 weight decay, as torch.optim.Adam computes it. Our own few lines because constructing
    torch.optim.Adam imports torch._dynamo (about 4 s), which dominates training a gate this small."""

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        self.t += 1
        b1, b2 = self.betas
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v, strict=True):
                if p.grad is None:
                    continue
                g = p.grad + self.weight_decay * p if self.weight_decay else p.grad
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.t))


@contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run a block with one intra-op torch thread, restoring the setting after. Gate nets are tiny: on a
    busy machine, waking a thread pool for each small op costs far more than the op (measured 25x slower
    on 2 shared cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def make_torch_net(kind: Literal["logistic", "mlp"], dim: int, hidden: int = 32, seed: int = 0) -> Any:
    """A float64 torch module producing one log-odds per row (Linear, or Linear-Tanh-Linear), initialised
    deterministically from `seed` without touching the global RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "logistic":
            net = torch.nn.Linear(dim, 1)
            torch.nn.init.zeros_(net.weight)
            torch.nn.init.zeros_(net.bias)
        elif kind == "mlp":
            net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        else:
            raise ValueError(f"unknown torch gate kind {kind!r}")
    return net.double()


def gate_from_torch(kind: Literal["logistic", "mlp"], net: Any, spec: FeatureSpec, mean: np.ndarray,
                    std: np.ndarray, **params: Any) -> LogisticGate | MLPGate:
    """Export a net from `make_torch_net` (fed standardised inputs) as a LogisticGate/MLPGate."""
    g: LogisticGate | MLPGate
    if kind == "logistic":
        g = LogisticGate(spec, **params)
        sd = net.state_dict()
        g.coef = sd["weight"].detach().cpu().numpy()[0].astype(np.float64)
        g.intercept = float(sd["bias"].item())
    else:
        first = net[0]
        g = MLPGate(spec, hidden=first.out_features, **params)
        g._load_net(net)
    g.mean, g.std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    return g


# ------------------------------------------------------------------------------------------------ file I/O


def write_json_atomic(path: Path, doc: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _vec(tensors: Mapping[str, np.ndarray], key: str, n: int) -> np.ndarray:
    return _arr(tensors, key, (n,))


def _arr(tensors: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in tensors:
        raise ValueError(f"tensor '{key}' missing")
    a = np.asarray(tensors[key], dtype=np.float64)
    if a.shape != shape:
        raise ValueError(f"tensor '{key}' has shape {a.shape}, expected {shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"tensor '{key}' has non-finite values")
    return a


def read_json_artifact(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """A JSON object from `path`, or a GateArtifactError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise GateArtifactError(f"{path}: {what} not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GateArtifactError(f"{path}: corrupt {what} (not valid JSON: {e})") from None
    if not isinstance(doc, dict):
        raise GateArtifactError(f"{path}: corrupt {what} (expected a JSON object)")
    return doc


def check_version(path: str | os.PathLike[str], doc: Mapping[str, Any], fmt: str, what: str) -> None:
    if doc.get("format") != fmt:
        raise GateArtifactError(f"{path}: not an ExpertRAG {what} (format {doc.get('format')!r}, expected {fmt!r})")
    if doc.get("version") != VERSION:
        raise GateArtifactError(
            f"{path}: {what} format version {doc.get('version')!r}, this ExpertRAG reads version {VERSION}; "
            f"retrain with `expertrag train gate`")


def load_gate(path: str | os.PathLike[str]) -> GateModel:
    """Load any gate model written by `GateModel.save`, dispatching on its kind."""
    path = Path(path)
    doc = read_json_artifact(path, "gate file")
    check_version(path, doc, FORMAT, "gate file")
    kind = doc.get("kind")
    if kind not in GATE_KINDS:
        raise GateArtifactError(f"{path}: unknown gate kind {kind!r}; known: {', '.join(GATE_KINDS)}")
    tensors: dict[str, np.ndarray] = {}
    tref = doc.get("tensors")
    if tref is not None:
        if not isinstance(tref, dict) or not isinstance(tref.get("file"), str):
            raise GateArtifactError(f"{path}: corrupt gate file (bad 'tensors' entry)")
        tpath = path.parent / Path(tref["file"]).name
        if not tpath.is_file():
            raise GateArtifactError(f"{tpath}: weights of gate {path} not found")
        if sha256_file(tpath) != tref.get("sha256"):
            raise GateArtifactError(f"{tpath}: checksum mismatch (corrupt or from another save of {path.name})")
        try:
            from safetensors.numpy import load_file

            tensors = load_file(str(tpath))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise GateArtifactError(f"{tpath}: corrupt weights file: {e}") from None
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
