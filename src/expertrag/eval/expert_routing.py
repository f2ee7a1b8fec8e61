"""`expertrag eval-experts`: how well questions reach their domain expert, and what routing buys retrieval.

Per router on held-out labelled questions (never the router's training questions):
- fast: the fast layer's top domain alone (no threshold, no retrieval);
- two-layer: the router as the pipeline runs it (fast layer, then retrieval signals for unclear cases);
- knn: a baseline, cosine kNN (k=10, similarity-weighted vote) over the router's training questions;
- llm: a baseline asking the generator to name the domain (on the first --llm-limit questions: slow).
Routing accuracy, macro-F1 over the labelled domains, a confusion matrix (JSON and PNG), the share the fast
layer settles and the cost of each layer; gold-passage recall@1/5/20 and search latency within the
two-layer router's domain vs one global search (and within the true domain, as the ceiling); expert
utilisation. With --answers N, end-to-end answers of the pipeline routed vs unrouted on N questions.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from expertrag.data.types import Question
from expertrag.eval.metrics import latency_summary, mean_or_nan, token_f1
from expertrag.experts.live import DomainMap
from expertrag.experts.registry import GENERAL, RegistrySnapshot
from expertrag.experts.router import RouterModel, RoutingSettings, boost_order, route
from expertrag.retrieval.index import Index
from expertrag.retrieval.types import Filters

KS = (1, 5, 20)
NONE = "none"  # a baseline that named no domain


@dataclass
class LabelledQuestion:
    id: str
    text: str
    label: str
    gold: list[str]
    golden_answers: list[str]


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=list(labels), average="macro", zero_division=0))


def confusion(y_true: Sequence[str], y_pred: Sequence[str], rows: Sequence[str], cols: Sequence[str]) -> list[list[int]]:
    m = [[0] * len(cols) for _ in rows]
    ri, ci = {r: i for i, r in enumerate(rows)}, {c: i for i, c in enumerate(cols)}
    for t, p in zip(y_true, y_pred, strict=True):
        m[ri[t]][ci.get(p, ci.get(NONE, len(cols) - 1))] += 1
    return m


def routing_summary(name: str, y_true: Sequence[str], y_pred: Sequence[str], domains: Sequence[str],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    cols = [*domains, GENERAL, NONE]
    per = {d: mean_or_nan([p == d for t, p in zip(y_true, y_pred, strict=True) if t == d]) for d in domains}
    return {"router": name, "questions": len(y_true),
            "accuracy": mean_or_nan([t == p for t, p in zip(y_true, y_pred, strict=True)]),
            "macro_accuracy": mean_or_nan([v for v in per.values() if v == v]),
            "macro_f1": macro_f1(y_true, y_pred, domains), "per_domain_accuracy": per,
            "confusion": {"rows": list(domains), "cols": cols,
                          "matrix": confusion(y_true, y_pred, domains, cols)}, **(extra or {})}


def recall_at(ranked_ids: Sequence[str], gold: Sequence[str], k: int) -> float:
    g = set(gold)
    return len(g & set(ranked_ids[:k])) / len(g) if g else float("nan")


def knn_predict(train_X: np.ndarray, train_y: Sequence[str], X: np.ndarray, k: int = 10) -> list[str]:
    """Cosine kNN (MiniLM vectors are unit length), each neighbour's vote weighted by its similarity."""
    sims = X @ train_X.T
    out = []
    for row in sims:
        top = np.argpartition(-row, min(k, len(row) - 1))[:k]
        votes: Counter = Counter()
        for j in top:
            votes[train_y[j]] += float(row[j])
        out.append(votes.most_common(1)[0][0])
    return out


LLM_PROMPT = ("Which one of these domains does the question belong to: {domains}? "
              "Reply with the domain name only.\n\nQuestion: {question}")


def llm_predict(generator: Any, questions: Sequence[str], domains: Sequence[str]) -> tuple[list[str], list[float]]:
    """The prompted-LLM baseline: the first domain name in the model's reply (NONE if it names none)."""
    pat = re.compile(r"\b(" + "|".join(re.escape(d) for d in domains) + r")\b", re.IGNORECASE)
    preds, ms = [], []
    for q in questions:
        msgs = [{"role": "user", "content": LLM_PROMPT.format(domains=", ".join(domains), question=q)}]
        t = time.perf_counter()
        g = generator.generate(msgs, max_new_tokens=24, stop=["\n"])  # it tends to open with a preamble
        ms.append((time.perf_counter() - t) * 1000)
        m = pat.search(g.text)
        preds.append(m.group(1).lower() if m else NONE)
    return preds, ms


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalised tokens (longest common subsequence)."""
    from expertrag.answers import normalize_answer

    a, b = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def evaluate_experts(index: Index, snapshot: RegistrySnapshot, model: RouterModel, test: Sequence[LabelledQuestion],
                     train: Sequence[tuple[str, str]], *, settings: RoutingSettings = RoutingSettings(),
                     llm: Callable[[Sequence[str], Sequence[str]], tuple[list[str], list[float]]] | None = None,
                     llm_limit: int = 0, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Everything except end-to-end answers (see module doc). `train`: (question, label) the router was
    trained on, for the kNN baseline."""
    domains = sorted({q.label for q in test})
    dmap = DomainMap(index)
    texts = [q.text for q in test]
    t = time.perf_counter()
    X = index.embedder.encode(texts)
    embed_ms = (time.perf_counter() - t) * 1000 / max(len(texts), 1)
    log(f"embedded {len(texts)} held-out questions ({embed_ms:.1f} ms each)")
    truth = [q.label for q in test]

    # fast layer alone
    fast_ms, fast_pred = [], []
    for x in X:
        t = time.perf_counter()
        p = model.proba(x)
        fast_ms.append((time.perf_counter() - t) * 1000)
        fast_pred.append(model.classes[int(p.argmax())])

    # one global ranking per question: the refining layer's signal and the global retrieval baseline
    depth = max(max(KS), index.config.candidates, settings.depth)
    allowed = index.allowed(None)
    global_ms, global_ids, hit_doms, global_ranked = [], [], [], []
    for i, q in enumerate(texts):
        t = time.perf_counter()
        sp, de = index.component_rankings([q], depth, allowed, query_vectors=X[i:i + 1])
        ranked = index.fuse(sp[0], de[0], max(KS), "hybrid")
        hits = index.hits([ranked], allowed)[0]
        global_ms.append((time.perf_counter() - t) * 1000)
        global_ids.append(_doc_ids(hits))
        full = index.fuse(sp[0], de[0], depth, "hybrid")
        global_ranked.append((full, dmap.domains([r for r, _ in full])))
        hit_doms.append(dmap.domains([r for r, _ in index.fuse(sp[0], de[0], settings.depth, "hybrid")]))

    # two-layer router, as the pipeline runs it
    two_pred, layers, refine_ms, route_ms, chosen_names, n_experts, scopes = [], [], [], [], [], [], []
    for i, x in enumerate(X):
        t = time.perf_counter()
        r = route(snapshot, model, x, hit_domains=lambda i=i: hit_doms[i], settings=settings)
        route_ms.append((time.perf_counter() - t) * 1000)
        top = r.experts[0][0]
        two_pred.append(top.domain or GENERAL)
        layers.append(r.layer)
        scopes.append((r.scope, r.confidence))
        chosen_names.append(r.names)
        n_experts.append(len(r.experts))
        if r.layer == "refine":
            refine_ms.append(r.refine_ms)
    fast_share = mean_or_nan([lay == "fast" for lay in layers])
    # what the refining layer costs when its global ranking is not already there (the pipeline's gate
    # usually computes it): the router's own work plus one global search
    refine_with_search = [refine_ms[j] + global_ms[i] for j, i in
                          enumerate(i for i, lay in enumerate(layers) if lay == "refine")]

    routers = [
        routing_summary("fast", truth, fast_pred, domains, {"ms": latency_summary(fast_ms)}),
        routing_summary("two-layer", truth, two_pred, domains, {
            "fast_layer_share": fast_share, "layers": dict(Counter(layers)),
            "fast_ms": latency_summary(fast_ms), "route_ms": latency_summary(route_ms),
            "refine_ms_router_only": latency_summary(refine_ms),
            "refine_ms_with_global_search": latency_summary(refine_with_search),
            "multi_expert_share": mean_or_nan([n > 1 for n in n_experts]),
            "scope": "boost" if model.domain_boost is not None else "domain", "domain_boost": model.domain_boost,
            "threshold": model.threshold, "mix": model.mix}),
    ]
    tX = index.embedder.encode([q for q, _ in train]) if train else np.zeros((0, X.shape[1]), np.float32)
    knn_pred, knn_ms, train_labels = [], [], [lab for _, lab in train]
    for x in X:  # one question at a time, as a router would run
        t = time.perf_counter()
        knn_pred += knn_predict(tX, train_labels, x[None, :]) if train else [NONE]
        knn_ms.append((time.perf_counter() - t) * 1000)
    routers.append(routing_summary("knn", truth, knn_pred, domains, {
        "neighbours": 10, "train_questions": len(train), "ms": latency_summary(knn_ms)}))
    if llm is not None and llm_limit > 0:
        n = min(llm_limit, len(test))
        # a seeded sample across the files (their order groups questions by domain)
        pick = np.random.default_rng(0).permutation(len(test))[:n].tolist()
        llm_pred, llm_ms = llm([texts[i] for i in pick], domains)
        sample_truth = [truth[i] for i in pick]
        sample_two = [two_pred[i] for i in pick]
        routers.append(routing_summary("llm", sample_truth, llm_pred, domains, {
            "ms": latency_summary(llm_ms), "sample": n,
            "two_layer_accuracy_same_sample": mean_or_nan([a == b for a, b in zip(sample_truth, sample_two,
                                                                                  strict=True)])}))
        log(f"llm baseline on {n} questions: {routers[-1]['accuracy']:.3f}")

    # retrieval within the routed domain vs global (and the true domain, the ceiling)
    def domain_search(doms: Sequence[str]) -> tuple[list[list[str]], list[float]]:
        ids, ms = [], []
        for i, (q, d) in enumerate(zip(texts, doms, strict=True)):
            f = Filters(domains=(d,)) if d not in (GENERAL, NONE) else None
            t = time.perf_counter()
            hits = index.search(q, max(KS), "hybrid", f) if f is None else _search_vec(index, q, X[i], f)
            ms.append((time.perf_counter() - t) * 1000)
            ids.append(_doc_ids(hits))
        return ids, ms

    # the pipeline's retrieval: within the routed expert's domain (hard filter), or (scope "boost") the
    # global ranking with that domain's hits lifted by the route's confidence
    filtered_ids, filtered_ms = domain_search(two_pred)
    routed_ids, routed_ms = filtered_ids, filtered_ms
    if model.domain_boost is not None:
        routed_ids, routed_ms = [], []
        for i, (d, (_, conf)) in enumerate(zip(two_pred, scopes, strict=True)):
            full, doms = global_ranked[i]
            t = time.perf_counter()
            if d in (GENERAL, NONE):
                picked = full[:max(KS)]
            else:
                order = boost_order(np.array([sc for _, sc in full]), doms, d, model.domain_boost * conf)
                picked = [full[j] for j in order[:max(KS)]]
            hits = index.hits([picked], allowed)[0]
            # the boost re-uses the global ranking the pipeline's gate computes anyway: its cost is the
            # re-ranking and the store look-up (global_ms is the search itself)
            routed_ms.append((time.perf_counter() - t) * 1000)
            routed_ids.append(_doc_ids(hits))
    oracle_ids, oracle_ms = domain_search(truth)
    retrieval = {}
    runs = [("global", global_ids, global_ms), ("routed", routed_ids, routed_ms)]
    if model.domain_boost is not None:
        runs.append(("routed_filter", filtered_ids, filtered_ms))
    runs.append(("oracle_domain", oracle_ids, oracle_ms))
    for name, ids, ms in runs:
        retrieval[name] = {f"recall_at_{k}": mean_or_nan([recall_at(r, q.gold, k) for r, q in
                                                           zip(ids, test, strict=True) if q.gold]) for k in KS}
        retrieval[name]["search_ms"] = latency_summary(ms)
    per_domain_recall = {d: {name: mean_or_nan([recall_at(r, q.gold, 5) for r, q in zip(ids, test, strict=True)
                                               if q.label == d and q.gold])
                             for name, ids in (("global", global_ids), ("routed", routed_ids))} for d in domains}
    utilisation = Counter(n for names in chosen_names for n in names)
    return {"questions": len(test), "domains": domains, "embed_ms_per_question": embed_ms,
            "routers": routers, "retrieval": retrieval, "recall_at_5_per_domain": per_domain_recall,
            "utilisation": {n: c / len(test) for n, c in sorted(utilisation.items())},
            "predictions": [{"id": q.id, "label": q.label, "fast": f, "two_layer": p, "layer": lay,
                             "confidence": sc[1], "experts": c} for q, f, p, lay, sc, c in
                            zip(test, fast_pred, two_pred, layers, scopes, chosen_names, strict=True)]}


def _doc_ids(hits) -> list[str]:
    """Gold ids name source records; a long record is split into passages `id#n`, so match on doc_id."""
    return [h.metadata.get("doc_id", h.id) for h in hits]


def _search_vec(index: Index, q: str, vec: np.ndarray, filters: Filters):
    """A filtered search reusing the query's embedding (as the pipeline does)."""
    allowed = index.allowed(filters)
    sp, de = index.component_rankings([q], max(max(KS), index.config.candidates), allowed,
                                      query_vectors=vec[None, :])
    return index.hits([index.fuse(sp[0], de[0], max(KS), "hybrid")], allowed)[0]


YES_NO_MAYBE = ("yes", "no", "maybe")


def answer_quality(rag_routed: Any, rag_global: Any, test: Sequence[LabelledQuestion]) -> dict[str, Any]:
    """End-to-end answers on `test`, routed vs one global index: token F1 and ROUGE-L against the gold
    answers; on yes/no/maybe questions (PubMedQA) the accuracy of the first word. Per true domain too, and
    per question which side's token F1 was higher (where routing loses is the point of the comparison);
    for the routed side, how many answers ran with an expert's adapter or skipped retrieval by its gate."""
    out: dict[str, Any] = {}
    per_q: dict[str, dict[str, float]] = {}
    for name, rag in (("routed", rag_routed), ("global", rag_global)):
        f1s, rls, ynm, ms, refine = [], [], [], [], []
        by_domain: dict[str, list[float]] = {}
        adapted = skipped = 0
        for q in test:
            a = rag.answer(q.text)
            ms.append(a.timings.total_ms)
            refine.append(a.routing.get("refine_ms", 0.0) if a.routing else 0.0)
            adapted += bool(a.routing.get("adapter_applied")) if a.routing else 0
            skipped += not a.retrieved
            f1 = token_f1(a.text, q.golden_answers) if q.golden_answers else float("nan")
            f1s.append(f1)
            per_q.setdefault(q.id, {})[name] = f1
            by_domain.setdefault(q.label, []).append(f1)
            rls.append(max((rouge_l(a.text, g) for g in q.golden_answers), default=float("nan")))
            golds = [g.lower() for g in q.golden_answers]
            if golds and golds[0] in YES_NO_MAYBE:
                first = (a.text.strip().lower().split() or [""])[0].strip(".,;:!")
                ynm.append(first == golds[0])
        out[name] = {"answers": len(test), "token_f1": mean_or_nan([x for x in f1s if x == x]),
                     "rouge_l": mean_or_nan([x for x in rls if x == x]),
                     "yes_no_maybe_accuracy": mean_or_nan(ynm), "yes_no_maybe_questions": len(ynm),
                     "answer_ms": latency_summary(ms), "refine_ms_mean": mean_or_nan(refine),
                     "token_f1_by_domain": {d: {"n": len(v), "token_f1": mean_or_nan([x for x in v if x == x])}
                                            for d, v in sorted(by_domain.items())},
                     "with_adapter": adapted, "without_retrieval": skipped}
    pairs = [(v["routed"], v["global"]) for v in per_q.values() if v["routed"] == v["routed"] and v["global"] == v["global"]]
    out["paired"] = {"routed_better": sum(r > g for r, g in pairs), "global_better": sum(g > r for r, g in pairs),
                     "tied": sum(r == g for r, g in pairs)}
    out["refine_share_of_answer_time"] = (out["routed"]["refine_ms_mean"] / out["routed"]["answer_ms"]["latency_ms_mean"]
                                          if out["routed"]["answer_ms"].get("latency_ms_mean") else float("nan"))
    return out


def labelled(questions: Sequence[Question]) -> list[LabelledQuestion]:
    return [LabelledQuestion(q.id, q.question, str(q.metadata.get("domain")),
                             [str(g) for g in q.metadata.get("gold_passage_ids") or []], list(q.golden_answers))
            for q in questions]


def plot_confusion(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from expertrag.fileio import atomic_path

    c = summary["confusion"]
    m = np.array(c["matrix"], dtype=float)
    rows = m.sum(1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(c["cols"]), 1 + 0.7 * len(c["rows"])))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(c["cols"])), c["cols"], rotation=45, ha="right")
    ax.set_yticks(range(len(c["rows"])), c["rows"])
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(j, i, int(m[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black",
                        fontsize=8)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true domain")
    ax.set_title(f"{summary['router']} router: accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def render_markdown(r: dict[str, Any]) -> str:
    lines = [f"# eval-experts: {r['questions']} held-out questions, {len(r['domains'])} domains", "",
             "| router | questions | accuracy | macro accuracy | macro-F1 | fast share | cost |", "|---|---|---|---|---|---|---|"]
    for s in r["routers"]:
        cost = s.get("route_ms") or s.get("ms") or {}
        lines.append(f"| {s['router']} | {s['questions']} | {s['accuracy']:.3f} | {s['macro_accuracy']:.3f} | "
                     f"{s['macro_f1']:.3f} | {s.get('fast_layer_share', float('nan')):.3f} | "
                     f"{cost.get('latency_ms_mean', float('nan')):.3f} ms |")
    lines += ["", "| retrieval | recall@1 | recall@5 | recall@20 | search ms (mean) |", "|---|---|---|---|---|"]
    for name, v in r["retrieval"].items():
        lines.append(f"| {name} | {v['recall_at_1']:.3f} | {v['recall_at_5']:.3f} | {v['recall_at_20']:.3f} | "
                     f"{v['search_ms'].get('latency_ms_mean', float('nan')):.1f} |")
    lines += ["", "| domain | two-layer accuracy | recall@5 global | recall@5 routed |", "|---|---|---|---|"]
    two = next(s for s in r["routers"] if s["router"] == "two-layer")
    for d in r["domains"]:
        rec = r["recall_at_5_per_domain"][d]
        lines.append(f"| {d} | {two['per_domain_accuracy'][d]:.3f} | {rec['global']:.3f} | {rec['routed']:.3f} |")
    lines += ["", "utilisation: " + ", ".join(f"{k} {v:.3f}" for k, v in r["utilisation"].items())]
    if "answers" in r:
        a = r["answers"]
        lines += ["", "| answers | n | token F1 | ROUGE-L | yes/no/maybe acc | answer ms |", "|---|---|---|---|---|---|"]
        for name in ("routed", "global"):
            v = a[name]
            lines.append(f"| {name} | {v['answers']} | {v['token_f1']:.3f} | {v['rouge_l']:.3f} | "
                         f"{v['yes_no_maybe_accuracy']:.3f} ({v['yes_no_maybe_questions']}) | "
                         f"{v['answer_ms'].get('latency_ms_mean', float('nan')):.0f} |")
        lines.append(f"\nrefining layer share of answer time: {a['refine_share_of_answer_time']:.4f}")
        if "paired" in a:
            p = a["paired"]
            lines += [f"routed answers with an expert's adapter: {a['routed']['with_adapter']}, without retrieval: "
                      f"{a['routed']['without_retrieval']}; per question token F1 routed > global "
                      f"{p['routed_better']}, global > routed {p['global_better']}, tied {p['tied']}",
                      "", "| domain | n | token F1 routed | token F1 global |", "|---|---|---|---|"]
            for d, v in a["routed"]["token_f1_by_domain"].items():
                g = a["global"]["token_f1_by_domain"][d]
                lines.append(f"| {d} | {v['n']} | {v['token_f1']:.3f} | {g['token_f1']:.3f} |")
    return "\n".join(lines) + "\n"
