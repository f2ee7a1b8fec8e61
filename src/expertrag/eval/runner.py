"""End-to-end evaluation of retrieval policies: every policy answers the same questions, one JSON result.

`evaluate(rag_factory, questions, policies, ...)` asks `rag_factory(policy)` for one `ExpertRAG` per policy
(they should share the index and the generator) and answers each question with each of them. Answers are
never served from a cache (the runner switches the answer and retrieval caches of the pipelines it gets
off), so every policy pays for its own work. With `interleave` (the default) each question is answered by
every policy in turn, in an order rotated per question, so load from other jobs on a shared machine falls
on all policies alike; the first `warmup` questions are answered once untimed per policy beforehand.

Per question (`records`): the gate's decision, score and stage; correctness of the model's own words
(`Answer.generated`, before abstention replaced them) PopQA-style (a normalised gold answer contained in
the prediction), exact match and token F1; latency and its parts; tokens; and, where a label exists, the
label and both branches' correctness.

Per policy, overall, per dataset and per group (groups from the label: `no_retrieval` = the closed-book
answer was right, `retrieval` = only the open-book one was, `both_wrong`; or given by the caller, as the
mixed workload does): accuracy, EM, F1, abstain and retrieval rates, share decided per gate stage, latency
mean/p50/p95/p99 (`Timings.total_ms`), generation ms per generated token (generation time, prefill included,
over generated tokens), mean prompt tokens, retrievals per query, gate overhead (gate_ms / total_ms; the
closed-book probe is reported apart as probe_share), expert utilisation (mean per-layer token share over the
questions, its entropy, the retrieval expert's share, collapse flags from `moe.stats.collapse_flags`), and
gate quality against the labels: need = `gate.labels.target(label, both_wrong_as)` (with the default
both_wrong_as="retrieve" that is "not closed_correct"), precision/recall/F1 of the decision "retrieve",
AUROC of the score, with counts, and a reliability table (binned score vs observed need) when scores lie
in [0, 1].

Threshold sweep (`sweep`), for every policy whose scores vary: on labelled questions where both branches'
correctness is known (closed_correct / open_correct from `expertrag label`), the decision is recomputed as
"retrieve iff score >= t" for thresholds t over the observed scores, and accuracy is read off the labels:
open_correct where it would retrieve, closed_correct where not. The model is not rerun: each branch's
answer is the greedy answer the labelling run generated for the same prompt, so the curve is exact as long
as the labels were made with the same model, prompts, k and max_new_tokens (a no-retrieval answer that
continues the probe's draft is token for token the plain closed-book answer). Two approximations: the
two-stage `adaptive` policy's score comes from its fast gate on questions it settled in the fast stage and
from its full gate on the others, and the sweep thresholds that mixed score with the stage routing held
as it was; and a sampled answer (temperature > 0) would not be reproduced. `operating_point` compares the
label-estimated accuracy at the policy's real decisions with the measured one, a check of that premise.

Context dilution (`k_sweep`): `always` is answered again with pipeline.k = each k (the run at the
pipeline's own k is reused). Everything goes into one JSON-safe dict (NaN -> null) with the config,
package versions, sha256 of each dataset file, the seed and the machine.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from expertrag.data.types import Question
from expertrag.errors import ExpertRAGError, InputError
from expertrag.eval.config import EvalConfig
from expertrag.eval.metrics import (
    auroc,
    contains_answer,
    exact_match,
    latency_summary,
    precision_recall_f1,
    token_f1,
)
from expertrag.fileio import sha256_file
from expertrag.gate.labels import LabelRecord, target

FORMAT = "expertrag-eval"
VERSION = 1
PACKAGES = ("expertrag", "torch", "transformers", "sentence-transformers", "faiss-cpu", "bm25s", "numpy",
            "scikit-learn", "pydantic")
NO_RETRIEVAL, RETRIEVAL, BOTH_WRONG = "no_retrieval", "retrieval", "both_wrong"


# ----------------------------------------------------------------------------------------- provenance


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "machine": platform.machine(), "processor": platform.processor() or None}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def json_safe(obj: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, numpy scalars -> Python, tuples -> lists, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(dict(result)), ensure_ascii=False, indent=1, allow_nan=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, p)
    return p


# ------------------------------------------------------------------------------------------ questions


def as_datasets(questions: Mapping[str, Sequence[Question]] | Sequence[Question]) -> dict[str, list[Question]]:
    if isinstance(questions, Mapping):
        return {str(k): list(v) for k, v in questions.items()}
    return {"all": list(questions)}


def select_questions(questions: Sequence[Question], limit: int | None, seed: int, dataset: str = "") -> list[Question]:
    """All questions in file order, or with `limit` a seeded sample of that many in shuffled order. The
    stream depends only on (seed, dataset name), so adding a dataset does not change another's sample."""
    qs = list(questions)
    if limit is None:
        return qs
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    rng = np.random.default_rng([seed, zlib.crc32(dataset.encode("utf-8"))])
    return [qs[i] for i in rng.permutation(len(qs))[:limit]]


def group_of(label: LabelRecord | None) -> str | None:
    """no_retrieval (closed-book right), retrieval (only open-book right), both_wrong; None if unlabelled."""
    if label is None:
        return None
    if label.closed_correct is True or label.label == "no_retrieve":
        return NO_RETRIEVAL
    return RETRIEVAL if label.label == "retrieve" else BOTH_WRONG


# ------------------------------------------------------------------------------------------- records


def question_record(answer: Any, question: Question, dataset: str, policy: str,
                    label: LabelRecord | None = None, group: str | None = None) -> dict[str, Any]:
    """One question's row; `_experts` (the answer's per-layer expert shares) is dropped from the JSON."""
    golds = question.golden_answers
    t = answer.timings
    gate = answer.gate or {}
    score = gate.get("score")
    return {
        "id": question.id, "dataset": dataset, "policy": policy,
        "decision": gate.get("decision", "retrieve" if answer.retrieved else "no_retrieve"),
        "retrieved": bool(answer.retrieved), "score": None if score is None else float(score),
        "stage": gate.get("stage"),
        "correct": bool(contains_answer(answer.generated, golds)) if golds else None,
        "em": exact_match(answer.generated, golds) if golds else None,
        "f1": token_f1(answer.generated, golds) if golds else None,
        "abstained": bool(answer.abstained), "confidence": float(answer.confidence),
        "latency_ms": float(t.total_ms), "gate_ms": float(t.gate_ms), "probe_ms": float(t.probe_ms),
        "retrieval_ms": float(t.retrieval_ms), "generation_ms": float(t.generation_ms),
        "prompt_tokens": int(answer.tokens.get("prompt", 0)),
        "generated_tokens": int(answer.tokens.get("generated", 0)),
        "retrievals": int(bool(answer.retrieved)),
        "retrieval_expert_share": (answer.experts or {}).get("retrieval_expert_share"),
        "label": label.label if label else None,
        "closed_correct": label.closed_correct if label else None,
        "open_correct": label.open_correct if label else None,
        "group": group, "answer": answer.generated,
        "_experts": answer.experts or {},
    }


def error_record(question: Question, dataset: str, policy: str, error: Exception) -> dict[str, Any]:
    return {"id": question.id, "dataset": dataset, "policy": policy, "error": str(error)}


# --------------------------------------------------------------------------------------- aggregation


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def expert_utilisation(usages: Iterable[Mapping[str, Any]], dominant_above: float = 0.5) -> dict[str, Any] | None:
    """Mean per-layer token share (one vector per answer, averaged), the entropy of the FFN experts'
    share (nats, and divided by log E), the retrieval expert's mean share, and collapse flags. None when no
    answer reported expert shares (a dense model)."""
    from expertrag.moe.stats import LayerStats, collapse_flags

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    with_r: dict[str, bool] = {}
    r_shares = []
    for u in usages:
        layers = (u or {}).get("layers") or {}
        has_r = (u or {}).get("retrieval_expert_share") is not None
        if has_r:
            r_shares.append(float(u["retrieval_expert_share"]))
        for layer, share in layers.items():
            v = np.asarray(share, dtype=np.float64)
            if layer in sums and sums[layer].shape != v.shape:
                continue  # a different model's answer: ignore rather than mix
            sums[layer] = sums.get(layer, 0) + v
            counts[layer] = counts.get(layer, 0) + 1
            with_r[layer] = with_r.get(layer, False) or has_r
    if not sums:
        return None
    out_layers = {}
    stats = []
    for layer in sorted(sums, key=lambda s: int(s) if s.lstrip("-").isdigit() else s):
        mean = sums[layer] / counts[layer]
        ffn = mean[:-1] if with_r[layer] and mean.size > 1 else mean
        p = ffn / ffn.sum() if ffn.sum() > 0 else ffn
        nz = p[p > 0]
        ent = float(-(nz * np.log(nz)).sum())
        out_layers[layer] = {"share": [round(float(x), 5) for x in mean], "entropy": ent,
                             "normalized_entropy": ent / math.log(p.size) if p.size > 1 else float("nan"),
                             "retrieval_share": float(mean[-1]) if with_r[layer] else None,
                             "answers": counts[layer]}
        lid = int(layer) if layer.lstrip("-").isdigit() else len(stats)
        stats.append(LayerStats(layer=lid, token_share=p.tolist(), mean_prob=[], router_entropy=float("nan"),
                                retrieval_rate=None, dropped_tokens=0))
    flags = collapse_flags(stats, dominant_above=dominant_above)
    return {"layers": out_layers, "retrieval_slot": any(with_r.values()),
            "retrieval_expert_share": _mean(r_shares) if r_shares else None,
            "collapse": [f.message() for f in flags], "collapsed_layers": sorted({f.layer for f in flags})}


def reliability(targets: Sequence[int], scores: Sequence[float], bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins over [0, 1]: count, mean predicted score and observed share needing retrieval."""
    t = np.asarray(targets, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    idx = np.clip((s * bins).astype(int), 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "count": int(m.sum()),
                    "mean_score": float(s[m].mean()) if m.any() else None,
                    "observed": float(t[m].mean()) if m.any() else None})
    return out


def gate_quality(records: Sequence[Mapping[str, Any]], both_wrong_as: str = "retrieve",
                 bins: int = 10) -> dict[str, Any] | None:
    """The decision and score against the labels' need for retrieval (see the module doc)."""
    rows = []
    for r in records:
        if r.get("label") is None or r.get("error"):
            continue
        y = target(r["label"], both_wrong_as)  # type: ignore[arg-type]
        if y is not None:
            rows.append((y, bool(r["retrieved"]), r.get("score")))
    if not rows:
        return None
    y = [a for a, _, _ in rows]
    d = [b for _, b, _ in rows]
    tp = sum(a and b for a, b in zip(y, d, strict=True))
    fp = sum(b and not a for a, b in zip(y, d, strict=True))
    fn = sum(a and not b for a, b in zip(y, d, strict=True))
    out: dict[str, Any] = {"n": len(rows), "positives": sum(y), "negatives": len(y) - sum(y),
                           "tp": tp, "fp": fp, "fn": fn, "tn": len(rows) - tp - fp - fn,
                           "both_wrong_as": both_wrong_as}
    out |= precision_recall_f1([bool(a) for a in y], d)
    out["accuracy"] = (tp + out["tn"]) / len(rows)
    scored = [(a, float(s)) for a, _, s in rows if s is not None and math.isfinite(float(s))]
    out["n_scored"] = len(scored)
    out["auroc"] = auroc([a for a, _ in scored], [s for _, s in scored]) if scored else float("nan")
    if scored and all(0.0 <= s <= 1.0 for _, s in scored):
        out["reliability"] = reliability([a for a, _ in scored], [s for _, s in scored], bins)
    return out


def threshold_sweep(records: Sequence[Mapping[str, Any]], points: int = 101) -> dict[str, Any] | None:
    """Accuracy vs retrieval rate as the decision threshold moves, read off the labels (module doc).
    None when fewer than one labelled question with both branches known, or the scores are constant."""
    rows = [r for r in records if not r.get("error") and r.get("score") is not None
            and r.get("closed_correct") is not None and r.get("open_correct") is not None
            and math.isfinite(float(r["score"]))]
    if not rows:
        return None
    s = np.asarray([float(r["score"]) for r in rows])
    c = np.asarray([float(r["closed_correct"]) for r in rows])
    o = np.asarray([float(r["open_correct"]) for r in rows])
    u = np.unique(s)
    if u.size < 2:
        return None
    cands = np.append(u, np.nextafter(u[-1], np.inf))  # u[0]: retrieve all ... past the max: retrieve none
    if cands.size > points:
        cands = cands[np.unique(np.linspace(0, cands.size - 1, points).round().astype(int))]
    pts = []
    for t in cands:
        d = s >= t
        pts.append({"threshold": float(t), "retrieval_rate": float(d.mean()),
                    "accuracy": float(np.where(d, o, c).mean())})
    best = max(pts, key=lambda p: (p["accuracy"], -p["retrieval_rate"]))
    real = np.asarray([bool(r["retrieved"]) for r in rows])
    measured = [float(r["correct"]) for r in rows if r.get("correct") is not None]
    return {
        "n": len(rows), "points": pts, "best": best,
        "never_accuracy": float(c.mean()), "always_accuracy": float(o.mean()),
        "oracle_accuracy": float(np.maximum(c, o).mean()),
        "operating_point": {"retrieval_rate": float(real.mean()),
                            "label_accuracy": float(np.where(real, o, c).mean()),
                            "measured_accuracy": _mean(measured)},
    }


def summarize(records: Sequence[Mapping[str, Any]], *, both_wrong_as: str = "retrieve", bins: int = 10,
              dominant_above: float = 0.5) -> dict[str, Any]:
    """Aggregate metrics of one policy's per-question records (module doc)."""
    ok = [r for r in records if not r.get("error")]
    graded = [r for r in ok if r.get("correct") is not None]
    lat = [r["latency_ms"] for r in ok]
    total = sum(lat)
    stages: dict[str, int] = {}
    for r in ok:
        stages[str(r.get("stage"))] = stages.get(str(r.get("stage")), 0) + 1
    gen_tokens = sum(r["generated_tokens"] for r in ok)
    out: dict[str, Any] = {
        "n": len(ok), "errors": len(records) - len(ok), "graded": len(graded),
        "correct": sum(bool(r["correct"]) for r in graded),
        "accuracy": _mean([float(r["correct"]) for r in graded]),
        "em": _mean([r["em"] for r in graded]), "f1": _mean([r["f1"] for r in graded]),
        "abstain_rate": _mean([float(r["abstained"]) for r in ok]),
        "retrieval_rate": _mean([float(r["retrieved"]) for r in ok]),
        "retrievals_per_query": _mean([r.get("retrievals", int(r["retrieved"])) for r in ok]),
        "stages": {k: v / len(ok) for k, v in sorted(stages.items())} if ok else {},
        **latency_summary(lat),
        "ms_per_generated_token": _ratio(sum(r["generation_ms"] for r in ok), gen_tokens),
        "mean_prompt_tokens": _mean([r["prompt_tokens"] for r in ok]),
        "mean_generated_tokens": _mean([r["generated_tokens"] for r in ok]),
        "gate_overhead_share": _ratio(sum(r["gate_ms"] for r in ok), total),
        "probe_share": _ratio(sum(r["probe_ms"] for r in ok), total),
        "retrieval_share": _ratio(sum(r["retrieval_ms"] for r in ok), total),
        "gate_quality": gate_quality(ok, both_wrong_as, bins),
        "experts": expert_utilisation((r.get("_experts") or {} for r in ok), dominant_above),
    }
    return out


def _split(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get(key) is not None:
            out.setdefault(str(r[key]), []).append(r)
    return out


def speedup(reference: Mapping[str, Any] | None, candidate: Mapping[str, Any] | None,
            key: str = "latency_ms_mean") -> float | None:
    """reference latency / candidate latency (> 1: the candidate is faster); None if either is missing."""
    if not reference or not candidate:
        return None
    a, b = reference.get(key), candidate.get(key)
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return float(a / b)


# ------------------------------------------------------------------------------------------- running


def _quiet_caches(rag: Any) -> Any:
    for attr in ("answer_cache", "retrieval_cache"):
        if getattr(rag, attr, None) is not None:
            setattr(rag, attr, None)
    return rag


def _build(rag_factory: Callable[[str], Any], policy: str) -> tuple[Any, str | None]:
    try:
        return _quiet_caches(rag_factory(policy)), None
    except (ExpertRAGError, OSError, ValueError, KeyError) as e:
        return None, f"{type(e).__name__}: {e}"


def evaluate(rag_factory: Callable[[str], Any],
             questions: Mapping[str, Sequence[Question]] | Sequence[Question],
             policies: Sequence[str], *, labels: Mapping[str, LabelRecord] | None = None,
             limit: int | None = None, seed: int = 0, progress: bool | None = None,
             k_sweep: Sequence[int] = (), groups: Mapping[str, str] | None = None,
             settings: EvalConfig | None = None, files: Mapping[str, str | os.PathLike[str]] | None = None,
             config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Answer `questions` (one list per dataset name, or one list) with every policy; see the module doc.

    rag_factory(policy) -> ExpertRAG; a policy it cannot build (missing artifacts: an ExpertRAGError) or
    that fails on a question with an ExpertRAGError other than InputError is reported under `skipped`
    with the reason, and the others go on. An InputError on one question is recorded as that question's
    error. `labels` maps question id -> LabelRecord; `groups` maps question id -> group name (default:
    from the labels, see `group_of`); `files` maps dataset name -> its file (hashed); `config` is stored.
    """
    settings = settings or EvalConfig()
    started = time.perf_counter()
    labels = dict(labels or {})
    given = as_datasets(questions)
    datasets = {name: select_questions(qs, limit, seed, name) for name, qs in given.items()}
    grp = dict(groups) if groups is not None else {i: g for i, r in labels.items() if (g := group_of(r))}
    items = [(ds, q) for ds, qs in datasets.items() for q in qs]
    policies = list(dict.fromkeys(policies))
    if not policies:
        raise ValueError("no policies to evaluate")

    skipped: dict[str, str] = {}
    runs: dict[str, Any] = {}
    for p in policies:
        rag, why = _build(rag_factory, p)
        if rag is None:
            skipped[p] = why or "unknown error"
        else:
            runs[p] = rag
    dilution_runs: dict[int, str] = {}  # k -> run name
    ks = sorted({int(k) for k in k_sweep})
    if any(k <= 0 for k in ks):
        raise ValueError(f"k_sweep needs positive k, got {list(k_sweep)}")
    for k in ks:
        if "always" in runs and runs["always"].config.k == k:
            dilution_runs[k] = "always"
            continue
        rag, why = _build(rag_factory, "always")
        if rag is None:
            skipped[f"always@k={k}"] = why or "unknown error"
            continue
        rag.config = rag.config.model_copy(update={"k": k})
        dilution_runs[k] = f"always@k={k}"
        runs[f"always@k={k}"] = rag

    records: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}

    def fail(name: str, err: Exception) -> None:
        skipped[name] = f"{type(err).__name__}: {err}"
        runs.pop(name, None)
        records.pop(name, None)

    for name in list(runs):  # untimed warm-up: lazy loads, first allocations
        for _ds, q in items[:settings.warmup]:
            try:
                runs[name].answer(q.question, metadata=dict(q.metadata))
            except InputError:
                continue
            except ExpertRAGError as e:
                fail(name, e)
                break

    def answer(name: str, ds: str, q: Question) -> None:
        rag = runs.get(name)
        if rag is None:
            return
        try:
            a = rag.answer(q.question, metadata=dict(q.metadata))
        except InputError as e:
            records[name].append(error_record(q, ds, name, e))
            return
        except ExpertRAGError as e:
            fail(name, e)
            return
        records[name].append(question_record(a, q, ds, name, labels.get(q.id), grp.get(q.id)))

    names = list(runs)
    bar = tqdm(total=len(items) * len(names), desc="eval", unit="answer",
               disable=None if progress is None else not progress)
    if settings.interleave:
        for i, (ds, q) in enumerate(items):
            for j in range(len(names)):
                answer(names[(i + j) % len(names)], ds, q)
                bar.update(1)
    else:
        for name in names:
            for ds, q in items:
                answer(name, ds, q)
                bar.update(1)
    bar.close()

    results, summary = aggregate(records, policies, settings, skipped)
    agg = dict(both_wrong_as=settings.both_wrong_as, bins=settings.reliability_bins,
               dominant_above=settings.collapse_dominant_above)
    dilution = {}
    for k, name in dilution_runs.items():
        if name not in records:
            continue
        s = summarize(records[name], **agg)
        dilution[str(k)] = {
            "accuracy": s["accuracy"], "em": s["em"], "f1": s["f1"], "n": s["n"],
            "latency_ms_mean": s["latency_ms_mean"], "mean_prompt_tokens": s["mean_prompt_tokens"],
            "datasets": {ds: summarize(rs, **agg)["accuracy"] for ds, rs in _split(records[name], "dataset").items()},
        }

    out_records = [r for p in policies if p in records for r in records[p]]
    return json_safe({
        "format": FORMAT, "version": VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": seed, "limit": limit, "policies": policies, "k_sweep": ks,
        "settings": settings.model_dump(mode="json"), "config": dict(config or {}),
        "datasets": {ds: {"questions": len(given[ds]), "evaluated": len(qs),
                          "labelled": sum(q.id in labels for q in qs),
                          **({"path": str(files[ds]), "sha256": sha256_file(files[ds])}
                             if files and ds in files else {})}
                     for ds, qs in datasets.items()},
        "packages": package_versions(), "machine": machine_info(),
        "summary": summary, "results": results, "skipped": skipped, "context_dilution": dilution,
        "records": out_records, "duration_s": time.perf_counter() - started,
    })


def aggregate(records: Mapping[str, Sequence[Mapping[str, Any]]], policies: Sequence[str], settings: EvalConfig,
              skipped: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-policy results (overall, per dataset, per group, sweep, speed-ups) and the summary, from records."""
    agg = dict(both_wrong_as=settings.both_wrong_as, bins=settings.reliability_bins,
               dominant_above=settings.collapse_dominant_above)
    results: dict[str, Any] = {}
    for p in policies:
        if p not in records:
            continue
        recs = records[p]
        results[p] = {
            "overall": summarize(recs, **agg),
            "datasets": {ds: summarize(rs, **agg) for ds, rs in _split(recs, "dataset").items()},
            "groups": {g: summarize(rs, **agg) for g, rs in _split(recs, "group").items()},
            "sweep": threshold_sweep(recs, settings.sweep_points),
        }
    ref = results.get("always")
    for res in results.values():
        res["speedup_vs_always"] = speedup(ref and ref["overall"], res["overall"])
        res["speedup_vs_always_no_retrieval"] = speedup(
            ref and ref["groups"].get(NO_RETRIEVAL), res["groups"].get(NO_RETRIEVAL))
    ad = settings.adaptive_policy
    summary = {
        "policies": {p: {key: r["overall"][key] for key in (
            "n", "accuracy", "em", "f1", "retrieval_rate", "abstain_rate", "latency_ms_mean", "latency_ms_p50",
            "latency_ms_p95", "latency_ms_p99", "ms_per_generated_token", "gate_overhead_share")}
            | {"speedup_vs_always": r["speedup_vs_always"]} for p, r in results.items()},
        "speedup_adaptive_vs_always": results.get(ad, {}).get("speedup_vs_always"),
        "speedup_no_retrieval_half": results.get(ad, {}).get("speedup_vs_always_no_retrieval"),
        "adaptive_policy": ad,
        "skipped": dict(skipped),
    }
    return results, summary


def pool_records(parts: Sequence[Mapping[str, Any]]) -> tuple[dict[str, list[Mapping[str, Any]]], dict[str, str]]:
    """Per-policy records of several results over disjoint questions, and every part's skipped policies.
    ValueError when there is nothing to pool or a policy saw one question in two parts."""
    if not parts:
        raise ValueError("nothing to merge")
    records: dict[str, list[Mapping[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for part in parts:
        skipped.update(part.get("skipped") or {})
        for r in part.get("records") or []:
            records.setdefault(r["policy"], []).append(r)
    for recs in records.values():
        seen: set[str] = set()
        for r in recs:
            if str(r["id"]) in seen:
                raise ValueError(f"question {r['id']!r} is in more than one part: the parts must be disjoint")
            seen.add(str(r["id"]))
    return records, skipped


def merge_results(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One result from several `evaluate` results over disjoint questions (cross-fitted folds, each run with
    its own gate): records are pooled and every aggregate recomputed from them. Expert utilisation is not
    kept in the JSON records, so it is absent from the merge; context dilution is not merged."""
    records, skipped = pool_records(parts)
    policies = list(dict.fromkeys(p for part in parts for p in part.get("policies") or []))
    policies = [p for p in policies if p in records and p not in skipped]
    settings = EvalConfig.model_validate(parts[0].get("settings") or {})
    results, summary = aggregate(records, policies, settings, skipped)
    first = parts[0]
    return json_safe({
        "format": FORMAT, "version": VERSION, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "merged_from": len(parts), "seed": first.get("seed"), "limit": first.get("limit"), "policies": policies,
        "k_sweep": [], "settings": settings.model_dump(mode="json"),
        "config": {"parts": [part.get("config") for part in parts]},
        "datasets": {f"{ds}#{i}": d for i, part in enumerate(parts) for ds, d in (part.get("datasets") or {}).items()},
        **({"workload": _merge_workloads([part["workload"] for part in parts if part.get("workload")])}
           if any(part.get("workload") for part in parts) else {}),
        "packages": first.get("packages"), "machine": first.get("machine"),
        "summary": summary, "results": results, "skipped": skipped, "context_dilution": {},
        "records": [r for p in policies for r in records[p]],
        "duration_s": sum(float(part.get("duration_s") or 0) for part in parts),
    })


def _merge_workloads(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sizes and per-kind counts added up; notes kept, each prefixed with its part."""
    out: dict[str, Any] = {"size": 0, "requested": 0, "available": {}, "used": {}, "notes": []}
    for i, w in enumerate(parts):
        out["size"] += int(w.get("size") or 0)
        out["requested"] += int(w.get("requested") or 0)
        for key in ("available", "used"):
            for k, v in (w.get(key) or {}).items():
                out[key][k] = out[key].get(k, 0) + int(v)
        out["notes"] += [f"part {i}: {n}" for n in w.get("notes") or []]
    return out
