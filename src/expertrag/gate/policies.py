"""Retrieval policies: `decide(ctx: GateContext) -> Decision`, one per name in `POLICIES`.

Baselines: never, always, popularity (Mallen et al. 2023), skr-knn (SKR, Wang et al. 2023), entropy, flare
(FLARE's low-probability-token trigger, Jiang et al. 2023), router. The learned `adaptive` policy is two-stage.

Decision.score is P(retrieval needed) for the learned policies; for the baselines it is the policy's own
statistic, monotone in "retrieve": popularity sigmoid(log1p(threshold) - log1p(s_pop)), skr-knn the share of
neighbours that needed retrieval, entropy the mean token entropy, flare 1 - min token probability, router
the retrieval-expert affinity.

Artifacts (written by `expertrag train gate` into an index's `gate/` folder; see ARTIFACTS):
fast.json/.safetensors and full.json/.safetensors (adaptive), skr_knn.json + skr_knn.npz, popularity.json,
entropy.json and router.json (tuned thresholds, used when the config leaves them null).
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from expertrag.errors import ExpertRAGError
from expertrag.gate.config import GateConfig
from expertrag.gate.features import FeatureSpec, popularity_features, probe_features, s_pop_of
from expertrag.gate.models import (
    VERSION,
    GateArtifactError,
    GateModel,
    RouterGate,
    ThresholdGate,
    check_version,
    load_gate,
    read_json_artifact,
    write_json_atomic,
)
from expertrag.gate.types import Decision, GateContext, Probe

ARTIFACTS: dict[str, str] = {
    "fast": "fast.json",
    "full": "full.json",
    "skr_knn": "skr_knn.json",
    "skr_knn_arrays": "skr_knn.npz",
    "popularity": "popularity.json",
    "entropy": "entropy.json",
    "router": "router.json",
    "report": "report.json",
}
TRAIN_HINT = "train it with `expertrag train gate`"


def _artifact(artifacts_dir: str | os.PathLike[str] | None, key: str, policy: str) -> Path:
    if artifacts_dir is None:
        raise GateArtifactError(f"policy '{policy}' needs trained gate artifacts but no gate folder was given; "
                                f"{TRAIN_HINT}")
    path = Path(artifacts_dir) / ARTIFACTS[key]
    if not path.is_file():
        raise GateArtifactError(f"policy '{policy}' needs {path}, which does not exist; {TRAIN_HINT}")
    return path


class Policy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def decide(self, ctx: GateContext) -> Decision:
        ...

    @classmethod
    def from_config(cls, config: GateConfig, artifacts_dir: str | os.PathLike[str] | None) -> Policy:
        return cls()


POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, config: GateConfig | None = None,
                artifacts_dir: str | os.PathLike[str] | None = None) -> Policy:
    """Build the policy `name`; learned ones load their artifacts from `artifacts_dir`."""
    if name not in POLICIES:
        raise ExpertRAGError(f"unknown gate policy '{name}'; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name].from_config(config or GateConfig(), artifacts_dir)


@register
class NeverPolicy(Policy):
    name = "never"

    def decide(self, ctx: GateContext) -> Decision:
        return Decision(retrieve=False, score=0.0, stage="fixed", policy=self.name)


@register
class AlwaysPolicy(Policy):
    name = "always"

    def decide(self, ctx: GateContext) -> Decision:
        return Decision(retrieve=True, score=1.0, stage="fixed", policy=self.name)


# ----------------------------------------------------------------------------------------------- popularity

POPULARITY_FORMAT = "expertrag-gate-popularity"


def best_popularity_threshold(s_pop: Sequence[float], closed: Sequence[float], open_: Sequence[float]) -> float:
    """Threshold t maximising the adaptive accuracy of "retrieve iff s_pop < t" (Mallen et al.): the sum
    of open-book correctness below t and closed-book correctness at or above it. Candidates: min(s_pop)
    (never retrieve), midpoints between distinct values, max + 1 (always). Ties go to the lower t."""
    s = np.asarray(s_pop, dtype=np.float64)
    c = np.asarray(closed, dtype=np.float64)
    o = np.asarray(open_, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no questions with s_pop to fit a popularity threshold on")
    order = np.argsort(s, kind="mergesort")
    ss, cc, oo = s[order], np.concatenate([[0.0], np.cumsum(c[order])]), np.concatenate([[0.0], np.cumsum(o[order])])
    u = np.unique(ss)
    cands = np.concatenate([[u[0]], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    k = np.append(np.searchsorted(ss, u, "left"), ss.size)  # questions retrieved at each candidate
    acc = oo[k] + (cc[-1] - cc[k])
    return float(cands[int(np.argmax(acc))])


@register
class PopularityPolicy(Policy):
    """Retrieve when metadata.s_pop < the threshold of the question's metadata.relation (global threshold
    for relations unseen or rare in training). A question without s_pop gets `missing` ("retrieve" by
    default: unknown popularity is treated like the long tail), with stage "fixed"."""

    name = "popularity"

    def __init__(self, global_threshold: float, thresholds: Mapping[str, float] | None = None,
                 missing: str = "retrieve"):
        self.global_threshold = float(global_threshold)
        self.thresholds = {str(k): float(v) for k, v in (thresholds or {}).items()}
        if missing not in ("retrieve", "no_retrieve"):
            raise ValueError(f"missing must be 'retrieve' or 'no_retrieve', got {missing!r}")
        self.missing = missing

    @classmethod
    def fit(cls, s_pop: Sequence[float], relations: Sequence[str | None], closed: Sequence[float],
            open_: Sequence[float], *, min_questions: int = 10, missing: str = "retrieve") -> PopularityPolicy:
        """Per-relation thresholds maximising adaptive accuracy on labelled training questions."""
        s, c, o = (np.asarray(a, dtype=np.float64) for a in (s_pop, closed, open_))
        rel = np.asarray([r if r is not None else "" for r in relations], dtype=object)
        thresholds = {}
        for r in sorted(set(rel) - {""}):
            m = rel == r
            if m.sum() >= min_questions:
                thresholds[r] = best_popularity_threshold(s[m], c[m], o[m])
        return cls(best_popularity_threshold(s, c, o), thresholds, missing)

    def threshold_for(self, relation: Any) -> float:
        return self.thresholds.get(relation, self.global_threshold) if isinstance(relation, str) else self.global_threshold

    def decide(self, ctx: GateContext) -> Decision:
        s = s_pop_of(ctx.metadata)
        if s is None:
            r = self.missing == "retrieve"
            return Decision(retrieve=r, score=float(r), stage="fixed", policy=self.name)
        t = self.threshold_for(ctx.metadata.get("relation"))
        feats = popularity_features(ctx.metadata)
        score = float(1 / (1 + math.exp(-(math.log1p(t) - feats["log_s_pop"]))))
        return Decision(retrieve=s < t, score=score, stage="metadata", policy=self.name, features=feats)

    def save(self, artifacts_dir: str | os.PathLike[str]) -> Path:
        path = Path(artifacts_dir) / ARTIFACTS["popularity"]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"format": POPULARITY_FORMAT, "version": VERSION,
                                  "global_threshold": self.global_threshold, "thresholds": self.thresholds})
        return path

    @classmethod
    def load(cls, artifacts_dir: str | os.PathLike[str], missing: str = "retrieve") -> PopularityPolicy:
        path = _artifact(artifacts_dir, "popularity", cls.name)
        doc = read_json_artifact(path, "popularity thresholds")
        check_version(path, doc, POPULARITY_FORMAT, "popularity thresholds")
        try:
            return cls(float(doc["global_threshold"]), dict(doc.get("thresholds") or {}), missing)
        except (KeyError, TypeError, ValueError) as e:
            raise GateArtifactError(f"{path}: corrupt popularity thresholds: {e}") from None

    @classmethod
    def from_config(cls, config, artifacts_dir):
        if config.popularity_threshold is not None:
            return cls(config.popularity_threshold, None, config.popularity_missing)
        return cls.load(artifacts_dir, config.popularity_missing)


# -------------------------------------------------------------------------------------------------- skr-knn

SKR_FORMAT = "expertrag-gate-skr-knn"


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


@register
class SkrKnnPolicy(Policy):
    """SKR: the k training questions nearest by cosine of their embeddings vote; retrieve when a strict
    majority of them needed retrieval (a tie does not retrieve)."""

    name = "skr-knn"

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray, k: int = 5):
        e = np.asarray(embeddings, dtype=np.float32)
        lab = np.asarray(labels).astype(np.int8).ravel()
        if e.ndim != 2 or e.shape[0] != lab.size or lab.size == 0:
            raise ValueError(f"need one label per embedding row, got {e.shape} and {lab.size}")
        if not np.isin(lab, (0, 1)).all():
            raise ValueError("skr-knn labels must be 0/1")
        if k < 1:
            raise ValueError("k must be >= 1")
        self.embeddings, self.labels, self.k = _unit(e), lab, int(k)

    @classmethod
    def fit(cls, embeddings: np.ndarray, targets: Sequence[int], k: int = 5) -> SkrKnnPolicy:
        return cls(embeddings, np.asarray(targets), k)

    def neighbours(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float32).ravel()
        if q.size != self.embeddings.shape[1]:
            raise ExpertRAGError(f"skr-knn was fitted on {self.embeddings.shape[1]}-dim embeddings, the query "
                                 f"embedding has {q.size}: use the same embedder, or retrain the gate")
        sims = self.embeddings @ _unit(q)
        return np.argsort(-sims, kind="stable")[: min(self.k, sims.size)]

    def decide(self, ctx: GateContext) -> Decision:
        votes = self.labels[self.neighbours(ctx.query_embedding())]
        frac = float(votes.mean())
        return Decision(retrieve=bool(votes.sum() * 2 > votes.size), score=frac, stage="fast", policy=self.name,
                        features={"knn_retrieve_fraction": frac})

    def save(self, artifacts_dir: str | os.PathLike[str]) -> Path:
        d = Path(artifacts_dir)
        d.mkdir(parents=True, exist_ok=True)
        npz = d / ARTIFACTS["skr_knn_arrays"]
        tmp = d / (npz.name + ".tmp.npz")
        np.savez(tmp, embeddings=self.embeddings, labels=self.labels)
        os.replace(tmp, npz)
        path = d / ARTIFACTS["skr_knn"]
        write_json_atomic(path, {"format": SKR_FORMAT, "version": VERSION, "k": self.k,
                                  "count": int(self.labels.size), "dim": int(self.embeddings.shape[1]),
                                  "arrays": npz.name})
        return path

    @classmethod
    def load(cls, artifacts_dir: str | os.PathLike[str], k: int | None = None) -> SkrKnnPolicy:
        path = _artifact(artifacts_dir, "skr_knn", cls.name)
        doc = read_json_artifact(path, "skr-knn index")
        check_version(path, doc, SKR_FORMAT, "skr-knn index")
        npz = path.parent / ARTIFACTS["skr_knn_arrays"]
        if not npz.is_file():
            raise GateArtifactError(f"{npz}: skr-knn arrays not found; {TRAIN_HINT}")
        try:
            with np.load(npz, allow_pickle=False) as z:
                e, lab = z["embeddings"], z["labels"]
            if e.shape != (doc["count"], doc["dim"]):
                raise ValueError(f"arrays hold {e.shape}, {path.name} says ({doc['count']}, {doc['dim']})")
            return cls(e, lab, int(k if k is not None else doc["k"]))
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise GateArtifactError(f"{npz}: corrupt skr-knn index: {e}") from None

    @classmethod
    def from_config(cls, config, artifacts_dir):
        return cls.load(artifacts_dir, config.skr_k)


# ---------------------------------------------------------------------------------------- probe baselines


def _tuned_threshold(config_value: float | None, artifacts_dir: Any, key: str, policy: str,
                     check: Callable[[GateModel], float]) -> float:
    if config_value is not None:
        return float(config_value)
    gate = load_gate(_artifact(artifacts_dir, key, policy))
    return check(gate)


@register
class EntropyPolicy(Policy):
    """Retrieve when the closed-book draft's mean token entropy >= threshold (an empty draft retrieves)."""

    name = "entropy"

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

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
        return cls(_tuned_threshold(config.entropy_threshold, artifacts_dir, "entropy", cls.name, check))


@register
class FlarePolicy(Policy):
    """FLARE's trigger: retrieve when any drafted token has probability < theta (an empty draft retrieves)."""

    name = "flare"

    def __init__(self, theta: float = 0.2):
        self.theta = float(theta)

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


@register
class RouterPolicy(Policy):
    """Retrieve when the MoE router's affinity for the retrieval expert >= threshold."""

    name = "router"

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

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
        return cls(_tuned_threshold(config.router_threshold, artifacts_dir, "router", cls.name, check))


# ------------------------------------------------------------------------------------------------- adaptive


def _vectors_for(spec: FeatureSpec, ctx: GateContext, probe: Probe | None) -> dict[str, np.ndarray | None]:
    v: dict[str, np.ndarray | None] = {}
    if spec.use_query_embedding:
        v["query_embedding"] = ctx.query_embedding()
    if spec.use_hidden:
        if probe is None or probe.hidden is None:
            raise ExpertRAGError("the full gate reads the probe's hidden state but the probe returned none; "
                                 "retrain with gate.use_hidden: false")
        v["hidden"] = probe.hidden
    return v


def _scalar_features(ctx: GateContext, with_popularity: bool) -> dict[str, float]:
    f = dict(ctx.query_features())
    if with_popularity:  # only when a gate reads it: a malformed s_pop must not break the others
        f.update(popularity_features(ctx.metadata))
    return f


@register
class AdaptivePolicy(Policy):
    """The learned two-stage gate.

    Stage "fast": the query-only gate scores the question; score < low -> no retrieval, score > high ->
    retrieve. Only scores in [low, high] pay for ctx.probe() (once); the full query+probe gate then
    decides with its own threshold (stage "probe"). With `band` set, [low, high] is instead
    [t - band, t + band] around the fast gate's own tuned threshold t, so the uncertain band follows the
    operating point (e.g. a target retrieval rate) rather than fixed probabilities.
    """

    name = "adaptive"

    def __init__(self, fast: GateModel, full: GateModel, low: float, high: float, band: float | None = None):
        if band is not None:
            low, high = fast.decision_threshold - band, fast.decision_threshold + band
        if fast.spec.needs_probe:
            raise ExpertRAGError("the fast gate must use query-only features; its spec names probe features")
        if low > high:
            raise ValueError(f"low ({low}) must not exceed high ({high})")
        self.fast, self.full, self.low, self.high = fast, full, float(low), float(high)
        self._popularity = any("log_s_pop" in g.spec.names for g in (fast, full))

    def decide(self, ctx: GateContext) -> Decision:
        feats = _scalar_features(ctx, self._popularity)
        s = self.fast.score(self.fast.spec.vectorize(feats, _vectors_for(self.fast.spec, ctx, None)))
        used = {n: feats[n] for n in self.fast.spec.names}
        if s < self.low or s > self.high:
            return Decision(retrieve=s > self.high, score=s, stage="fast", policy=self.name, features=used)
        probe = ctx.probe()
        feats.update(probe_features(probe))
        s2 = self.full.score(self.full.spec.vectorize(feats, _vectors_for(self.full.spec, ctx, probe)))
        used = {n: feats[n] for n in self.full.spec.names} | {"fast_score": s}
        return Decision(retrieve=self.full.decide(s2), score=s2, stage="probe", policy=self.name, features=used)

    @classmethod
    def from_config(cls, config, artifacts_dir):
        fast = load_gate(_artifact(artifacts_dir, "fast", cls.name))
        full = load_gate(_artifact(artifacts_dir, "full", cls.name))
        return cls(fast, full, config.low, config.high, config.band)
