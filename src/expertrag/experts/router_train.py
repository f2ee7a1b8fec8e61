"""Training the router (experts/router.py) from labelled questions or, without labels, from the experts'
own passages.

The fast layer is a multinomial logistic regression on the MiniLM query embedding (scikit-learn, already a
dependency). Its regularisation C, the settling threshold and the fast/retrieval mix are chosen by
stratified k-fold cross-validation on the training questions only: out-of-fold probabilities and each
question's retrieval signal replay the two-layer rule for every (threshold, mix) on a grid, and the most
accurate pair wins, preferring the one that settles more questions in the fast layer when two are within
half a point. Nothing here looks at evaluation questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from expertrag.errors import InputError
from expertrag.experts.live import DomainMap
from expertrag.experts.registry import GENERAL
from expertrag.experts.router import RouterModel, RoutingSettings, boost_order, hit_domain_distribution
from expertrag.retrieval.index import Index

C_GRID = (0.25, 0.5, 1.0, 4.0, 16.0)
THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.01)  # 1.01: never settle fast
MIX_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
TIE = 0.005  # accuracy within this of the best counts as a tie (then: more fast-layer settling)


def global_hit_domains(index: Index, domain_map: DomainMap, questions: Sequence[str], vectors: np.ndarray,
                       depth: int, mode: str = "hybrid", ranked_out: list | None = None) -> list[list[str | None]]:
    """Per question, the domains of its top `depth` hits over every public partition (what the pipeline's
    refining layer sees for an anonymous caller). `ranked_out`, when given, receives per question the
    fused global ranking at the fusion depth as (document ids, domains, scores): the training split's
    global recall and the domain-boost replay read it."""
    allowed = index.allowed(None)
    out = []
    batch = 64
    full = max(depth, index.config.candidates)
    for s in range(0, len(questions), batch):
        qs = list(questions[s:s + batch])
        sparse, dense = index.component_rankings(qs, full, allowed, mode=mode, query_vectors=vectors[s:s + batch])
        for sp, de in zip(sparse, dense, strict=True):
            ranked = index.fuse(sp, de, full, mode)
            doms = domain_map.domains([r for r, _ in ranked])
            out.append(doms[:depth])
            if ranked_out is not None:
                by_row = {r: p for r, p in index.passages({r for r, _ in ranked}).items()}
                ranked_out.append(([by_row[r].doc_id if r in by_row else "" for r, _ in ranked], doms,
                                   np.array([sc for _, sc in ranked], dtype=np.float64)))
    return out


# domain boost per unit of routing confidence, in RRF units (1/(rrf_k + 1) ~ 0.016 is one retriever's top
# rank); None = the hard domain filter. 1.0 puts every in-domain hit of the global top-50 first.
BOOST_GRID = (None, 0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 1.0)
RECALL_TIE = 0.002


class RecallOracle:
    """Gold-passage recall@5 of the training questions: globally, with the domain boost (both replayed on
    the stored global rankings) and within a domain (searched on demand, cached). Only training
    questions: the evaluation's never enter here."""

    def __init__(self, index: Index, texts: Sequence[str], vectors: np.ndarray, gold: Sequence[Sequence[str]],
                 global_ranked: Sequence[tuple[list[str], list[str | None], np.ndarray]]):
        self.index, self.texts, self.vectors, self.gold = index, texts, vectors, [set(g) for g in gold]
        self.ranked = global_ranked
        self.global_recall = np.array([self._recall(i, ids) for i, (ids, _, _) in enumerate(global_ranked)])
        self._cache: dict[tuple[int, str], float] = {}

    def _recall(self, i: int, doc_ids: Sequence[str]) -> float:
        g = self.gold[i]
        return len(g & set(doc_ids[:5])) / len(g) if g else float("nan")

    def boosted(self, i: int, domain: str, boost: float) -> float:
        ids, doms, scores = self.ranked[i]
        order = boost_order(scores, doms, domain, boost)
        return self._recall(i, [ids[j] for j in order[:5]])

    def in_domain(self, i: int, domain: str) -> float:
        key = (i, domain)
        if key not in self._cache:
            from expertrag.retrieval.types import Filters

            allowed = self.index.allowed(Filters(domains=(domain,)))
            sp, de = self.index.component_rankings([self.texts[i]], self.index.config.candidates, allowed,
                                                   query_vectors=self.vectors[i:i + 1])
            hits = self.index.hits([self.index.fuse(sp[0], de[0], 5, "hybrid")], allowed)[0]
            self._cache[key] = self._recall(i, [h.metadata.get("doc_id", h.id) for h in hits])
        return self._cache[key]


def _choose_domain_boost(P, classes, y, hit_domains, threshold, mix, settings, recall: RecallOracle, log):
    """Out-of-fold routes of the training questions, replayed: training recall@5 of the hard domain filter
    and of each boost on the grid (the general expert's questions search globally in every case). The
    best wins; within RECALL_TIE the earlier on the grid (the filter first: what the issue asks for)."""
    conf = np.zeros(len(P))
    pred, _ = replay_two_layer(P, classes, y, hit_domains, threshold, mix, settings, conf)
    rows_with_gold = np.flatnonzero(~np.isnan(recall.global_recall))
    rows = []
    for boost in BOOST_GRID:
        r = []
        for i in rows_with_gold:
            if pred[i] < 0 or classes[pred[i]] == GENERAL:
                r.append(recall.global_recall[i])
            elif boost is None:
                r.append(recall.in_domain(i, classes[pred[i]]))
            else:
                r.append(recall.boosted(i, classes[pred[i]], boost * conf[i]))
        rows.append({"domain_boost": boost, "recall_at_5": float(np.mean(r))})
        if log:
            log(f"  domain {'filter' if boost is None else f'boost {boost:g}'}: training recall@5 "
                f"{rows[-1]['recall_at_5']:.4f}")
    best = max(r["recall_at_5"] for r in rows)
    chosen = next(r for r in rows if r["recall_at_5"] >= best - RECALL_TIE)
    return chosen["domain_boost"], {"chosen": chosen, "grid": rows,
                                    "global_recall_at_5": float(np.nanmean(recall.global_recall))}


@dataclass
class TwoLayerReplay:
    accuracy: float
    fast_share: float
    threshold: float
    mix: float


def replay_two_layer(P: np.ndarray, classes: Sequence[str], y: np.ndarray, hit_domains: Sequence[Sequence],
                     threshold: float, mix: float, settings: RoutingSettings = RoutingSettings(),
                     top_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The router's rule (route()) for every question with one expert per class: (predicted class index,
    -1 for general; settled-fast flags). Used for CV here and mirrored by route() itself. `top_weight`,
    when given, receives each question's routing confidence (Route.confidence: the fast layer's top
    probability, or the refined top weight)."""
    k = len(classes)
    col = {c: i for i, c in enumerate(classes)}
    general = col.get(GENERAL, -1)  # the general expert's class, when it was trained as one (passages)
    pred = np.empty(len(P), dtype=np.int64)
    fast = np.zeros(len(P), dtype=bool)
    for i, p in enumerate(P):
        top = int(p.argmax())
        if p[top] >= threshold:
            pred[i], fast[i] = top, True
            if top_weight is not None:
                top_weight[i] = p[top]
            continue
        ret = np.zeros(k + 1)  # last column: the general expert (domains without an expert)
        for d, w in hit_domain_distribution(list(hit_domains[i]), settings.depth).items():
            j = col.get(d if d is not None else GENERAL)
            ret[j if j is not None else k] += w
        comb = np.append(p, 0.0)
        if ret.sum() > 0:
            comb = mix * comb + (1 - mix) * ret
        if general >= 0:  # one general expert: fold its class into the general column
            comb[k] += comb[general]
            comb[general] = 0.0
        j = int(comb.argmax())
        if top_weight is not None:
            top_weight[i] = comb[j]
        pred[i] = general if j == k or comb[j] < settings.general_below else j
    return pred, fast


def _fit_lr(X: np.ndarray, y: np.ndarray, C: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(X, y)


def fit_router(X: np.ndarray, labels: Sequence[str], hit_domains: Sequence[Sequence[str | None]] | None = None, *,
               embedder: str = "", seed: int = 0, folds: int = 5, source: str = "questions",
               settings: RoutingSettings = RoutingSettings(), log=None,
               recall: RecallOracle | None = None) -> RouterModel:
    """Fit the fast layer on (X, labels) and choose C, threshold and mix by cross-validation.

    hit_domains: per training question, its global top hits' domains (None: no refining signal, then the
    threshold is the lowest whose out-of-fold fast accuracy reaches 0.95 and mix is 0.5).
    recall: gold-passage recall@5 of training questions, globally and within a domain; with it (and
    hit_domains) the retrieval scope is chosen too: the hard domain filter or a confidence-weighted boost of
    in-domain hits in the global ranking, whichever retrieves the training questions' gold passages best."""
    from sklearn.model_selection import StratifiedKFold

    X = np.asarray(X, dtype=np.float32)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise InputError(f"the router needs at least two labelled domains, got {classes}")
    counts = {c: int(sum(1 for lab in labels if lab == c)) for c in classes}
    small = [c for c, n in counts.items() if n < folds]
    if small:
        raise InputError(f"domain(s) {small} have fewer than {folds} training examples; add examples or remove them")
    y = np.array([classes.index(lab) for lab in labels])
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = list(skf.split(X, y))
    best = None
    for C in C_GRID:
        P = np.zeros((len(X), len(classes)))
        for tr, te in splits:
            P[te] = _fit_lr(X[tr], y[tr], C, seed).predict_proba(X[te])
        acc = float((P.argmax(1) == y).mean())
        if log:
            log(f"  C={C:g}: out-of-fold fast accuracy {acc:.4f}")
        if best is None or acc > best[1] + 1e-9:
            best = (C, acc, P)
    C, fast_acc, P = best
    domain_boost = None
    grid: list[TwoLayerReplay] = []
    if hit_domains is not None:
        for t in THRESHOLD_GRID:
            for mix in MIX_GRID:
                pred, fast = replay_two_layer(P, classes, y, hit_domains, t, mix, settings)
                grid.append(TwoLayerReplay(float((pred == y).mean()), float(fast.mean()), t, mix))
        top = max(g.accuracy for g in grid)
        chosen = max((g for g in grid if g.accuracy >= top - TIE), key=lambda g: (g.fast_share, g.accuracy))
        threshold, mix = chosen.threshold, chosen.mix
        cv = {"two_layer_accuracy": chosen.accuracy, "fast_share": chosen.fast_share,
              "best_two_layer_accuracy": top}
        if recall is not None:
            domain_boost, cv["domain_boost"] = _choose_domain_boost(P, classes, y, hit_domains, threshold, mix,
                                                                   settings, recall, log)
    else:
        threshold, mix = 1.01, 0.5
        conf = P.max(1)
        for t in THRESHOLD_GRID:
            sel = conf >= t
            if sel.any() and float((P.argmax(1)[sel] == y[sel]).mean()) >= 0.95:
                threshold = t
                break
        cv = {"fast_share": float((conf >= threshold).mean())}
    model = _fit_lr(X, y, C, seed)
    info = {"source": source, "examples": len(X), "per_class": counts, "C": C, "folds": folds, "seed": seed,
            "cv_fast_accuracy": fast_acc, "cv": cv, "settings": settings.__dict__}
    return RouterModel(classes=classes, coef=model.coef_.astype(np.float32),
                       intercept=model.intercept_.astype(np.float32), threshold=float(threshold), mix=float(mix),
                       embedder=embedder, info=info,
                       domain_boost=domain_boost)


def passage_training_set(index: Index, per_domain: int = 400, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Without labelled questions: a seeded sample of each domain's stored passage embeddings, labelled by
    their domain (passages without one: GENERAL). Pseudo-queries, so the CV figures flatter the router."""
    dm = DomainMap(index)
    rng = np.random.default_rng(seed)
    picks: dict[int, np.ndarray] = {}
    for code in range(len(dm.names)):
        rows = dm.rowids[dm.codes == code]
        if len(rows):
            picks[code] = rng.choice(rows, size=min(per_domain, len(rows)), replace=False)
    wanted = {int(r): c for c, rows in picks.items() for r in rows.tolist()}
    X, y = [], []
    from expertrag.retrieval.embedder import vector_cache_key

    # stored vectors are keyed by model and vector family (int8 apart from fp32): the backend that built them
    key = vector_cache_key(index.manifest.embedder, index.manifest.extra.get("embed_backend") or "torch")
    for rowids, vecs in index.store.iter_live_vectors(index.generation, key, index.manifest.embedding_dim):
        for r, v in zip(rowids.tolist(), vecs, strict=True):
            c = wanted.get(int(r))
            if c is not None:
                X.append(v)
                y.append(dm.names[c] if dm.names[c] is not None else GENERAL)
    if not X:
        raise InputError("the index has no embedded passages to learn domains from", path=index.dir)
    return np.stack(X).astype(np.float32), y


def held_out(question_id: str, seed: int, fraction: float) -> bool:
    """Deterministic split by a hash of (seed, id): the same question is held out by `train router` and by
    `eval-experts` whatever the file order, so the router never trains on a question it is scored on."""
    import hashlib

    h = hashlib.sha256(f"{seed}:{question_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def labelled_questions(paths: Sequence) -> list[tuple[str, str, str, list[str]]]:
    """(id, question, domain label, gold passage ids) of every question in the files; a question without
    a string `metadata.domain` is an error naming the file and the question."""
    from expertrag.data.questions import load_questions

    out, seen = [], set()
    for path in paths:
        for q in load_questions(path):
            dom = q.metadata.get("domain")
            if not isinstance(dom, str) or not dom.strip():
                raise InputError(f"question {q.id!r} has no domain label", path=path, field="metadata.domain")
            if q.id in seen:
                raise InputError(f"question id {q.id!r} appears in two files", path=path, field="id")
            seen.add(q.id)
            gold = q.metadata.get("gold_passage_ids") or []
            out.append((q.id, q.question, dom, [str(g) for g in gold] if isinstance(gold, list) else []))
    return out
