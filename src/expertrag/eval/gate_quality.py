"""How good a policy's decisions and scores are against the labels, and what other thresholds would give.

Gate quality (`gate_quality`): need = `gate.labels.target(label, both_wrong_as)` (with the default
both_wrong_as="retrieve" that is "not closed_correct"), precision/recall/F1 of the decision "retrieve",
AUROC of the score, with counts, and a reliability table (`reliability`: binned score vs observed need)
when scores lie in [0, 1].

Threshold sweep (`threshold_sweep`), for every policy whose scores vary: on labelled questions where both
branches' correctness is known (closed_correct / open_correct from `expertrag label`), the decision is
recomputed as "retrieve iff score >= t" for thresholds t over the observed scores, and accuracy is read off
the labels: open_correct where it would retrieve, closed_correct where not. The model is not rerun: each
branch's answer is the greedy answer the labelling run generated for the same prompt, so the curve is exact
as long as the labels were made with the same model, prompts, k and max_new_tokens (a no-retrieval answer
that continues the probe's draft is token for token the plain closed-book answer). Two approximations: the
two-stage `adaptive` policy's score comes from its fast gate on questions it settled in the fast stage and
from its full gate on the others, and the sweep thresholds that mixed score with the stage routing held
as it was; and a sampled answer (temperature > 0) would not be reproduced. `operating_point` compares the
label-estimated accuracy at the policy's real decisions with the measured one, a check of that premise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from expertrag.eval.metrics import auroc, mean_or_nan, precision_recall_f1
from expertrag.gate.labels import target


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
                            "measured_accuracy": mean_or_nan(measured)},
    }
