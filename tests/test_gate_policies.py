"""Every policy's decision logic, with our own GateContext implementation (a tiny dataclass)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from expertrag.errors import ExpertRAGError
from expertrag.gate.config import GateConfig
from expertrag.gate.features import FeatureSpec
from expertrag.gate.models import GateArtifactError, LogisticGate, RouterGate, ThresholdGate
from expertrag.gate.policies import (
    POLICIES,
    AdaptivePolicy,
    PopularityPolicy,
    SkrKnnPolicy,
    best_popularity_threshold,
    make_policy,
)
from expertrag.gate.types import Probe


@dataclass
class Ctx:
    """A GateContext that counts what the policy asked for."""

    question: str = "who is it?"
    metadata: dict[str, Any] = field(default_factory=dict)
    qf: dict[str, float] = field(default_factory=dict)
    embedding: np.ndarray | None = None
    draft: Probe | None = None
    probes: int = 0
    embeddings: int = 0

    def query_features(self) -> dict[str, float]:
        return self.qf

    def query_embedding(self) -> np.ndarray:
        self.embeddings += 1
        assert self.embedding is not None, "policy asked for an embedding it should not need"
        return self.embedding

    def probe(self) -> Probe:
        self.probes += 1
        assert self.draft is not None, "policy probed where it should not"
        return self.draft


def _probe(entropies=(1.0,), logprobs=(-0.1,), **kw) -> Probe:
    return Probe(text="x", token_ids=list(range(len(logprobs))), logprobs=list(logprobs),
                 entropies=list(entropies), **kw)


def test_registry():
    assert set(POLICIES) == {"never", "always", "popularity", "skr-knn", "entropy", "flare", "adaptive", "router"}
    with pytest.raises(ExpertRAGError, match="unknown gate policy 'sometimes'"):
        make_policy("sometimes")


def test_never_and_always_do_not_probe():
    for name, want in (("never", False), ("always", True)):
        ctx = Ctx()
        d = make_policy(name).decide(ctx)
        assert d.retrieve is want and d.stage == "fixed" and d.policy == name
        assert ctx.probes == 0 and ctx.embeddings == 0


# --------------------------------------------------------------------------------------------- popularity


def test_best_popularity_threshold_maximises_adaptive_accuracy():
    s = [10, 20, 30, 400, 500]
    closed = [0, 0, 1, 1, 1]
    open_ = [1, 1, 0, 0, 1]
    assert best_popularity_threshold(s, closed, open_) == pytest.approx(25)  # retrieve 10, 20: 5/5 right
    assert best_popularity_threshold([5, 6], [1, 1], [1, 1]) == 5  # retrieval never helps: never retrieve


def test_popularity_per_relation_thresholds_and_fallbacks(tmp_path):
    rng = np.random.default_rng(0)
    s, rel, c, o = [], [], [], []
    for relation, cut in (("occupation", 100.0), ("capital", 1000.0)):
        pops = rng.uniform(0, 2000, 40)
        s += list(pops)
        rel += [relation] * 40
        c += list((pops >= cut).astype(float))  # popular subjects: known closed-book
        o += [1.0] * 40
    s += [50.0, 60.0]
    rel += ["rare", None]  # too few for their own threshold
    c += [0.0, 0.0]
    o += [1.0, 1.0]
    pol = PopularityPolicy.fit(s, rel, c, o, min_questions=10)
    assert set(pol.thresholds) == {"occupation", "capital"}
    for relation, cut in (("occupation", 100.0), ("capital", 1000.0)):
        pops = np.array([p for p, r in zip(s, rel, strict=True) if r == relation])
        # the lowest threshold that retrieves every unknown subject: between the two pops around the cut
        assert pops[pops < cut].max() < pol.thresholds[relation] <= pops[pops >= cut].min()

    def decide(meta):
        ctx = Ctx(metadata=meta)
        d = pol.decide(ctx)
        assert ctx.probes == 0 and ctx.embeddings == 0
        return d

    d = decide({"s_pop": 500, "relation": "occupation"})
    assert not d.retrieve and d.stage == "metadata" and d.features == {"log_s_pop": pytest.approx(math.log1p(500))}
    assert d.score < 0.5
    assert decide({"s_pop": 500, "relation": "capital"}).retrieve
    assert decide({"s_pop": 500, "relation": "unknown"}).retrieve is (500 < pol.global_threshold)
    missing = decide({"relation": "capital"})
    assert missing.retrieve and missing.stage == "fixed"
    pol.save(tmp_path)
    cfg = GateConfig(popularity_missing="no_retrieve")
    back = make_policy("popularity", cfg, tmp_path)
    assert back.thresholds == pol.thresholds and not back.decide(Ctx(metadata={})).retrieve
    fixed = make_policy("popularity", GateConfig(popularity_threshold=100), None)
    assert fixed.decide(Ctx(metadata={"s_pop": 99, "relation": "capital"})).retrieve


# ------------------------------------------------------------------------------------------------ skr-knn


def test_skr_knn_majority_vote(tmp_path):
    emb = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0, 1], [0.1, 0.9]], dtype=np.float32)
    labels = [1, 1, 0, 0, 0]
    pol = SkrKnnPolicy.fit(emb, labels, k=3)
    ctx = Ctx(embedding=np.array([1.0, 0.05]))
    d = pol.decide(ctx)
    assert d.retrieve and d.score == pytest.approx(2 / 3) and d.stage == "fast" and ctx.probes == 0
    assert not pol.decide(Ctx(embedding=np.array([0.0, 1.0]))).retrieve
    tie = SkrKnnPolicy.fit(emb, labels, k=4)  # 2 of 4 -> tie -> no retrieval
    assert not tie.decide(Ctx(embedding=np.array([1.0, 0.05]))).retrieve
    pol.save(tmp_path)
    back = make_policy("skr-knn", GateConfig(skr_k=3), tmp_path)
    assert back.decide(Ctx(embedding=np.array([1.0, 0.05]))) == d
    with pytest.raises(ExpertRAGError, match="2-dim embeddings, the query embedding has 3"):
        back.decide(Ctx(embedding=np.ones(3)))


# ---------------------------------------------------------------------------------------- probe baselines


def test_entropy_flare_router():
    ent = make_policy("entropy", GateConfig(entropy_threshold=1.0))
    ctx = Ctx(draft=_probe(entropies=(2.0, 0.5)))
    d = ent.decide(ctx)
    assert d.retrieve and d.score == pytest.approx(1.25) and d.stage == "probe" and ctx.probes == 1
    assert not ent.decide(Ctx(draft=_probe(entropies=(0.2, 0.4)))).retrieve
    assert ent.decide(Ctx(draft=_probe(entropies=(), logprobs=()))).retrieve  # empty draft

    flare = make_policy("flare", GateConfig(flare_threshold=0.2))
    assert flare.decide(Ctx(draft=_probe(logprobs=(-0.1, math.log(0.1))))).retrieve
    d = flare.decide(Ctx(draft=_probe(logprobs=(-0.1, math.log(0.3)))))
    assert not d.retrieve and d.score == pytest.approx(0.7) and d.features["min_logprob"] == pytest.approx(math.log(0.3))

    router = make_policy("router", GateConfig(router_threshold=0.3))
    assert router.decide(Ctx(draft=_probe(retrieval_affinity=0.35))).retrieve
    assert not router.decide(Ctx(draft=_probe(retrieval_affinity=0.25))).retrieve
    with pytest.raises(ExpertRAGError, match="retrieval expert"):
        router.decide(Ctx(draft=_probe()))


def test_tuned_thresholds_load_from_artifacts(tmp_path):
    for name in ("entropy", "router", "popularity", "skr-knn", "adaptive"):
        with pytest.raises(GateArtifactError, match="expertrag train gate"):
            make_policy(name, GateConfig(), tmp_path)
        with pytest.raises(GateArtifactError, match="no gate folder was given"):
            make_policy(name, GateConfig(), None)
    ThresholdGate("mean_token_entropy", threshold=0.7, direction="above").save(tmp_path / "entropy.json")
    RouterGate(threshold=0.4).save(tmp_path / "router.json")
    assert make_policy("entropy", GateConfig(), tmp_path).threshold == 0.7
    assert make_policy("router", GateConfig(), tmp_path).threshold == 0.4
    assert make_policy("entropy", GateConfig(entropy_threshold=2.0), tmp_path).threshold == 2.0
    ThresholdGate("draft_tokens", threshold=3.0).save(tmp_path / "entropy.json")
    with pytest.raises(GateArtifactError, match="not a threshold on mean_token_entropy"):
        make_policy("entropy", GateConfig(), tmp_path)


# ----------------------------------------------------------------------------------------------- adaptive


def _fast_gate() -> LogisticGate:
    """score = sigmoid(bm25_top1): a hand-set query-only gate."""
    g = LogisticGate(FeatureSpec(("bm25_top1",)))
    g.coef, g.intercept = np.array([1.0]), 0.0
    return g


def test_adaptive_two_stage(tmp_path):
    full = ThresholdGate("mean_token_entropy", threshold=1.0)
    pol = AdaptivePolicy(_fast_gate(), full, low=0.2, high=0.8)
    draft = _probe(entropies=(2.0,))

    clear_no = Ctx(qf={"bm25_top1": -4.0}, draft=draft)
    d = pol.decide(clear_no)
    assert not d.retrieve and d.stage == "fast" and clear_no.probes == 0 and clear_no.embeddings == 0
    assert d.score == pytest.approx(1 / (1 + math.exp(4))) and d.features == {"bm25_top1": -4.0}

    clear_yes = Ctx(qf={"bm25_top1": 4.0}, draft=draft)
    d = pol.decide(clear_yes)
    assert d.retrieve and d.stage == "fast" and clear_yes.probes == 0

    for entropy, want in ((2.0, True), (0.5, False)):
        unsure = Ctx(qf={"bm25_top1": 0.3}, draft=_probe(entropies=(entropy,)))
        d = pol.decide(unsure)
        assert unsure.probes == 1 and d.stage == "probe" and d.retrieve is want
        assert d.features["mean_token_entropy"] == entropy and d.features["fast_score"] == pytest.approx(
            1 / (1 + math.exp(-0.3)))

    # loaded from a gate folder
    pol.fast.save(tmp_path / "fast.json")
    full.save(tmp_path / "full.json")
    loaded = make_policy("adaptive", GateConfig(low=0.1, high=0.9), tmp_path)
    ctx = Ctx(qf={"bm25_top1": 2.0}, draft=draft)  # 0.88: inside the wider band
    assert loaded.decide(ctx).stage == "probe" and ctx.probes == 1


def test_adaptive_uses_embedding_and_hidden_when_the_specs_say_so():
    fast = LogisticGate(FeatureSpec(("bm25_top1",), (("query_embedding", 2),)))
    fast.mean, fast.std = np.zeros(3), np.ones(3)
    fast.coef, fast.intercept = np.array([0.0, 1.0, 0.0]), 0.0
    full = LogisticGate(FeatureSpec(("bm25_top1", "mean_token_entropy"), (("hidden", 2),)))
    full.mean, full.std = np.zeros(4), np.ones(4)
    full.coef, full.intercept = np.array([0.0, 0.0, 0.0, 5.0]), 0.0
    pol = AdaptivePolicy(fast, full, 0.2, 0.8)
    ctx = Ctx(qf={"bm25_top1": 1.0}, embedding=np.array([0.1, 0.0]),
              draft=_probe(hidden=np.array([0.0, 1.0], dtype=np.float32)))
    d = pol.decide(ctx)
    assert ctx.embeddings >= 1 and ctx.probes == 1 and d.retrieve and d.score == pytest.approx(1 / (1 + math.exp(-5)))
    no_hidden = Ctx(qf={"bm25_top1": 1.0}, embedding=np.array([0.1, 0.0]), draft=_probe())
    with pytest.raises(ExpertRAGError, match="hidden state"):
        pol.decide(no_hidden)
    with pytest.raises(ExpertRAGError, match="query-only"):
        AdaptivePolicy(full, full, 0.2, 0.8)


def test_adaptive_band_follows_the_fast_gate_threshold():
    """With `band`, the probe band is centred on the fast gate's own tuned threshold, not [low, high]."""
    import numpy as np

    from expertrag.gate.features import FeatureSpec
    from expertrag.gate.models import ThresholdGate
    from expertrag.gate.policies import AdaptivePolicy

    fast = ThresholdGate("q_words", threshold=0.0)
    fast.spec = FeatureSpec.build(["q_words"])
    full = ThresholdGate("q_words", threshold=0.0)
    fast.decision_threshold = 0.9
    policy = AdaptivePolicy(fast, full, low=0.2, high=0.8, band=0.05)
    assert (policy.low, policy.high) == (pytest.approx(0.85), pytest.approx(0.95))
    assert np.isclose(AdaptivePolicy(fast, full, low=0.2, high=0.8).high, 0.8)
