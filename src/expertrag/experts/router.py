"""Which expert(s) answer a question: a two-layer router over the registry's active experts.

1. Metadata: an explicit `domain` (or `expert`) hint in the request metadata settles it, when the caller
   may use that expert.
2. Fast layer: the query's embedding (the one the gate already computed) -> a softmax regression over the
   domains the router was trained on. Clear cases (top probability >= `threshold`, chosen by
   cross-validation on the training split) settle here: a 384x8 matrix product, microseconds.
3. Refining layer, only for the rest: retrieval signals from one search over every partition the caller
   may see (the pipeline's gate computes that ranking anyway): the domains of the top hits, weighted by
   rank, mixed with the fast distribution (`mix`, also cross-validated). It picks one expert, several
   (top-m whose weight reaches `multi_min_weight`), or the general expert when nothing reaches
   `general_below`.

Retrieval scope (`Route.scope`): "domain" filters retrieval to the expert's domain; "boost" (when
`train router` found it retrieves the training split's gold passages better) re-ranks the caller's global
ranking, lifting in-domain hits by `domain_boost` x the route's confidence: a confident route reads
(almost) only its domain, an unsure one keeps strong hits of other domains, so a misroute does not lose
the evidence outright.

Both layers score domains (GENERAL: passages without one); the top domain is then mapped onto the caller's
candidate experts (active, and allowed by their access groups). A domain without a candidate expert (none
registered, retired, or not allowed) maps to the general expert, which searches everything the caller may
see. Domains are compared one by one, never pooled: three unregistered domains of 0.2 each do not outvote a
registered one of 0.4. So a retired expert's questions fall to the general expert, and an expert added
after training is reached through the refining layer until `train router` is re-run.

Pure: numpy in, a `Route` out. Loading/saving the artifact (INDEX/router/) is at the bottom.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertrag.errors import InputError
from expertrag.experts.registry import GENERAL, ExpertRecord, RegistrySnapshot
from expertrag.fileio import atomic_path, atomic_write_json, sha256_file

ROUTER_DIR = "router"
WEIGHTS_FILE = "router.npz"
META_FILE = "router.json"
FORMAT = "expertrag-router/1"


@dataclass(frozen=True)
class RoutingSettings:
    """Choices of the refining layer that labelled questions of seven domains cannot tune (no question
    there belongs to the general expert, none is meant to go to two experts): fixed, documented defaults.
    (The retrieval choice they can tune, `RouterModel.domain_boost`, is cross-validated.)"""

    general_below: float = 0.3  # top combined weight under this: the general expert answers
    multi_min_weight: float = 0.35  # a second expert joins when its weight reaches this
    top_m: int = 2  # at most this many experts answer one question
    depth: int = 20  # top hits of the global ranking that vote for their domain


@dataclass
class RouterModel:
    """The fast layer: softmax(W e + b) over `classes` (domains; GENERAL for passages without one)."""

    classes: list[str]
    coef: np.ndarray  # [C, D]
    intercept: np.ndarray  # [C]
    threshold: float  # the fast layer settles when its top probability reaches this
    mix: float  # weight of the fast distribution in the refining layer (1 - mix: retrieval's)
    # None: retrieve within the expert's domain (hard filter). A number: re-rank the global ranking with
    # this boost (RRF units, times the route's confidence) for in-domain hits. Chosen on the training
    # split's gold-passage recall@5 (router_train.py)
    domain_boost: float | None = None
    embedder: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # how it was trained, CV figures
    digest: str = ""  # sha256 of the weights file: a changed router changes cache keys

    def proba(self, embedding: np.ndarray) -> np.ndarray:
        z = self.coef @ np.asarray(embedding, dtype=np.float32).reshape(-1) + self.intercept
        z = z - z.max()
        p = np.exp(z)
        return p / p.sum()

    def proba_many(self, embeddings: np.ndarray) -> np.ndarray:
        z = np.asarray(embeddings, dtype=np.float32) @ self.coef.T + self.intercept
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)


@dataclass
class Route:
    """The router's answer for one question: who answers, with what weight, decided where and why."""

    experts: list[tuple[ExpertRecord, float]]
    layer: str  # "metadata" | "fast" | "refine" | "general-only"
    reason: str
    scope: str = "domain"  # "domain": within each expert's domain; "boost": global ranking, in-domain lifted
    confidence: float = 1.0  # the fast layer's top probability, or the refined top weight
    fast: dict[str, float] = field(default_factory=dict)  # the fast layer's weight per candidate expert
    retrieval: dict[str, float] | None = None  # the top hits' weight per candidate expert (refining only)
    combined: dict[str, float] | None = None
    fast_ms: float = 0.0
    refine_ms: float = 0.0

    @property
    def names(self) -> list[str]:
        return [e.name for e, _ in self.experts]

    def to_dict(self) -> dict[str, Any]:
        return {"experts": [{"name": e.name, "version": e.version, "domain": e.domain, "weight": round(w, 4)}
                            for e, w in self.experts],
                "layer": self.layer, "reason": self.reason, "scope": self.scope,
                "confidence": round(self.confidence, 4),
                "fast": {k: round(v, 4) for k, v in self.fast.items()},
                "retrieval": None if self.retrieval is None else {k: round(v, 4) for k, v in self.retrieval.items()},
                "combined": None if self.combined is None else {k: round(v, 4) for k, v in self.combined.items()},
                "fast_ms": round(self.fast_ms, 3), "refine_ms": round(self.refine_ms, 3)}


def candidates(snapshot: RegistrySnapshot, groups: Sequence[str], all_groups: bool = False) -> list[ExpertRecord]:
    """Active experts this caller may use; the general expert is always last (and always allowed: it
    only ever sees the passages the caller may see)."""
    act = snapshot.active
    return [e for e in act[:-1] if e.allows(groups, all_groups)] + [act[-1]]


def hit_domain_distribution(domains: Sequence[str | None], depth: int = 20) -> dict[str | None, float]:
    """Rank-weighted vote of the top hits' domains (weight 1/rank, normalised): the refining signal."""
    votes: dict[str | None, float] = {}
    for r, d in enumerate(domains[:depth], 1):
        votes[d] = votes.get(d, 0.0) + 1.0 / r
    total = sum(votes.values())
    return {d: v / total for d, v in votes.items()} if total > 0 else {}


def _hint(metadata: Mapping[str, Any], cands: Sequence[ExpertRecord]) -> tuple[ExpertRecord | None, str | None]:
    """An explicit expert or domain named in the request metadata. (expert, None) when it settles the
    route, (None, why) when a hint was given but cannot be honoured, (None, None) without a hint."""
    name, domain = metadata.get("expert"), metadata.get("domain")
    if name is None and domain is None:
        return None, None
    for e in cands:
        if (name is not None and e.name == name) or (name is None and e.domain == domain):
            return e, None
    what = f"expert {name!r}" if name is not None else f"domain {domain!r}"
    return None, f"{what} asked for in metadata is not an active expert this caller may use"


def route(snapshot: RegistrySnapshot, model: RouterModel | None, embedding: np.ndarray | None, *,
          groups: Sequence[str] = (), all_groups: bool = False, metadata: Mapping[str, Any] | None = None,
          hit_domains: Callable[[], Sequence[str | None]] | None = None,
          settings: RoutingSettings = RoutingSettings()) -> Route:
    """Route one question. `hit_domains` is called only when the fast layer does not settle: the domains
    of the global ranking's top hits, best first (the pipeline passes its gate's ranking)."""
    cands = candidates(snapshot, groups, all_groups)
    general = cands[-1]
    if len(cands) == 1:
        return Route([(general, 1.0)], "general-only", "no domain expert this caller may use")
    hinted, why_not = _hint(metadata or {}, cands)
    if hinted is not None:
        return Route([(hinted, 1.0)], "metadata", f"request metadata names {hinted.name}", scope=_scope(model))

    t = time.perf_counter()
    fast: dict[str, float] = {}  # by domain (GENERAL: passages without one)
    if model is not None and embedding is not None:
        fast = dict(zip(model.classes, model.proba(embedding).tolist(), strict=True))
    fast_ms = (time.perf_counter() - t) * 1000
    why = why_not + "; " if why_not else ""
    if fast:
        top = max(fast, key=fast.get)
        if fast[top] >= model.threshold:
            expert = expert_for(cands, top)
            return Route([(expert, 1.0)], "fast", why + f"fast layer: {top} {fast[top]:.2f} >= threshold "
                         f"{model.threshold:.2f}" + _no_expert_note(expert, top), scope=_scope(model),
                         confidence=fast[top], fast=fast, fast_ms=fast_ms)

    t = time.perf_counter()
    retrieval: dict[str, float] = {}
    if hit_domains is not None:
        for d, w in hit_domain_distribution(list(hit_domains()), settings.depth).items():
            key = d if d is not None else GENERAL
            retrieval[key] = retrieval.get(key, 0.0) + w
    if fast and retrieval:
        keys = set(fast) | set(retrieval)
        combined = {d: model.mix * fast.get(d, 0.0) + (1 - model.mix) * retrieval.get(d, 0.0) for d in keys}
    else:
        combined = dict(fast or retrieval)
    if not combined or not any(combined.values()):
        return Route([(general, 1.0)], "refine", why + "no router and no retrieval signal", fast=fast,
                     retrieval=retrieval or None, fast_ms=fast_ms, refine_ms=(time.perf_counter() - t) * 1000)
    ranked = sorted(combined, key=lambda d: (-combined[d], d))
    top, top_w = ranked[0], combined[ranked[0]]
    if top_w < settings.general_below:
        chosen = [(general, top_w)]
        reason = (f"low confidence: top {top} {top_w:.2f} < {settings.general_below:.2f}, "
                  "the general expert answers")
    else:
        chosen = [(expert_for(cands, top), top_w)]
        for d in ranked[1:settings.top_m]:
            e = expert_for(cands, d)
            if combined[d] >= settings.multi_min_weight and all(e is not c for c, _ in chosen):
                chosen.append((e, combined[d]))
        reason = (f"refined with retrieval signals: {', '.join(f'{d} {combined[d]:.2f}' for d in ranked[:len(chosen)])}"
                  + (f" (fast layer alone {max(fast.values()):.2f} < {model.threshold:.2f})" if fast else "")
                  + _no_expert_note(chosen[0][0], top))
    total = sum(w for _, w in chosen) or 1.0
    experts = [(e, w / total) for e, w in chosen]
    return Route(experts, "refine", why + reason, scope=_scope(model), confidence=top_w, fast=fast,
                 retrieval=retrieval or None, combined=combined, fast_ms=fast_ms,
                 refine_ms=(time.perf_counter() - t) * 1000)


def _scope(model: RouterModel | None) -> str:
    return "boost" if model is not None and model.domain_boost is not None else "domain"


def boost_order(scores: np.ndarray, domains: Sequence[str | None], domain: str, boost: float) -> list[int]:
    """Positions of a fused global ranking re-sorted after adding `boost` to the hits of `domain`
    (stable: ties keep the ranking's order)."""
    s = np.asarray(scores, dtype=np.float64) + boost * np.fromiter((d == domain for d in domains), dtype=np.float64,
                                                                   count=len(domains))
    return np.argsort(-s, kind="stable").tolist()


def expert_for(cands: Sequence[ExpertRecord], domain: str) -> ExpertRecord:
    """The candidate expert owning `domain` (the first registered, when several do); the general expert
    when none does (retired, not allowed to this caller, never registered) or for GENERAL itself."""
    if domain != GENERAL:
        for e in cands:
            if e.domain == domain:
                return e
    return cands[-1]


def _no_expert_note(expert: ExpertRecord, domain: str) -> str:
    return f" ({domain} has no expert this caller may use: general)" if expert.domain is None and \
        domain != GENERAL else ""


# ---- the artifact: INDEX/router/router.npz (weights) + router.json (everything else) -------------------
def router_dir(index_dir: str | Path) -> Path:
    return Path(index_dir) / ROUTER_DIR


def save_router(directory: str | Path, model: RouterModel) -> Path:
    """Weights first, then the JSON that names their checksum: a reader that finds the two disagreeing
    (a crash between the writes) reports it rather than mixing an old threshold with new weights."""
    directory = Path(directory)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, coef=model.coef.astype(np.float32), intercept=model.intercept.astype(np.float32))
    digest = sha256_file(directory / WEIGHTS_FILE)
    atomic_write_json(directory / META_FILE, {
        "format": FORMAT, "classes": list(model.classes), "threshold": float(model.threshold),
        "mix": float(model.mix), "domain_boost": model.domain_boost, "embedder": model.embedder,
        "weights_sha256": digest, "info": model.info})
    model.digest = digest
    return directory


def load_router(directory: str | Path) -> RouterModel | None:
    """The saved router, or None when there is none. A damaged one is an error naming the file."""
    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", path=meta_path) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"not a router file (expected format {FORMAT!r})", path=meta_path, field="format")
    for key, kind in (("classes", list), ("threshold", (int, float)), ("mix", (int, float)), ("weights_sha256", str)):
        if not isinstance(meta.get(key), kind):
            raise InputError("missing or of the wrong type", path=meta_path, field=key)
    if not weights_path.exists() or sha256_file(weights_path) != meta["weights_sha256"]:
        raise InputError("weights missing or not the ones router.json names; run `expertrag train router` again",
                         path=weights_path)
    with np.load(weights_path) as z:
        coef, intercept = z["coef"], z["intercept"]
    if coef.shape[0] != len(meta["classes"]) or intercept.shape != (len(meta["classes"]),):
        raise InputError(f"weights of shape {coef.shape} do not match {len(meta['classes'])} classes",
                         path=weights_path)
    return RouterModel(classes=[str(c) for c in meta["classes"]], coef=coef, intercept=intercept,
                       threshold=float(meta["threshold"]), mix=float(meta["mix"]),
                       domain_boost=float(meta["domain_boost"]) if meta.get("domain_boost") is not None else None,
                       embedder=str(meta.get("embedder", "")), info=dict(meta.get("info") or {}),
                       digest=meta["weights_sha256"])


class RouterFile:
    """The router of an index as a running pipeline sees it: re-loaded when its files change (one stat)."""

    def __init__(self, index_dir: str | Path):
        self.dir = router_dir(index_dir)
        self._sig: tuple | None = None
        self._model: RouterModel | None = None

    def _signature(self) -> tuple | None:
        sigs = []
        for name in (META_FILE, WEIGHTS_FILE):
            try:
                st = (self.dir / name).stat()
            except FileNotFoundError:
                sigs.append(None)
                continue
            sigs.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(sigs)

    def current(self) -> RouterModel | None:
        sig = self._signature()
        if sig != self._sig:
            try:
                model = load_router(self.dir)
            except InputError:
                # `train router` writes the weights, then the JSON naming them: between the two a reader
                # sees a mismatch. Keep answering with the router we had and look again next question.
                if self._model is not None:
                    return self._model
                raise
            self._model, self._sig = model, sig
        return self._model
