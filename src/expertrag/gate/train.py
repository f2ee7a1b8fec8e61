"""Training the retrieval gate.

(a) Supervised (`objective: supervised`): fit a logistic/MLP gate on targets (1 = retrieval needed) on a
    stratified training split, calibrate it on a held-out calibration split, tune the decision threshold
    there (max F1 of retrieve, or `fit_target_rate`) unless `threshold` is fixed, report on a validation split.
(b) End-to-end discrete decision (`objective: gumbel|reinforce`): a torch gate maximises per question
        reward = (1 - a) * closed_correct + a * open_correct - retrieval_cost * a
    (a = 1: retrieve), minus rate_weight * (mean p - target_rate)^2 against collapse to always/never.
    gumbel: a is a straight-through Gumbel-sigmoid sample (hard 0/1 forward, relaxed gradient), temperature
    annealed geometrically from gumbel_tau_start to gumbel_tau_end over the epochs. reinforce: a ~ Bernoulli(p),
    score-function gradient with a moving-average reward baseline. At inference the gate retrieves iff
    p >= 0.5 (the mode of its policy). The calibration split is folded into training (no calibration: p is a
    policy, not a class probability). Seeded and deterministic (own torch.Generator, float64).
(c) `train_artifacts` trains everything a gate folder holds from per-question `GateExample`s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertrag.classification import auroc, precision_recall_f1
from expertrag.errors import ExpertRAGError
from expertrag.gate.config import GateConfig
from expertrag.gate.features import (
    OPTIONAL_PROBE_FEATURES,
    PROBE_FEATURES,
    QUERY_FEATURES,
    QUESTION_ROUTER_FEATURES,
    RETRIEVAL_FEATURES,
    SAMPLE_FEATURES,
    TIME_FEATURES,
    FeatureSpec,
    s_pop_of,
)
from expertrag.gate.labels import LABELS, branch_rewards, target
from expertrag.gate.models import (
    GateModel,
    LogisticGate,
    MLPGate,
    RouterGate,
    ThresholdGate,
    gate_from_torch,
    make_torch_net,
    standardisation,
    torch_single_thread,
    write_json_atomic,
)
from expertrag.gate.policies import ARTIFACTS, PopularityPolicy, SkrKnnPolicy
from expertrag.gate.policies.artifacts import write_band


def query_feature_names(config: GateConfig) -> tuple[str, ...]:
    """The fast (query-only) gate's scalar features under this config (its feature-group switches)."""
    return (*QUERY_FEATURES, *(RETRIEVAL_FEATURES if config.retrieval_evidence else ()),
            *(TIME_FEATURES if config.time_features else ()))


def router_feature_names(config: GateConfig) -> tuple[str, ...]:
    """Router statistics the full gate may read under gate.router_span (those the probes have)."""
    return {"prompt": OPTIONAL_PROBE_FEATURES, "question": QUESTION_ROUTER_FEATURES,
            "both": (*OPTIONAL_PROBE_FEATURES, *QUESTION_ROUTER_FEATURES)}[config.router_span]


def retrieval_rate_warning(rate: float, low: float = 0.05, high: float = 0.95) -> str | None:
    """A warning when a gate retrieves for almost every (> 95%) or almost no (< 5%) question."""
    if rate > high:
        return f"the gate retrieves for {rate:.0%} of questions: it has collapsed to (nearly) always retrieving"
    if rate < low:
        return f"the gate retrieves for {rate:.0%} of questions: it has collapsed to (nearly) never retrieving"
    return None


@dataclass
class TrainResult:
    model: GateModel
    report: dict[str, Any]


def split_indices(strata: Sequence[Any], calibration_fraction: float, validation_fraction: float,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, calibration, validation) row indices, stratified by `strata`, each sorted. Every stratum
    keeps at least one row in training."""
    s = np.asarray(strata)
    rng = np.random.default_rng(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for v in np.unique(s):
        idx = np.flatnonzero(s == v)
        rng.shuffle(idx)
        n = idx.size
        nv = min(int(round(n * validation_fraction)), max(n - 1, 0))
        nc = min(int(round(n * calibration_fraction)), max(n - nv - 1, 0))
        parts[2].extend(idx[:nv])
        parts[1].extend(idx[nv:nv + nc])
        parts[0].extend(idx[nv + nc:])
    tr, ca, va = (np.array(sorted(p), dtype=np.int64) for p in parts)
    return tr, ca, va


def _both_classes(y: np.ndarray) -> bool:
    return y.size > 0 and 0 < int(y.sum()) < y.size


def evaluate_gate(model: GateModel, X: Any, y: Any, closed: Any = None, open_: Any = None) -> dict[str, Any]:
    """Precision/recall/F1 of `retrieve`, AUROC, retrieval rate (and, given both branches' correctness,
    the accuracy of the chosen branch) on these rows."""
    y = np.asarray(y).astype(bool)
    scores = model.score_batch(X)
    pred = scores >= model.decision_threshold
    rate = float(pred.mean()) if pred.size else float("nan")
    out: dict[str, Any] = {"n": int(y.size), **precision_recall_f1(y, pred), "auroc": auroc(y, scores),
                           "retrieval_rate": rate}
    if closed is not None and open_ is not None:
        c, o = np.asarray(closed, dtype=float), np.asarray(open_, dtype=float)
        out["accuracy"] = float(np.where(pred, o, c).mean()) if pred.size else float("nan")
    out["warning"] = retrieval_rate_warning(rate) if pred.size else None
    return out


def build_model(spec: FeatureSpec, config: GateConfig) -> LogisticGate | MLPGate:
    if config.model == "logistic":
        return LogisticGate(spec, c=config.logistic_c, class_weight=config.class_weight)
    return MLPGate(spec, hidden=config.mlp_hidden, epochs=config.mlp_epochs, lr=config.learning_rate,
                   weight_decay=config.weight_decay, class_weight=config.class_weight, seed=config.seed)


def train_supervised(X: Any, y: Any, spec: FeatureSpec, config: GateConfig | None = None) -> TrainResult:
    """Fit, calibrate, tune the threshold, evaluate (see the module doc)."""
    config = config or GateConfig()
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    tr, ca, va = split_indices(y, config.calibration_fraction, config.validation_fraction, config.seed)
    if not _both_classes(y[tr]):
        raise ExpertRAGError(f"gate training needs questions of both kinds; the training split has "
                             f"{int(y[tr].sum())} 'retrieve' of {tr.size}")
    model = build_model(spec, config).fit(X[tr], y[tr])
    notes = []
    if config.calibration != "none":
        if _both_classes(y[ca]):
            model.calibrate(X[ca], y[ca], config.calibration)
        else:
            notes.append("calibration skipped: the calibration split lacks one class")
    if config.threshold is not None:
        model.decision_threshold = config.threshold
    else:
        rows = ca if _both_classes(y[ca]) else tr
        model.tune_threshold(X[rows], y[rows], config.fit_target_rate)
    report: dict[str, Any] = {
        "objective": "supervised", "model": model.kind, "features": spec.dim,
        "train": int(tr.size), "calibration": int(ca.size), "validation": int(va.size),
        "calibrated": model.calibrator.method if model.calibrator else None,
        "decision_threshold": model.decision_threshold,
    }
    ev_rows = va if va.size else tr
    if not va.size:
        notes.append("no validation split: metrics are on the training split")
    report["metrics"] = evaluate_gate(model, X[ev_rows], y[ev_rows])
    report["notes"] = notes
    return TrainResult(model, report)


def _e2e_loop(objective: str, net: Any, opt: Any, gen: Any, xt: Any, ct: Any, ot: Any, n: int,
              config: GateConfig, history: list[float]) -> None:
    """The end-to-end optimisation (see the module doc); appends each epoch's mean sampled reward."""
    import torch

    lam, mu, rate_target = config.retrieval_cost, config.rate_weight, config.target_rate
    epochs, bs = config.e2e_epochs, config.batch_size
    baseline: float | None = None
    for epoch in range(epochs):
        tau = config.gumbel_tau_start * (config.gumbel_tau_end / config.gumbel_tau_start) ** (epoch / max(1, epochs - 1))
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, bs):
            b = perm[start:start + bs]
            logits = net(xt[b]).squeeze(1)
            p = torch.sigmoid(logits)
            if objective == "gumbel":
                u = torch.rand(b.numel(), generator=gen, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
                soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
                a = (soft > 0.5).double() + soft - soft.detach()  # straight-through
                reward = (1 - a) * ct[b] + a * ot[b] - lam * a
                loss = -reward.mean()
            else:
                a = torch.bernoulli(p.detach(), generator=gen)
                reward = (1 - a) * ct[b] + a * ot[b] - lam * a
                r_mean = float(reward.mean())
                if baseline is None:
                    baseline = r_mean
                sp = torch.nn.functional.softplus  # log sigmoid(z) = -softplus(-z) (fast on CPU float64)
                logp = -(a * sp(-logits) + (1 - a) * sp(logits))
                loss = -((reward - baseline) * logp).mean()
                baseline = config.baseline_momentum * baseline + (1 - config.baseline_momentum) * r_mean
            loss = loss + mu * (p.mean() - rate_target) ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(reward.detach().sum())
        history.append(total / n)


def train_end_to_end(X: Any, closed: Any, open_: Any, spec: FeatureSpec, config: GateConfig | None = None,
                     objective: str | None = None) -> TrainResult:
    """Train a gate on the branch rewards directly (gumbel or reinforce; see the module doc)."""
    import torch

    config = config or GateConfig()
    objective = objective or config.objective
    if objective not in ("gumbel", "reinforce"):
        raise ValueError(f"end-to-end objective must be 'gumbel' or 'reinforce', got {objective!r}")
    X = np.asarray(X, dtype=np.float64)
    c = np.asarray(closed, dtype=np.float64).ravel()
    o = np.asarray(open_, dtype=np.float64).ravel()
    if not (X.ndim == 2 and X.shape[0] == c.size == o.size and X.shape[1] == spec.dim):
        raise ValueError(f"shapes disagree: X {X.shape}, closed {c.size}, open {o.size}, spec dim {spec.dim}")
    gain = np.sign(o - c).astype(np.int64)  # stratify on: retrieval helps / no difference / hurts
    tr, ca, va = split_indices(gain, 0.0, config.validation_fraction, config.seed)
    tr = np.sort(np.concatenate([tr, ca]))
    if tr.size == 0:
        raise ExpertRAGError("no training questions for the gate")
    mean, std = standardisation(X[tr])
    xt = torch.from_numpy((X[tr] - mean) / std)
    ct, ot = torch.from_numpy(c[tr]), torch.from_numpy(o[tr])
    net = make_torch_net(config.model, spec.dim, config.mlp_hidden, config.seed)
    opt = torch.optim.Adam(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    lam, mu, rate_target = config.retrieval_cost, config.rate_weight, config.target_rate
    history: list[float] = []
    with torch_single_thread():
        _e2e_loop(objective, net, opt, gen, xt, ct, ot, tr.size, config, history)
    extra: dict[str, Any] = {"class_weight": config.class_weight}
    if config.model == "logistic":
        extra["c"] = config.logistic_c
    else:
        extra.update(epochs=config.e2e_epochs, lr=config.learning_rate, weight_decay=config.weight_decay,
                     seed=config.seed)
    model = gate_from_torch(config.model, net, spec, mean, std, **extra)
    model.decision_threshold = 0.5
    ev = va if va.size else tr
    y_ev = (o[ev] > c[ev]).astype(np.int64)
    metrics = evaluate_gate(model, X[ev], y_ev, c[ev], o[ev])
    pred = model.predict_batch(X[ev])
    metrics["mean_reward"] = float((np.where(pred, o[ev], c[ev]) - lam * pred).mean())
    report = {"objective": objective, "model": model.kind, "features": spec.dim, "train": int(tr.size),
              "validation": int(va.size), "retrieval_cost": lam, "target_rate": rate_target, "rate_weight": mu,
              "train_reward_first_last": [history[0], history[-1]], "metrics": metrics,
              "notes": [] if va.size else ["no validation split: metrics are on the training split"]}
    return TrainResult(model, report)


# --------------------------------------------------------------------------------------- whole gate folder


@dataclass
class GateExample:
    """One labelled training question with everything the gate folder's parts may train on.

    query_features: gate.features.query_features(...); probe_features: gate.features.probe_features(probe)
    (None when no probe was run); query_embedding: the normalised question embedding; hidden: probe.hidden;
    closed_correct/open_correct: both branches' correctness when measured (else taken from the label).
    """

    id: str
    label: str
    query_features: dict[str, float]
    probe_features: dict[str, float] | None = None
    query_embedding: np.ndarray | None = None
    hidden: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    closed_correct: bool | None = None
    open_correct: bool | None = None


def _remove(d: Path, *names: str) -> None:
    for n in names:
        p = d / n
        if p.exists():
            p.unlink()


def _fit_gate(X: np.ndarray, y: np.ndarray, keep: np.ndarray, c: np.ndarray, o: np.ndarray,
              spec: FeatureSpec, config: GateConfig) -> TrainResult:
    if config.objective == "supervised":
        return train_supervised(X[keep], y[keep], spec, config)
    return train_end_to_end(X, c, o, spec, config)


def train_artifacts(examples: Sequence[GateExample], config: GateConfig | None,
                    out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Train and write every gate artifact the examples allow into `out_dir` (an index's gate/ folder):
    fast.json (+ .safetensors) always; full.json, entropy.json when all examples have probe features;
    router.json when they also have retrieval_affinity; skr_knn.json + .npz when all have embeddings;
    popularity.json when some have metadata.s_pop. Parts the data does not allow are removed (no stale
    artifacts). Returns the report, also written to report.json."""
    config = config or GateConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not examples:
        raise ExpertRAGError("no labelled questions to train the gate on")
    for e in examples:
        if e.label not in LABELS:
            raise ExpertRAGError(f"question {e.id}: unknown label {e.label!r}")
    t = [target(e.label, config.both_wrong_as) for e in examples]
    keep = np.array([v is not None for v in t])
    y = np.array([v if v is not None else 0 for v in t], dtype=np.int64)
    cc, oc = [], []
    for e in examples:
        if e.closed_correct is not None and e.open_correct is not None:
            cc.append(float(e.closed_correct))
            oc.append(float(e.open_correct))
        else:
            bc, bo = branch_rewards(e.label)
            cc.append(bc)
            oc.append(bo)
    c, o = np.array(cc), np.array(oc)
    report: dict[str, Any] = {
        "questions": len(examples), "used_for_supervised": int(keep.sum()),
        "labels": {lab: sum(e.label == lab for e in examples) for lab in LABELS},
        "config": config.model_dump(mode="json"), "parts": {}, "warnings": [],
    }
    has_emb = all(e.query_embedding is not None for e in examples)
    if config.use_query_embedding and not has_emb:
        raise ExpertRAGError("gate.use_query_embedding is on but some training questions have no query embedding")

    def run(name: str, spec: FeatureSpec, rows: list[dict[str, float]], vecs: list[dict[str, Any]]) -> None:
        X = spec.vectorize_many(rows, vecs)
        try:
            res = _fit_gate(X, y, keep, c, o, spec, config)
        except ValueError as err:
            raise ExpertRAGError(f"training the {name} gate: {err}") from None
        res.model.save(out / ARTIFACTS[name])
        report["parts"][name] = res.report
        w = res.report["metrics"].get("warning")
        if w:
            report["warnings"].append(f"{name} gate: {w}")

    # fast (query-only) gate
    qnames = query_feature_names(config)
    fast_spec = FeatureSpec.build(qnames, use_query_embedding=config.use_query_embedding)
    vecs = [{"query_embedding": e.query_embedding, "hidden": e.hidden} for e in examples]
    fast_spec = fast_spec.with_dims(vecs[0])
    run("fast", fast_spec, [e.query_features for e in examples], vecs)
    # the quantile probe band: how far the fast gate's training scores lie from its threshold
    from expertrag.gate.models import load_gate

    fast = load_gate(out / ARTIFACTS["fast"])
    fast_scores = fast.score_batch(fast_spec.vectorize_many([e.query_features for e in examples], vecs))
    band = write_band(out, fast.decision_threshold, fast_scores)
    report["band"] = {"threshold": band["threshold"], "n": band["n"],
                      **({f"q{config.band_quantile:g}": _band_at(band, config.band_quantile)}
                         if config.band_quantile is not None else {})}

    # full (query + probe) gate and the probe baselines
    has_probe = all(e.probe_features is not None for e in examples)
    if has_probe:
        opt = [n for n in router_feature_names(config) if all(n in (e.probe_features or {}) for e in examples)]
        if config.use_hidden and not all(e.hidden is not None for e in examples):
            raise ExpertRAGError("gate.use_hidden is on but some training probes have no hidden state")
        samples = SAMPLE_FEATURES if config.sample_consistency else ()
        if samples and not all(n in (e.probe_features or {}) for e in examples for n in samples):
            raise ExpertRAGError("gate.sample_consistency is on but some training probes have no sample features")
        full_spec = FeatureSpec.build((*qnames, *PROBE_FEATURES, *opt, *samples),
                                      use_query_embedding=config.use_query_embedding,
                                      use_hidden=config.use_hidden).with_dims(vecs[0])
        rows = [{**e.query_features, **(e.probe_features or {})} for e in examples]
        run("full", full_spec, rows, vecs)
        ent = np.array([[r["mean_token_entropy"]] for r in rows])
        report["parts"]["full"]["router_features"] = opt
        report["parts"]["entropy"] = _threshold_part(
            ThresholdGate("mean_token_entropy", direction="above"), ent, y, keep, out / ARTIFACTS["entropy"])
        if "retrieval_affinity" in opt:
            aff = np.array([[r["retrieval_affinity"]] for r in rows])
            report["parts"]["router"] = _threshold_part(RouterGate(), aff, y, keep, out / ARTIFACTS["router"])
        else:
            _remove(out, ARTIFACTS["router"])
    else:
        _remove(out, ARTIFACTS["full"], "full.safetensors", ARTIFACTS["entropy"], ARTIFACTS["router"])
        report["parts"]["full"] = "skipped: the examples have no probe features (adaptive policy unavailable)"

    # skr-knn
    if has_emb and keep.any():
        emb = np.stack([np.asarray(e.query_embedding, dtype=np.float32).ravel() for e in examples])[keep]
        SkrKnnPolicy.fit(emb, y[keep], config.skr_k).save(out)
        report["parts"]["skr-knn"] = {"questions": int(keep.sum()), "k": config.skr_k}
    else:
        _remove(out, ARTIFACTS["skr_knn"], ARTIFACTS["skr_knn_arrays"])

    # popularity (all questions with s_pop; both_wrong count as 0/0 rewards)
    pop = [(i, s_pop_of(e.metadata)) for i, e in enumerate(examples)]
    pop = [(i, s) for i, s in pop if s is not None]
    if pop:
        idx = np.array([i for i, _ in pop])
        pol = PopularityPolicy.fit([s for _, s in pop], [examples[i].metadata.get("relation") for i in idx],
                                   c[idx], o[idx], min_questions=config.popularity_min_questions,
                                   missing=config.popularity_missing)
        pol.save(out)
        report["parts"]["popularity"] = {"questions": len(pop), "global_threshold": pol.global_threshold,
                                         "relations": pol.thresholds}
    else:
        _remove(out, ARTIFACTS["popularity"])
    write_json_atomic(out / ARTIFACTS["report"], report)
    return report


def _band_at(band: dict[str, Any], q: float) -> list[float]:
    qs = band["distance_quantiles"]
    d = float(np.interp(q, np.linspace(0, 1, len(qs)), qs))
    return [band["threshold"] - d, band["threshold"] + d]


def _threshold_part(gate: ThresholdGate | RouterGate, X: np.ndarray, y: np.ndarray, keep: np.ndarray,
                    path: Path) -> dict[str, Any]:
    try:
        gate.fit(X[keep], y[keep])
    except ValueError as err:
        raise ExpertRAGError(f"tuning {path.name}: {err}") from None
    gate.save(path)
    thr = gate.threshold
    return {"threshold": thr, "metrics": evaluate_gate(gate, X[keep], y[keep])}

