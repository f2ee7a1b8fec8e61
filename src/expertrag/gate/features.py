"""Gate features: pure functions to `dict[str, float]`, and `FeatureSpec` to turn them into a vector.

Scalar features have stable names (the constants below); vector blocks ("query_embedding", "hidden") are
appended after them in a fixed order. Missing scores are 0: no BM25 hit gives bm25_top1 = 0, a single hit
gives gap = top1 (as if the second scored 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from expertrag.errors import ExpertRAGError, InputError
from expertrag.gate.types import Probe
from expertrag.retrieval.types import Hit

WH_WORDS: tuple[str, ...] = ("who", "what", "when", "where", "which", "how", "why")
_WH_ALIASES = {"whom": "who", "whose": "who"}
QTYPES: tuple[str, ...] = (*WH_WORDS, "other")

QUERY_FEATURES: tuple[str, ...] = (
    "q_words", "q_chars", *(f"qtype_{t}" for t in QTYPES), "q_has_digit", "q_capitalised",
    "bm25_top1", "bm25_gap", "dense_top1", "dense_gap", "top5_overlap",
)
PROBE_FEATURES: tuple[str, ...] = (
    "first_token_entropy", "mean_token_entropy", "max_token_entropy", "min_logprob", "mean_logprob",
    "draft_tokens",
)
OPTIONAL_PROBE_FEATURES: tuple[str, ...] = ("retrieval_affinity", "router_entropy", "router_agreement")
POPULARITY_FEATURES: tuple[str, ...] = ("log_s_pop",)
VECTOR_BLOCKS: tuple[str, ...] = ("query_embedding", "hidden")

_WORD = re.compile(r"[\w'’-]+", re.UNICODE)


class FeatureError(ExpertRAGError):
    """A feature the gate needs is missing or malformed (names the feature)."""


def question_type(question: str) -> str:
    """The first wh-word of the question (whom/whose count as who), else "other"."""
    for w in _WORD.findall(question.lower()):
        w = _WH_ALIASES.get(w, w)
        if w in WH_WORDS:
            return w
    return "other"


def _top_and_gap(hits: Sequence[Hit]) -> tuple[float, float]:
    scores = sorted((float(h.score) for h in hits), reverse=True)
    top1 = scores[0] if scores else 0.0
    top2 = scores[1] if len(scores) > 1 else 0.0
    return top1, (top1 - top2) if scores else 0.0


def query_features(question: str, bm25_hits: Sequence[Hit], dense_hits: Sequence[Hit]) -> dict[str, float]:
    """Cheap query-only features (no generation).

    q_capitalised counts words starting with an upper-case letter after the first word (sentence case
    capitalises the first word whatever it is). top5_overlap = |top5(bm25) ∩ top5(dense)| / min sizes
    (0 when either list is empty).
    """
    words = _WORD.findall(question)
    qtype = question_type(question)
    out: dict[str, float] = {"q_words": float(len(words)), "q_chars": float(len(question.strip()))}
    for t in QTYPES:
        out[f"qtype_{t}"] = float(t == qtype)
    out["q_has_digit"] = float(any(ch.isdigit() for ch in question))
    out["q_capitalised"] = float(sum(1 for w in words[1:] if w[:1].isupper()))
    out["bm25_top1"], out["bm25_gap"] = _top_and_gap(bm25_hits)
    out["dense_top1"], out["dense_gap"] = _top_and_gap(dense_hits)
    a = {h.id for h in bm25_hits[:5]}
    b = {h.id for h in dense_hits[:5]}
    out["top5_overlap"] = len(a & b) / min(len(a), len(b)) if a and b else 0.0
    return out


def probe_features(probe: Probe) -> dict[str, float]:
    """Uncertainty of the closed-book draft. An empty draft gives 0 for the entropy/log-prob statistics
    and draft_tokens = 0. retrieval_affinity/router_entropy only when the probe has them."""
    ent = np.asarray(probe.entropies, dtype=float)
    lp = np.asarray(probe.logprobs, dtype=float)
    out = {
        "first_token_entropy": float(ent[0]) if ent.size else 0.0,
        "mean_token_entropy": float(ent.mean()) if ent.size else 0.0,
        "max_token_entropy": float(ent.max()) if ent.size else 0.0,
        "min_logprob": float(lp.min()) if lp.size else 0.0,
        "mean_logprob": float(lp.mean()) if lp.size else 0.0,
        "draft_tokens": float(max(len(probe.token_ids), lp.size)),
    }
    if probe.retrieval_affinity is not None:
        out["retrieval_affinity"] = float(probe.retrieval_affinity)
    if probe.router_entropy is not None:
        out["router_entropy"] = float(probe.router_entropy)
    if probe.router_agreement is not None:
        out["router_agreement"] = float(probe.router_agreement)
    return out


def s_pop_of(metadata: Mapping[str, Any]) -> float | None:
    """metadata.s_pop (PopQA: monthly page views of the subject) as a float, None when absent."""
    v = metadata.get("s_pop")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise InputError(f"must be a non-negative number, got {v!r}", field="metadata.s_pop")
    return float(v)


def popularity_features(metadata: Mapping[str, Any]) -> dict[str, float]:
    """{"log_s_pop": log1p(s_pop)} when the question's metadata has s_pop, else {}."""
    s = s_pop_of(metadata)
    return {} if s is None else {"log_s_pop": math.log1p(s)}


@dataclass(frozen=True)
class FeatureSpec:
    """The ordered scalar feature names and the vector blocks (name, dim) a gate model reads.

    A block's dim may be 0 before fitting ("size from the data"); `with_dims` fixes it.
    """

    names: tuple[str, ...]
    vectors: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate feature names in {self.names}")
        for name, dim in self.vectors:
            if name not in VECTOR_BLOCKS:
                raise ValueError(f"unknown vector block {name!r}; known: {', '.join(VECTOR_BLOCKS)}")
            if dim < 0:
                raise ValueError(f"vector block {name!r} has negative dim {dim}")

    @property
    def use_query_embedding(self) -> bool:
        return any(n == "query_embedding" for n, _ in self.vectors)

    @property
    def use_hidden(self) -> bool:
        return any(n == "hidden" for n, _ in self.vectors)

    @property
    def dim(self) -> int:
        return len(self.names) + sum(d for _, d in self.vectors)

    @property
    def needs_probe(self) -> bool:
        return self.use_hidden or any(n in PROBE_FEATURES or n in OPTIONAL_PROBE_FEATURES for n in self.names)

    @classmethod
    def build(cls, names: Sequence[str], *, use_query_embedding: bool = False, use_hidden: bool = False,
              embedding_dim: int = 0, hidden_dim: int = 0) -> FeatureSpec:
        vecs: list[tuple[str, int]] = []
        if use_query_embedding:
            vecs.append(("query_embedding", embedding_dim))
        if use_hidden:
            vecs.append(("hidden", hidden_dim))
        return cls(tuple(names), tuple(vecs))

    def with_dims(self, vectors: Mapping[str, np.ndarray]) -> FeatureSpec:
        """The same spec with each block's dim taken from an example vector."""
        vecs = []
        for name, _ in self.vectors:
            if name not in vectors or vectors[name] is None:
                raise FeatureError(f"vector feature '{name}' is missing")
            vecs.append((name, int(np.asarray(vectors[name]).size)))
        return FeatureSpec(self.names, tuple(vecs))

    def vectorize(self, features: Mapping[str, float], vectors: Mapping[str, np.ndarray | None] | None = None
                  ) -> np.ndarray:
        """One float64 vector: the named scalars in order, then each vector block flattened."""
        vectors = vectors or {}
        out = np.empty(self.dim, dtype=np.float64)
        for i, name in enumerate(self.names):
            if name not in features:
                raise FeatureError(f"feature '{name}' is missing (have: {', '.join(sorted(features)) or 'none'})")
            v = features[name]
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise FeatureError(f"feature '{name}' is not a number: {v!r}") from None
            if not math.isfinite(v):
                raise FeatureError(f"feature '{name}' is not finite: {v}")
            out[i] = v
        pos = len(self.names)
        for name, dim in self.vectors:
            vec = vectors.get(name)
            if vec is None:
                raise FeatureError(f"vector feature '{name}' is missing")
            arr = np.asarray(vec, dtype=np.float64).ravel()
            if arr.size != dim:
                raise FeatureError(f"vector feature '{name}' has {arr.size} values, the gate expects {dim}")
            if not np.all(np.isfinite(arr)):
                raise FeatureError(f"vector feature '{name}' has non-finite values")
            out[pos:pos + dim] = arr
            pos += dim
        return out

    def vectorize_many(self, features: Sequence[Mapping[str, float]],
                       vectors: Sequence[Mapping[str, np.ndarray | None]] | None = None) -> np.ndarray:
        vecs = vectors if vectors is not None else [{}] * len(features)
        if len(vecs) != len(features):
            raise ValueError(f"{len(features)} feature dicts but {len(vecs)} vector dicts")
        if not features:
            return np.zeros((0, self.dim))
        return np.stack([self.vectorize(f, v) for f, v in zip(features, vecs, strict=True)])

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "vectors": [[n, d] for n, d in self.vectors]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        names = d["names"]
        vectors = d.get("vectors", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("spec.names must be a list of strings")
        if not isinstance(vectors, list):
            raise ValueError("spec.vectors must be a list of [name, dim]")
        return cls(tuple(names), tuple((str(n), int(dim)) for n, dim in vectors))
