"""Gate-only evaluation: every policy's decision on labelled questions, without generating answers.

The end-to-end runner (`expertrag.eval.runner`) answers each question with each policy, which costs one or
two generations per policy per question. Gate quality needs none of that: the labels already hold both
branches' correctness (closed_correct / open_correct from `expertrag label`). So `evaluate_gates` builds one
gate context per question (query features, rankings, and the closed-book probe when a policy asks for it:
computed once and shared by all policies, as in one real answer) and asks each policy for its decision.

Per policy it reports what `aggregate.summarize` reports about the gate: precision/recall/F1 of "retrieve"
against the label's need, AUROC of the score, a reliability table, the retrieval rate, the share decided per
stage, and the threshold sweep; plus `accuracy`, read off the labels at the policy's decisions (open_correct
where it retrieves, closed_correct where not). That accuracy equals a real run's as long as the labels were
made with the same model, prompts, k and greedy decoding; the sweep's `operating_point` (eval.gate_quality)
checks it on the questions answered end to end. No latency is reported here: the probe is shared between policies, so
per-policy gate time would be wrong; latency comes from `expertrag eval` / `bench pipeline`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from tqdm.auto import tqdm

from expertrag.errors import ExpertRAGError, InputError
from expertrag.eval.aggregate import stage_shares
from expertrag.eval.config import EvalConfig
from expertrag.eval.gate_quality import auroc_interval, gate_quality, operating_summary, threshold_sweep
from expertrag.eval.merge import pool_records
from expertrag.eval.metrics import mean_or_nan
from expertrag.eval.provenance import machine_info, package_versions
from expertrag.eval.results import FORMAT, VERSION, json_safe
from expertrag.eval.tables import fmt, table
from expertrag.fileio import atomic_write_text
from expertrag.gate.labels import LabelRecord

GATES_FORMAT = FORMAT + "-gates"


def _source(r: LabelRecord) -> str:
    return str(r.metadata.get("source") or r.id.split("_")[0])


def policy_summary(records: Sequence[Mapping[str, Any]], both_wrong_as: str = "retrieve", bins: int = 10,
                   sweep_points: int = 101, bootstrap: int = 0, bootstrap_seed: int = 0,
                   answer_ms: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Label-read accuracy, retrieval rate, stage shares, gate quality and sweep of one policy's decisions;
    with `bootstrap` > 0 also the AUROC's 95% interval and the operating summary (`operating_summary`);
    the gate's mean cost (gate_ms), and, given the measured answer times per branch ({"closed", "open"} ms),
    the gate's share of answer time: mean gate_ms / mean(gate_ms + the chosen branch's answer time)."""
    known = [r for r in records if r["label_accuracy"] is not None]
    timed = [float(r["gate_ms"]) for r in records if r.get("gate_ms") is not None]
    cost: dict[str, Any] = {"gate_ms": mean_or_nan(timed) if timed else None}
    if answer_ms and timed:
        total = [float(r["gate_ms"]) + float(answer_ms["open" if r["retrieved"] else "closed"])
                 for r in records if r.get("gate_ms") is not None]
        cost["gate_share_of_answer_time"] = sum(timed) / sum(total) if sum(total) > 0 else None
    extra: dict[str, Any] = {}
    if bootstrap:
        gq = gate_quality(records, both_wrong_as, bins) or {}
        extra["auroc_ci"] = auroc_interval(records, both_wrong_as, bootstrap, bootstrap_seed) \
            if math.isfinite(gq.get("auroc", float("nan"))) else None
        extra["operating"] = operating_summary(records, sweep_points, bootstrap, bootstrap_seed)
    return {
        "n": len(records), "n_known": len(known),
        "accuracy": mean_or_nan([float(r["label_accuracy"]) for r in known]),
        "retrieval_rate": mean_or_nan([float(r["retrieved"]) for r in records]),
        "stages": stage_shares(records),
        "gate_quality": gate_quality(records, both_wrong_as, bins),
        # only where the decision changes the outcome (retrieve vs no_retrieve; both_wrong left out)
        "gate_quality_decisive": gate_quality(records, "drop", bins),
        "sweep": threshold_sweep(records, sweep_points),
        "cost": cost, **extra,
    }


def build_policies(names: Sequence[str], config: Any, artifacts_dir: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """(name -> Policy, name -> reason skipped): a policy whose gate artifacts are missing or corrupt is
    skipped with the loader's message; any other error building it is a bug and propagates."""
    from expertrag.gate.models import GateArtifactError
    from expertrag.gate.policies import make_policy

    built: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            built[name] = make_policy(name, config, artifacts_dir)
        except GateArtifactError as e:
            skipped[name] = f"{type(e).__name__}: {e}"
    return built, skipped


class _Metered:
    """One policy's view of a shared GateContext: what its decision cost as if it ran alone. The context
    caches the probe and samples for every policy; each policy that asks is charged their measured time
    (Probe.ms, the context's samples_ms) and not the wait for a first computation (counted in `wall`)."""

    def __init__(self, ctx: Any):
        self._ctx = ctx
        self.charged_ms = 0.0  # the probe/sample time this policy used
        self.waited_ms = 0.0  # wall time spent computing them inside its decide()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def probe(self) -> Any:
        t = time.perf_counter()
        p = self._ctx.probe()
        self.waited_ms += (time.perf_counter() - t) * 1000
        self.charged_ms += float(getattr(p, "ms", 0.0) or 0.0)
        return p

    def samples(self, n: int, temperature: float, seed: int) -> Any:
        t = time.perf_counter()
        out = self._ctx.samples(n, temperature, seed)
        spent = (time.perf_counter() - t) * 1000
        self.waited_ms += spent
        cost = getattr(self._ctx, "samples_cost_ms", None)  # what computing them took, cached or not
        self.charged_ms += float(cost(n, temperature, seed)) if callable(cost) else spent
        return out


def evaluate_gates(context: Callable[[LabelRecord], Any], policies: Mapping[str, Any],
                   labels: Sequence[LabelRecord], *, settings: EvalConfig | None = None,
                   progress: bool | None = None, config: Mapping[str, Any] | None = None,
                   answer_ms: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Decisions of each policy (name -> Policy) on each labelled question; `context(record)` returns the
    question's GateContext. A policy whose decide() raises an ExpertRAGError other than InputError (a
    condition the user can act on, e.g. the router policy on a model without a retrieval expert) is skipped
    with the reason; an InputError on one question is that question's error. Anything else is a bug in the
    policy and propagates (it must not turn into a "skipped" line)."""
    settings = settings or EvalConfig()
    started = time.perf_counter()
    live = dict(policies)
    skipped: dict[str, str] = {}
    records: dict[str, list[dict[str, Any]]] = {p: [] for p in live}
    errors: list[dict[str, str]] = []
    for r in tqdm(labels, desc="gates", unit="q", disable=None if progress is None else not progress):
        try:
            ctx = context(r)
        except InputError as e:
            errors.append({"id": r.id, "error": str(e)})
            continue
        if hasattr(ctx, "query_features"):  # shared by every policy (and reused by retrieval): not charged
            try:
                ctx.query_features()
            except InputError as e:
                errors.append({"id": r.id, "error": str(e)})
                continue
        for name in list(live):
            metered = _Metered(ctx)
            try:
                t = time.perf_counter()
                d = live[name].decide(metered)
                wall = (time.perf_counter() - t) * 1000
            except InputError as e:
                errors.append({"id": r.id, "policy": name, "error": str(e)})
                continue
            except ExpertRAGError as e:
                skipped[name] = f"{type(e).__name__}: {e}"
                live.pop(name)
                records.pop(name)
                continue
            known = r.closed_correct is not None and r.open_correct is not None
            records[name].append({
                "id": r.id, "source": _source(r), "policy": name, "retrieved": bool(d.retrieve),
                "score": float(d.score), "stage": d.stage, "label": r.label,
                "closed_correct": r.closed_correct, "open_correct": r.open_correct,
                "label_accuracy": (r.open_correct if d.retrieve else r.closed_correct) if known else None,
                "gate_ms": max(wall - metered.waited_ms, 0.0) + metered.charged_ms,
            })
    return json_safe({
        "format": GATES_FORMAT, "version": VERSION, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - started, "n": len(labels),
        **gate_results(records, settings, answer_ms), "skipped": skipped, "errors": errors,
        "answer_ms": dict(answer_ms) if answer_ms else None,
        "records": [rec for recs in records.values() for rec in recs],
        "packages": package_versions(), "machine": machine_info(), "config": dict(config or {}),
    })


def gate_results(records: Mapping[str, Sequence[Mapping[str, Any]]], settings: EvalConfig,
                 answer_ms: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Label counts, never/always/oracle accuracy from the labels, and each policy's summary, overall and per
    source (`policy_summary`; bootstrap intervals overall only), from per-policy decision records."""
    kw = {"both_wrong_as": settings.both_wrong_as, "bins": settings.reliability_bins,
          "sweep_points": settings.sweep_points, "answer_ms": answer_ms}
    results: dict[str, Any] = {}
    for name, recs in records.items():
        by_source: dict[str, list[Mapping[str, Any]]] = {}
        for rec in recs:
            by_source.setdefault(rec["source"], []).append(rec)
        overall = policy_summary(recs, **kw, bootstrap=settings.bootstrap, bootstrap_seed=settings.bootstrap_seed)
        results[name] = {
            "overall": overall, "sweep": overall.pop("sweep"),
            "sources": {s: {k: v for k, v in policy_summary(rs, **kw).items() if k != "sweep"}
                        for s, rs in sorted(by_source.items())},
        }
    questions: dict[str, Mapping[str, Any]] = {}
    for recs in records.values():
        for rec in recs:
            questions.setdefault(rec["id"], rec)
    known = [r for r in questions.values() if r["closed_correct"] is not None and r["open_correct"] is not None]
    return {
        "labels": {lab: sum(r["label"] == lab for r in questions.values())
                   for lab in sorted({r["label"] for r in questions.values()})},
        "baselines": {
            "never_accuracy": mean_or_nan([float(r["closed_correct"]) for r in known]),
            "always_accuracy": mean_or_nan([float(r["open_correct"]) for r in known]),
            "oracle_accuracy": mean_or_nan([float(r["closed_correct"] or r["open_correct"]) for r in known]),
        },
        "settings": settings.model_dump(mode="json"), "results": results,
    }


def merge_gate_results(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One gate evaluation from several over disjoint labelled questions (cross-fitted folds, each with the
    gate trained on the other folds): decision records pooled, every aggregate recomputed."""
    records, skipped = pool_records(parts)
    records = {p: rs for p, rs in records.items() if p not in skipped}
    settings = EvalConfig.model_validate(parts[0].get("settings") or {})
    n = len({str(r["id"]) for rs in records.values() for r in rs})
    return json_safe({
        "format": GATES_FORMAT, "version": VERSION, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "merged_from": len(parts), "duration_s": sum(float(p.get("duration_s") or 0) for p in parts), "n": n,
        **gate_results(records, settings), "skipped": skipped,
        "errors": [e for part in parts for e in part.get("errors") or []],
        "records": [r for rs in records.values() for r in rs],
        "packages": parts[0].get("packages"), "machine": parts[0].get("machine"),
        "config": {"parts": [part.get("config") for part in parts]},
    })


def render_gate_markdown(result: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    res = result.get("results") or {}
    b = result.get("baselines") or {}
    lines = ["# ExpertRAG gate evaluation", "",
             f"Created {result.get('created')}; {result.get('n')} labelled questions ("
             + ", ".join(f"{k} {v}" for k, v in (result.get("labels") or {}).items())
             + f") in {fmt(result.get('duration_s'), 0)} s. No answers were generated: accuracy is read off the "
             "labels at each policy's decisions (open-book correctness where it retrieves, closed-book where not).",
             "", f"From the labels: never-retrieve {fmt(b.get('never_accuracy'))}, always-retrieve "
             f"{fmt(b.get('always_accuracy'))}, oracle {fmt(b.get('oracle_accuracy'))}.", ""]
    for p, why in (result.get("skipped") or {}).items():
        lines.append(f"- skipped **{p}**: {why}")
    rows = []
    for p, r in res.items():
        o, g = r["overall"], r["overall"].get("gate_quality") or {}
        d = r["overall"].get("gate_quality_decisive") or {}
        rows.append([p, o["n"], fmt(o["accuracy"]), fmt(o["retrieval_rate"]), fmt(g.get("precision")),
                     fmt(g.get("recall")), fmt(g.get("f1")), fmt(g.get("auroc")),
                     f"{fmt(d.get('auroc'))} (n={d.get('n', 0)})",
                     ", ".join(f"{s} {v:.0%}" for s, v in o["stages"].items())])
    lines += ["## Policies", "", "Need = the label's target (both_wrong counted as "
              f"{(result.get('settings') or {}).get('both_wrong_as', 'retrieve')}); precision/recall/F1 of deciding "
              "to retrieve. AUROC decisive: the score's AUROC on the questions where the decision changes the "
              "outcome (labels retrieve vs no_retrieve).", ""]
    lines += table(["policy", "n", "acc (labels)", "retrieval", "precision", "recall", "F1", "AUROC",
                     "AUROC decisive", "stages"], rows)
    def ci(v: Any) -> str:
        return f" [{fmt(v[0])}, {fmt(v[1])}]" if v else ""

    op_rows = []
    for p, r in res.items():
        o = r["overall"]
        op = o.get("operating") or {}
        g = o.get("gate_quality") or {}
        cost = o.get("cost") or {}
        if not op:
            continue
        share = cost.get("gate_share_of_answer_time")
        op_rows.append([p, op.get("n"), fmt(g.get("auroc")) + ci(o.get("auroc_ci")),
                        fmt(op.get("accuracy_at_decisions")) + ci(op.get("accuracy_ci")), fmt(o["retrieval_rate"]),
                        fmt(op.get("match_rate")) + ci(op.get("match_rate_ci")),
                        fmt(op.get("curve_gain"), 4) + ci(op.get("curve_gain_ci")),
                        fmt(cost.get("gate_ms"), 1), "" if share is None else f"{share:.1%}"])
    if op_rows:
        am = result.get("answer_ms") or {}
        lines += ["## Intervals and operating points", "",
                  "Bootstrap 95% intervals over questions. match always: the least retrieval rate at which the "
                  "score's threshold sweep reaches always-retrieve's accuracy (1 = only always does), i.e. the "
                  "share of always-retrieve's retrievals needed. Curve gain: area between the accuracy-vs-"
                  "retrieval curve and the random chord. Gate ms: the policy's decision cost per question "
                  "(probe and samples charged to each policy that reads them; the shared index lookup, "
                  "reused by retrieval, not charged)"
                  + (f"; share of answer time against measured answers (closed {fmt(am.get('closed'), 0)} ms, "
                     f"open {fmt(am.get('open'), 0)} ms, {int(am.get('questions', 0))} questions)." if am else "."),
                  ""]
        lines += table(["policy", "n", "AUROC [95% CI]", "acc [95% CI]", "retrieval", "match always [95% CI]",
                        "curve gain [95% CI]", "gate ms", "gate share"], op_rows)
    sw_rows = []
    for p, r in res.items():
        sw = r.get("sweep")
        if sw:
            best = sw["best"]
            sw_rows.append([p, sw["n"], f"t={fmt(best['threshold'])}: {fmt(best['retrieval_rate'])} → "
                            f"{fmt(best['accuracy'])}"])
    if sw_rows:
        lines += ["## Threshold sweep (best point; full curve in the JSON and the figure)", ""]
        lines += table(["policy", "n", "best: retrieval rate → accuracy"], sw_rows)
    sources = sorted({s for r in res.values() for s in r["sources"]})
    if sources:
        lines += ["## By source (accuracy / retrieval rate)", ""]
        lines += table(["policy"] + sources, [[p] + [
            f"{fmt(r['sources'].get(s, {}).get('accuracy'))} / {fmt(r['sources'].get(s, {}).get('retrieval_rate'))}"
            for s in sources] for p, r in res.items()])
    if figures:
        lines += ["## Figures", ""] + [f"![{t}]({n})\n" for t, n in figures.items()]
    return "\n".join(lines).rstrip() + "\n"


def write_gate_report(result: Mapping[str, Any], out_dir: Any, name: str = "gates.md") -> Any:
    """`out_dir/name` with the accuracy-vs-retrieval and reliability figures beside it."""
    from pathlib import Path

    from expertrag.eval.report import plot_accuracy_vs_retrieval, plot_reliability

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    if plot_accuracy_vs_retrieval(result, out / "gates_accuracy_vs_retrieval.png",
                                  point_label="labels, at its threshold") is not None:
        figures["Accuracy vs retrieval rate"] = "gates_accuracy_vs_retrieval.png"
    if plot_reliability(result, out / "gates_reliability.png") is not None:
        figures["Gate reliability"] = "gates_reliability.png"
    path = out / name
    atomic_write_text(path, render_gate_markdown(result, figures))
    return path
