"""Aggregates of per-question records: one policy's summary, and a whole run's results and summary.

Per policy, overall, per dataset and per group (groups from the label: `no_retrieval` = the closed-book
answer was right, `retrieval` = only the open-book one was, `both_wrong`; or given by the caller, as the
mixed workload does): accuracy, EM, F1, abstain and retrieval rates, share decided per gate stage, latency
mean/p50/p95/p99 (`Timings.total_ms`), generation ms per generated token (generation time, prefill included,
over generated tokens), mean prompt tokens, retrievals per query, gate overhead (gate_ms / total_ms; the
closed-book probe is reported apart as probe_share), expert utilisation (eval.experts), gate quality
against the labels and the threshold sweep (eval.gate_quality), and the speed-up against `always`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from expertrag.eval.config import EvalConfig
from expertrag.eval.experts import expert_utilisation
from expertrag.eval.gate_quality import gate_quality, threshold_sweep
from expertrag.eval.metrics import latency_summary, mean_or_nan, ratio_or_nan
from expertrag.eval.records import NO_RETRIEVAL


def stage_shares(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Share of the records decided at each gate stage ("fixed", "fast", "probe", "metadata")."""
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r.get("stage"))] = counts.get(str(r.get("stage")), 0) + 1
    return {k: v / len(records) for k, v in sorted(counts.items())} if records else {}


def summary_options(settings: EvalConfig) -> dict[str, Any]:
    """`summarize`'s keyword arguments from the eval settings."""
    return dict(both_wrong_as=settings.both_wrong_as, bins=settings.reliability_bins,
                dominant_above=settings.collapse_dominant_above)


def summarize(records: Sequence[Mapping[str, Any]], *, both_wrong_as: str = "retrieve", bins: int = 10,
              dominant_above: float = 0.5) -> dict[str, Any]:
    """Aggregate metrics of one policy's per-question records (module doc)."""
    ok = [r for r in records if not r.get("error")]
    graded = [r for r in ok if r.get("correct") is not None]
    lat = [r["latency_ms"] for r in ok]
    total = sum(lat)
    gen_tokens = sum(r["generated_tokens"] for r in ok)
    out: dict[str, Any] = {
        "n": len(ok), "errors": len(records) - len(ok), "graded": len(graded),
        "correct": sum(bool(r["correct"]) for r in graded),
        "accuracy": mean_or_nan([float(r["correct"]) for r in graded]),
        "em": mean_or_nan([r["em"] for r in graded]), "f1": mean_or_nan([r["f1"] for r in graded]),
        "abstain_rate": mean_or_nan([float(r["abstained"]) for r in ok]),
        "retrieval_rate": mean_or_nan([float(r["retrieved"]) for r in ok]),
        "retrievals_per_query": mean_or_nan([r.get("retrievals", int(r["retrieved"])) for r in ok]),
        "stages": stage_shares(ok),
        **latency_summary(lat),
        "ms_per_generated_token": ratio_or_nan(sum(decode_ms(r) for r in ok), gen_tokens),
        "mean_prompt_tokens": mean_or_nan([r["prompt_tokens"] for r in ok]),
        "mean_generated_tokens": mean_or_nan([r["generated_tokens"] for r in ok]),
        "gate_overhead_share": ratio_or_nan(sum(r["gate_ms"] for r in ok), total),
        "probe_share": ratio_or_nan(sum(r["probe_ms"] for r in ok), total),
        "retrieval_share": ratio_or_nan(sum(r["retrieval_ms"] for r in ok), total),
        "gate_quality": gate_quality(ok, both_wrong_as, bins),
        "experts": expert_utilisation((r.get("_experts") or {} for r in ok), dominant_above),
    }
    return out


def split_by(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, list[Mapping[str, Any]]]:
    """Records grouped by the value of `key` (records without it left out)."""
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


def aggregate(records: Mapping[str, Sequence[Mapping[str, Any]]], policies: Sequence[str], settings: EvalConfig,
              skipped: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-policy results (overall, per dataset, per group, sweep, speed-ups) and the summary, from records."""
    agg = summary_options(settings)
    results: dict[str, Any] = {}
    for p in policies:
        if p not in records:
            continue
        recs = records[p]
        results[p] = {
            "overall": summarize(recs, **agg),
            "datasets": {ds: summarize(rs, **agg) for ds, rs in split_by(recs, "dataset").items()},
            "groups": {g: summarize(rs, **agg) for g, rs in split_by(recs, "group").items()},
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


def decode_ms(record: dict[str, Any]) -> float:
    """Time spent producing the answer's generated tokens. A no-retrieval answer that continued the probe's
    draft counts the draft too, since its tokens are the answer's first. Records written before Timings
    partitioned the total (no `other_ms`) already counted the draft inside generation_ms."""
    ms = record["generation_ms"]
    if "other_ms" in record and not record["retrieved"]:
        ms += record["probe_ms"]
    return ms
