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


def _sweep_inputs(records: Sequence[Mapping[str, Any]], points: int):
    """(rows, scores, closed-correct, open-correct, candidate thresholds) of the records that are labelled
    with both branches and scored; None when there are none. Candidates run from the lowest score (retrieve
    for all) to just past the highest (retrieve for none), thinned to at most `points`."""
    rows = [r for r in records if not r.get("error") and r.get("score") is not None
            and r.get("closed_correct") is not None and r.get("open_correct") is not None
            and math.isfinite(float(r["score"]))]
    if not rows:
        return None
    s = np.asarray([float(r["score"]) for r in rows])
    c = np.asarray([float(r["closed_correct"]) for r in rows])
    o = np.asarray([float(r["open_correct"]) for r in rows])
    u = np.unique(s)
    cands = np.append(u, np.nextafter(u[-1], np.inf))
    if cands.size > points:
        cands = cands[np.unique(np.linspace(0, cands.size - 1, points).round().astype(int))]
    return rows, s, c, o, cands


def threshold_sweep(records: Sequence[Mapping[str, Any]], points: int = 101) -> dict[str, Any] | None:
    """Accuracy vs retrieval rate as the decision threshold moves, read off the labels (module doc).
    None when fewer than one labelled question with both branches known, or the scores are constant."""
    sweep = _sweep_inputs(records, points)
    if sweep is None or np.unique(sweep[1]).size < 2:
        return None
    rows, s, c, o, cands = sweep
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


# ----------------------------------------------------------------------------- intervals and operating points


def _bootstrap(stat, n: int, resamples: int, seed: int, level: float = 0.95) -> list[float] | None:
    """Percentile interval of stat(indices) over `resamples` resamples of n questions with replacement
    (resamples where the statistic is undefined, NaN, are left out); None without resamples."""
    if resamples <= 0 or n == 0:
        return None
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(resamples):
        v = stat(rng.integers(0, n, n))
        if v is not None and math.isfinite(v):
            vals.append(v)
    if not vals:
        return None
    a = (1 - level) / 2
    return [float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))]


def auroc_interval(records: Sequence[Mapping[str, Any]], both_wrong_as: str = "retrieve", resamples: int = 1000,
                   seed: int = 0) -> list[float] | None:
    """Bootstrap 95% interval of the score's AUROC against the labels' need (questions resampled)."""
    rows = [(target(r["label"], both_wrong_as), float(r["score"])) for r in records  # type: ignore[arg-type]
            if r.get("label") is not None and not r.get("error") and r.get("score") is not None
            and math.isfinite(float(r["score"]))]
    rows = [(y, s) for y, s in rows if y is not None]
    if not rows:
        return None
    y = np.asarray([a for a, _ in rows], dtype=bool)
    s = np.asarray([b for _, b in rows])
    return _bootstrap(lambda i: auroc(y[i], s[i]), len(rows), resamples, seed)


def _curve(s: np.ndarray, c: np.ndarray, o: np.ndarray, cands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(retrieval rate, accuracy) at each threshold: retrieve iff score >= t (vectorised)."""
    d = s[None, :] >= cands[:, None]
    return d.mean(1), np.where(d, o[None, :], c[None, :]).mean(1)


def matching_rate(rates: np.ndarray, accs: np.ndarray, always: float) -> float:
    """The least retrieval rate whose accuracy reaches always-retrieve's (1.0 = only retrieving always does)."""
    ok = accs >= always - 1e-12
    return float(rates[ok].min()) if ok.any() else 1.0


def curve_gain(rates: np.ndarray, accs: np.ndarray, never: float, always: float) -> float:
    """Area between the accuracy-vs-retrieval curve and the random chord (never -> always), over rate [0, 1];
    > 0: the score orders questions better than chance for retrieval."""
    order = np.argsort(rates, kind="stable")
    x, y = np.concatenate([[0.0], rates[order], [1.0]]), np.concatenate([[never], accs[order], [always]])
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) - (never + always) / 2)


def operating_summary(records: Sequence[Mapping[str, Any]], points: int = 101, resamples: int = 1000,
                      seed: int = 0) -> dict[str, Any] | None:
    """Where a policy's score matches always-retrieve's accuracy and how far its curve lies above the random
    chord, read off the labels (as `threshold_sweep`), with bootstrap 95% intervals: `match_rate` is the
    share of questions it must retrieve for (always-retrieve: 1.0), `match_share_of_always` the same as a
    share of always-retrieve's retrievals (identical, since always retrieves for every question)."""
    sweep = _sweep_inputs(records, points)
    if sweep is None:
        return None
    rows, s, c, o, cands = sweep

    def stats(i: np.ndarray) -> tuple[float, float]:
        rates, accs = _curve(s[i], c[i], o[i], cands)
        return matching_rate(rates, accs, float(o[i].mean())), curve_gain(rates, accs, float(c[i].mean()),
                                                                          float(o[i].mean()))

    whole = np.arange(len(rows))
    m, g = stats(whole)
    real = np.asarray([bool(r["retrieved"]) for r in rows])
    return {"n": len(rows), "match_rate": m, "match_share_of_always": m,
            "match_rate_ci": _bootstrap(lambda i: stats(i)[0], len(rows), resamples, seed),
            "curve_gain": g, "curve_gain_ci": _bootstrap(lambda i: stats(i)[1], len(rows), resamples, seed + 1),
            "accuracy_at_decisions": float(np.where(real, o, c).mean()),
            "accuracy_ci": _bootstrap(lambda i: float(np.where(real[i], o[i], c[i]).mean()), len(rows),
                                      resamples, seed + 2),
            "always_accuracy": float(o.mean())}
