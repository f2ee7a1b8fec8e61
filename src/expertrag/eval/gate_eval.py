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

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from tqdm.auto import tqdm

from expertrag.errors import ExpertRAGError, InputError
from expertrag.eval.aggregate import stage_shares
from expertrag.eval.config import EvalConfig
from expertrag.eval.gate_quality import gate_quality, threshold_sweep
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
                   sweep_points: int = 101) -> dict[str, Any]:
    """Label-read accuracy, retrieval rate, stage shares, gate quality and sweep of one policy's decisions."""
    known = [r for r in records if r["label_accuracy"] is not None]
    return {
        "n": len(records), "n_known": len(known),
        "accuracy": mean_or_nan([float(r["label_accuracy"]) for r in known]),
        "retrieval_rate": mean_or_nan([float(r["retrieved"]) for r in records]),
        "stages": stage_shares(records),
        "gate_quality": gate_quality(records, both_wrong_as, bins),
        # only where the decision changes the outcome (retrieve vs no_retrieve; both_wrong left out)
        "gate_quality_decisive": gate_quality(records, "drop", bins),
        "sweep": threshold_sweep(records, sweep_points),
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


def evaluate_gates(context: Callable[[LabelRecord], Any], policies: Mapping[str, Any],
                   labels: Sequence[LabelRecord], *, settings: EvalConfig | None = None,
                   progress: bool | None = None, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
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
        for name in list(live):
            try:
                d = live[name].decide(ctx)
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
            })
    return json_safe({
        "format": GATES_FORMAT, "version": VERSION, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - started, "n": len(labels),
        **gate_results(records, settings), "skipped": skipped, "errors": errors,
        "records": [rec for recs in records.values() for rec in recs],
        "packages": package_versions(), "machine": machine_info(), "config": dict(config or {}),
    })


def gate_results(records: Mapping[str, Sequence[Mapping[str, Any]]], settings: EvalConfig) -> dict[str, Any]:
    """Label counts, never/always/oracle accuracy from the labels, and each policy's summary, overall and per
    source (`policy_summary`), from per-policy decision records."""
    kw = {"both_wrong_as": settings.both_wrong_as, "bins": settings.reliability_bins,
          "sweep_points": settings.sweep_points}
    results: dict[str, Any] = {}
    for name, recs in records.items():
        by_source: dict[str, list[Mapping[str, Any]]] = {}
        for rec in recs:
            by_source.setdefault(rec["source"], []).append(rec)
        overall = policy_summary(recs, **kw)
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
