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
# gate.retrieval_evidence: what the index says about the question before any generation (can retrieval help?)
RETRIEVAL_FEATURES: tuple[str, ...] = (
    "bm25_mean", "dense_mean", "top1_agree", "idf_max_present", "idf_mean_present", "absent_share",
    "entity_found", "entity_docs_log",
)
# gate.time_features: the question asks about something that changes (current, latest, a recent year)
TIME_FEATURES: tuple[str, ...] = ("time_sensitive",)
# gate.sample_consistency > 0: N short sampled drafts against the greedy probe (gate.features.sample_features)
SAMPLE_FEATURES: tuple[str, ...] = ("sample_agreement", "sample_jaccard", "sample_distinct")
# gate.router_span question|both: router statistics over the question's own tokens only
QUESTION_ROUTER_FEATURES: tuple[str, ...] = ("q_retrieval_affinity", "q_router_entropy", "q_router_agreement")
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


# "current", "latest", "now", "this year", "as of", ... : the answer may have changed since the model was
# trained, so the model's confidence says nothing about whether it is still right
_TIME_CUES = re.compile(
    r"\b(current(ly)?|latest|newest|now|nowadays|today|tonight|this (year|season|week|month)|recent(ly)?|"
    r"most recent|as of|at present|present[- ]day|to date|so far|incumbent|upcoming|next)\b", re.IGNORECASE)
_YEAR = re.compile(r"\b(1[89]\d\d|2\d\d\d)\b")


def time_sensitive(question: str, recent_from: int = 2023) -> bool:
    """Does the question ask about something that changes: a time cue word, or a year >= recent_from?"""
    if _TIME_CUES.search(question):
        return True
    return any(int(y) >= recent_from for y in _YEAR.findall(question))


def time_features(question: str, recent_from: int = 2023) -> dict[str, float]:
    return {"time_sensitive": float(time_sensitive(question, recent_from))}


def capitalised_spans(question: str) -> list[str]:
    """Runs of capitalised words after the first word (a cheap stand-in for the question's entities);
    the first word counts when it is not a wh-word/auxiliary (sentence case capitalises it anyway)."""
    words = _WORD.findall(question)
    spans: list[list[str]] = []
    run: list[str] = []
    for i, w in enumerate(words):
        cap = w[:1].isupper() and (i > 0 or w.lower() not in _SENTENCE_STARTS)
        if cap:
            run.append(w)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [" ".join(r) for r in spans]


_SENTENCE_STARTS = frozenset(
    (*WH_WORDS, "whom", "whose", "is", "are", "was", "were", "do", "does", "did", "can", "in", "on", "the", "a",
     "an", "name", "list", "give", "tell", "when's", "who's", "what's", "has", "have", "had", "will"))


def retrieval_features(question: str, bm25_hits: Sequence[Hit], dense_hits: Sequence[Hit], bm25: Any) -> dict[str, float]:
    """Retrieval-side evidence (RETRIEVAL_FEATURES). `bm25` is the index's BM25Index (its vocabulary and
    postings); hits are the top hits of each retriever, best first.

    bm25_mean/dense_mean: mean score of the hits (0 without hits); top1_agree: both retrievers' best passage
    is the same. Over the question's index terms: idf_max_present / idf_mean_present, BM25's idf
    log(1 + (N - df + 0.5) / (df + 0.5)) of the terms the corpus has (0 if none), absent_share, the share of
    terms the vocabulary lacks (0 for a question without terms). entity_found: some capitalised span of the
    question has all its terms together in one passage; entity_docs_log: log1p of the most passages that
    hold a span's terms together (both 0 without a span): a question about an entity the corpus never
    mentions cannot be helped by retrieving from it."""
    def mean(hits: Sequence[Hit]) -> float:
        return float(np.mean([h.score for h in hits])) if hits else 0.0

    out = {"bm25_mean": mean(bm25_hits), "dense_mean": mean(dense_hits),
           "top1_agree": float(bool(bm25_hits) and bool(dense_hits) and bm25_hits[0].id == dense_hits[0].id)}
    terms = list(dict.fromkeys(bm25.analyse(question)))
    n = max(int(bm25.num_docs), 1)
    df = bm25.document_frequency(terms)
    idf = [math.log(1 + (n - d + 0.5) / (d + 0.5)) for d in df if d > 0]
    out["idf_max_present"] = max(idf) if idf else 0.0
    out["idf_mean_present"] = float(np.mean(idf)) if idf else 0.0
    out["absent_share"] = sum(d == 0 for d in df) / len(df) if df else 0.0
    docs = [bm25.docs_with_all(t) for t in (bm25.analyse(sp) for sp in capitalised_spans(question)) if t]
    best = max(docs) if docs else 0
    out["entity_found"] = float(best > 0)
    out["entity_docs_log"] = math.log1p(best)
    return out


def sample_features(greedy: str, samples: Sequence[str]) -> dict[str, float]:
    """Agreement of N sampled drafts with the greedy one (SAMPLE_FEATURES), on normalised answers:
    sample_agreement, the share of samples equal to the greedy draft; sample_jaccard, their mean word-set
    Jaccard similarity with it (1 when both are empty); sample_distinct, distinct answers among greedy +
    samples over their number (1/(N+1) = all agree ... 1 = all differ). No samples: agreement 1, jaccard 1,
    distinct 1/1 (nothing contradicts the draft)."""
    from expertrag.answers import normalize_answer

    g = normalize_answer(greedy)
    norm = [normalize_answer(x) for x in samples]
    gw = set(g.split())

    def jac(x: str) -> float:
        w = set(x.split())
        return 1.0 if not w and not gw else len(w & gw) / len(w | gw)

    if not norm:
        return {"sample_agreement": 1.0, "sample_jaccard": 1.0, "sample_distinct": 1.0}
    return {"sample_agreement": sum(x == g for x in norm) / len(norm),
            "sample_jaccard": float(np.mean([jac(x) for x in norm])),
            "sample_distinct": len({g, *norm}) / (len(norm) + 1)}


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
    for name, v in (probe.question_router or {}).items():
        if v is not None:
            out[f"q_{name}"] = float(v)
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
        return self.use_hidden or any(n in PROBE_FEATURES or n in OPTIONAL_PROBE_FEATURES or
                                      n in QUESTION_ROUTER_FEATURES or n in SAMPLE_FEATURES for n in self.names)

    @property
    def needs_samples(self) -> bool:
        return any(n in SAMPLE_FEATURES for n in self.names)

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
