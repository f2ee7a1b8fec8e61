"""Merging results over disjoint questions (cross-fitted folds, each judged by the gate trained on the others).

Records are pooled and every aggregate recomputed from them (eval.aggregate), so a merge equals one run
over all the questions. `pool_records` serves both eval.json (`merge_results`) and gates.json
(eval.gate_eval.merge_gate_results).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from expertrag.eval.aggregate import aggregate
from expertrag.eval.config import EvalConfig
from expertrag.eval.results import FORMAT, VERSION, json_safe


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
