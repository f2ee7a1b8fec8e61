"""Gate training on synthetic data: supervised, end-to-end (gumbel / reinforce), the whole gate folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from expertrag.errors import ExpertRAGError
from expertrag.gate.config import GateConfig
from expertrag.gate.features import QUERY_FEATURES, FeatureSpec, probe_features
from expertrag.gate.models import load_gate
from expertrag.gate.policies import make_policy
from expertrag.gate.train import (
    GateExample,
    retrieval_rate_warning,
    split_indices,
    train_artifacts,
    train_end_to_end,
    train_supervised,
)
from expertrag.gate.types import Probe

SPEC = FeatureSpec(("x0", "x1"))
# These fixtures carry the query features only (no retrieval evidence, no time cue), so the tests switch those
# feature groups off, the package defaults being on; tests/test_gate_signals.py covers them.
QUERY_ONLY = {"retrieval_evidence": False, "time_features": False}



@dataclass
class Ctx:
    """Our GateContext for one synthetic question (counts probes)."""

    qf: dict[str, float]
    embedding: np.ndarray
    draft: Probe
    metadata: dict[str, Any] = field(default_factory=dict)
    question: str = "q"
    probes: int = 0

    def query_features(self) -> dict[str, float]:
        return self.qf

    def query_embedding(self) -> np.ndarray:
        return self.embedding

    def probe(self) -> Probe:
        self.probes += 1
        return self.draft


def test_retrieval_rate_warning():
    assert retrieval_rate_warning(0.5) is None
    assert retrieval_rate_warning(0.05) is None and retrieval_rate_warning(0.95) is None
    assert "always" in retrieval_rate_warning(0.97)
    assert "never" in retrieval_rate_warning(0.01)


def test_split_indices_stratified_disjoint_deterministic():
    y = np.array([0] * 80 + [1] * 20)
    tr, ca, va = split_indices(y, 0.2, 0.2, seed=3)
    assert sorted(np.concatenate([tr, ca, va]).tolist()) == list(range(100))
    assert (y[va] == 1).sum() == 4 and (y[ca] == 1).sum() == 4 and len(va) == 20
    assert all(np.array_equal(a, b) for a, b in zip((tr, ca, va), split_indices(y, 0.2, 0.2, seed=3), strict=True))
    tr, ca, va = split_indices([0, 1], 0.5, 0.5)  # every class keeps a training row
    assert len(tr) == 2


def test_train_supervised_reports_validation_metrics():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    X = rng.normal(size=(300, 2)) + y[:, None] * 2.5
    # the max-F1 threshold (fit_target_rate=None), not the default fixed retrieval rate
    res = train_supervised(X, y, SPEC, GateConfig(use_query_embedding=False, fit_target_rate=None))
    r = res.report
    assert r["train"] + r["calibration"] + r["validation"] == 300 and r["calibrated"] == "platt"
    m = r["metrics"]
    assert m["auroc"] > 0.9 and m["f1"] > 0.7 and 0.15 < m["retrieval_rate"] < 0.5 and m["warning"] is None
    fixed = train_supervised(X, y, SPEC, GateConfig(threshold=0.9, calibration="isotonic"))
    assert fixed.model.decision_threshold == 0.9 and fixed.report["calibrated"] == "isotonic"
    rate = train_supervised(X, y, SPEC, GateConfig(fit_target_rate=0.6, calibration="none"))
    assert rate.report["metrics"]["retrieval_rate"] == pytest.approx(0.6, abs=0.1)
    with pytest.raises(ExpertRAGError, match="both kinds"):
        train_supervised(X, np.zeros(300, dtype=int), SPEC)


# ------------------------------------------------------------------------------------------- end-to-end


def _clusters(n: int = 100, seed: int = 0):
    """B (left): closed-book right, retrieval never helps. M (top): retrieval helps 40% of questions.
    A (right): closed-book wrong, open-book right: retrieval always helps."""
    rng = np.random.default_rng(seed)
    X, c, o, cl = [], [], [], []
    for k, centre in enumerate([(-3.0, 0.0), (0.0, 3.0), (3.0, 0.0)]):
        X.append(rng.normal(centre, 0.5, size=(n, 2)))
        cl += [k] * n
        o += [1.0] * n
        if k == 0:
            c += [1.0] * n
        elif k == 2:
            c += [0.0] * n
        else:
            c += list(np.where(rng.random(n) < 0.4, 0.0, 1.0))
    return np.vstack(X), np.array(c), np.array(o), np.array(cl)


def _e2e(objective: str, **kw):
    X, c, o, cl = _clusters()
    cfg = GateConfig(objective=objective, e2e_epochs=40, learning_rate=0.05, rate_weight=0.0, **kw)
    model = train_end_to_end(X, c, o, SPEC, cfg).model
    pred = model.predict_batch(X)
    return [float(pred[cl == k].mean()) for k in range(3)], float(pred.mean()), model


@pytest.fixture(scope="module")
def e2e_runs():
    return {(obj, lam): _e2e(obj, retrieval_cost=lam) for obj in ("gumbel", "reinforce") for lam in (0.1, 0.7, 2.0)}


@pytest.mark.parametrize("objective", ["gumbel", "reinforce"])
def test_e2e_retrieves_where_it_helps(objective, e2e_runs):
    per_cluster, _, _ = e2e_runs[(objective, 0.7)]
    assert per_cluster[0] < 0.05 and per_cluster[1] < 0.05 and per_cluster[2] > 0.95
    per_cluster, _, _ = e2e_runs[(objective, 0.1)]  # cheap retrieval: also the 40%-gain cluster
    assert per_cluster[0] < 0.05 and per_cluster[1] > 0.95 and per_cluster[2] > 0.95


@pytest.mark.parametrize("objective", ["gumbel", "reinforce"])
def test_e2e_retrieval_cost_is_monotone(objective, e2e_runs):
    rates = [e2e_runs[(objective, lam)][1] for lam in (0.1, 0.7, 2.0)]
    assert rates[0] > rates[1] > rates[2]
    assert rates[2] < 0.05  # retrieval costs more than it can gain


@pytest.mark.parametrize("objective", ["gumbel", "reinforce"])
def test_target_rate_regulariser_pulls_toward_target(objective, e2e_runs):
    free = e2e_runs[(objective, 0.1)][1]  # ~2/3
    _, unweighted, _ = _e2e(objective, retrieval_cost=0.1, target_rate=0.95)  # rate_weight 0: no pull
    assert unweighted == pytest.approx(free)
    X, c, o, _ = _clusters()
    cfg = GateConfig(objective=objective, e2e_epochs=40, learning_rate=0.05, retrieval_cost=0.1,
                     target_rate=0.95, rate_weight=5.0)
    res = train_end_to_end(X, c, o, SPEC, cfg)
    rate = float(res.model.predict_batch(X).mean())
    assert abs(rate - 0.95) < abs(free - 0.95) and rate > 0.85
    assert res.report["rate_weight"] == 5.0 and "mean_reward" in res.report["metrics"]


def test_e2e_is_deterministic(e2e_runs):
    _, _, again = _e2e("reinforce", retrieval_cost=0.7)
    X, _, _, _ = _clusters()
    assert np.array_equal(again.score_batch(X), e2e_runs[("reinforce", 0.7)][2].score_batch(X))


def test_e2e_mlp_gate(tmp_path):
    X, c, o, cl = _clusters(60)
    cfg = GateConfig(objective="gumbel", model="mlp", mlp_hidden=8, e2e_epochs=30, learning_rate=0.05,
                     retrieval_cost=0.7, rate_weight=0.0)
    model = train_end_to_end(X, c, o, SPEC, cfg).model
    pred = model.predict_batch(X)
    assert pred[cl == 2].mean() > 0.9 and pred[cl == 0].mean() < 0.1
    model.save(tmp_path / "m.json")
    assert np.array_equal(load_gate(tmp_path / "m.json").score_batch(X), model.score_batch(X))


# ------------------------------------------------------------------------------------ whole gate folder


def _examples(n: int = 160, seed: int = 0) -> list[GateExample]:
    """Synthetic questions: those with a weak top-1 BM25 score and an uncertain draft need retrieval."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        need = i % 2 == 0
        qf = {k: 0.0 for k in QUERY_FEATURES}
        qf["bm25_top1"] = float(rng.normal(5.0 if need else 12.0, 2.0))
        qf["q_words"] = float(rng.integers(4, 12))
        probe = Probe(text="x", token_ids=[1, 2], logprobs=[-0.2, -1.0 if need else -0.1],
                      entropies=[float(rng.normal(2.0 if need else 0.6, 0.3)), 1.0],
                      retrieval_affinity=float(np.clip(rng.normal(0.5 if need else 0.2, 0.08), 0, 1)))
        emb = rng.normal(size=4) + (np.array([2.0, 0, 0, 0]) if need else np.array([0, 2.0, 0, 0]))
        closed, open_ = (False, True) if need else (True, bool(rng.random() < 0.8))
        out.append(GateExample(id=f"q{i}", label="retrieve" if need else "no_retrieve", query_features=qf,
                               probe_features=probe_features(probe), query_embedding=emb / np.linalg.norm(emb),
                               metadata={"s_pop": float(rng.uniform(0, 100) if need else rng.uniform(200, 900)),
                                         "relation": "occupation"},
                               closed_correct=closed, open_correct=open_))
    return out


def test_train_artifacts_writes_a_gate_folder_the_policies_load(tmp_path):
    examples = _examples()
    cfg = GateConfig(popularity_min_questions=5, **QUERY_ONLY)
    report = train_artifacts(examples, cfg, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    # exactly these: every file is written through a temporary one, and none may be left behind
    assert names == {"fast.json", "fast.safetensors", "full.json", "full.safetensors", "skr_knn.json", "skr_knn.npz",
                     "popularity.json", "entropy.json", "router.json", "report.json", "band.json"}
    assert report["parts"]["fast"]["metrics"]["auroc"] > 0.9 and report["parts"]["full"]["metrics"]["auroc"] > 0.9
    assert json.loads((tmp_path / "report.json").read_text())["questions"] == len(examples)
    assert "occupation" in report["parts"]["popularity"]["relations"]

    right = 0
    for e in examples[:20]:
        probe = Probe(text="x", token_ids=[1], logprobs=[-0.1], entropies=[e.probe_features["first_token_entropy"]],
                      retrieval_affinity=e.probe_features["retrieval_affinity"])
        for name in ("adaptive", "skr-knn", "popularity", "entropy", "router"):
            ctx = Ctx(qf=e.query_features, embedding=e.query_embedding, draft=probe, metadata=e.metadata)
            d = make_policy(name, cfg, tmp_path).decide(ctx)
            assert ctx.probes <= 1
            right += d.retrieve == (e.label == "retrieve")
    assert right >= 0.9 * 20 * 5

    # without probe features: only the query-only parts; stale probe artifacts are removed
    for e in examples:
        e.probe_features = None
    report = train_artifacts(examples, GateConfig(objective="reinforce", e2e_epochs=20, **QUERY_ONLY), tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "full.json" not in names and "entropy.json" not in names and "router.json" not in names
    assert report["parts"]["fast"]["objective"] == "reinforce" and "skipped" in report["parts"]["full"]
    with pytest.raises(ExpertRAGError, match="full.json"):
        make_policy("adaptive", GateConfig(), tmp_path)


def test_train_artifacts_errors(tmp_path):
    examples = _examples(20)
    with pytest.raises(ExpertRAGError, match="no labelled questions"):
        train_artifacts([], None, tmp_path)
    examples[0].query_embedding = None
    with pytest.raises(ExpertRAGError, match="use_query_embedding"):
        train_artifacts(examples, None, tmp_path)
    for e in examples:
        e.label = "no_retrieve"
    with pytest.raises(ExpertRAGError, match="both kinds"):
        train_artifacts(examples, GateConfig(use_query_embedding=False, **QUERY_ONLY), tmp_path)
