"""The Markdown report and its figures, from small synthetic evaluation results."""

from __future__ import annotations

import json

from expertrag.eval.aggregate import summarize
from expertrag.eval.gate_quality import threshold_sweep
from expertrag.eval.report import ACC_FIG, DIL_FIG, EXPERT_FIG, LAT_FIG, REL_FIG, write_report
from expertrag.eval.results import json_safe, write_json

PNG = b"\x89PNG\r\n\x1a\n"


def records(policy: str, retrieve_from: int, n: int = 8, experts: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        r = i >= retrieve_from
        out.append({
            "id": str(i), "dataset": "popqa" if i % 2 else "nq", "policy": policy,
            "decision": "retrieve" if r else "no_retrieve", "retrieved": r, "score": i / n, "stage": "fast",
            "correct": (i < 4) or r, "em": float(i < 2), "f1": 0.5, "abstained": False, "confidence": 0.8,
            "latency_ms": 100.0 + 50 * r + i, "gate_ms": 1.0, "probe_ms": 0.0, "retrieval_ms": 5.0 * r,
            "generation_ms": 90.0, "prompt_tokens": 30 + 200 * r, "generated_tokens": 6, "retrievals": int(r),
            "label": "no_retrieve" if i < 4 else "retrieve", "closed_correct": i < 4, "open_correct": i >= 2,
            "group": "no_retrieval" if i < 4 else "retrieval",
            "_experts": {"layers": {"0": [0.5, 0.3, 0.2], "2": [0.7, 0.1, 0.2]}, "retrieval_expert_share": 0.2}
            if experts else {},
        })
    return out


def synthetic(experts: bool = True) -> dict:
    runs = {"never": records("never", 99, experts=experts), "always": records("always", 0, experts=experts),
            "adaptive": records("adaptive", 4, experts=experts)}
    for r in runs["never"] + runs["always"]:
        r["score"] = float(r["retrieved"])
    results = {}
    for p, recs in runs.items():
        results[p] = {"overall": summarize(recs),
                      "datasets": {d: summarize([r for r in recs if r["dataset"] == d]) for d in ("nq", "popqa")},
                      "groups": {g: summarize([r for r in recs if r["group"] == g]) for g in ("no_retrieval", "retrieval")},
                      "sweep": threshold_sweep(recs), "speedup_vs_always": None}
    results["adaptive"]["speedup_vs_always"] = 1.4
    return {
        "created": "2025-01-01T00:00:00+00:00", "seed": 0, "limit": None, "duration_s": 3.0,
        "machine": {"platform": "Linux", "cpu_count": 2}, "packages": {"expertrag": "0.1.0"},
        "datasets": {"nq": {"questions": 4, "evaluated": 4, "labelled": 4, "sha256": "ab" * 32},
                     "popqa": {"questions": 4, "evaluated": 4, "labelled": 4}},
        "settings": {"both_wrong_as": "retrieve"},
        "summary": {"adaptive_policy": "adaptive", "speedup_adaptive_vs_always": 1.4, "speedup_no_retrieval_half": 1.5,
                    "skipped": {"skr-knn": "GateArtifactError: missing"}},
        "results": results, "skipped": {"skr-knn": "GateArtifactError: missing"},
        "context_dilution": {"1": {"n": 8, "accuracy": 0.5, "em": 0.1, "f1": 0.4, "mean_prompt_tokens": 90.0,
                                   "latency_ms_mean": 120.0},
                             "5": {"n": 8, "accuracy": 0.6, "em": 0.1, "f1": 0.4, "mean_prompt_tokens": 400.0,
                                   "latency_ms_mean": 160.0}},
        "records": [r for recs in runs.values() for r in recs],
    }


def test_report_writes_markdown_and_every_figure(tmp_path):
    md = write_report(synthetic(), tmp_path)
    text = md.read_text()
    for fig in (ACC_FIG, LAT_FIG, EXPERT_FIG, REL_FIG, DIL_FIG):
        assert (tmp_path / fig).read_bytes()[:8] == PNG, fig
        assert f"]({fig})" in text
    assert "| adaptive | 8 | 1.000 |" in text  # policy table: n, accuracy
    assert "| never | 8 | 0.500 |" in text
    assert "1.40×" in text and "1.50×" in text  # speed-ups
    assert "**skr-knn**: GateArtifactError: missing" in text
    assert "## Threshold sweep" in text and "## Context dilution" in text and "## Gate quality" in text
    assert "## By dataset" in text and "| popqa |" in text and "no_retrieval" in text
    assert "## Expert utilisation" in text


def test_report_from_the_json_file_without_optional_parts(tmp_path):
    """What `expertrag eval` writes (NaN -> null, no per-question expert shares) renders as well."""
    res = synthetic(experts=False)
    res["results"]["never"]["overall"]["accuracy"] = float("nan")
    res["context_dilution"] = {}
    path = write_json(res, tmp_path / "eval.json")
    loaded = json.loads(path.read_text())
    assert loaded == json_safe(res) and loaded["results"]["never"]["overall"]["accuracy"] is None
    md = write_report(loaded, tmp_path / "out")
    text = md.read_text()
    assert (tmp_path / "out" / LAT_FIG).is_file() and (tmp_path / "out" / ACC_FIG).is_file()
    assert not (tmp_path / "out" / EXPERT_FIG).exists() and not (tmp_path / "out" / DIL_FIG).exists()
    assert "| never | 8 | – |" in text and "## Expert utilisation" not in text
