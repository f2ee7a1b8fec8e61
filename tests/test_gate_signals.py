"""The issue-14 gate signals: time cues and the time rule, retrieval-side evidence, sample consistency, the
quantile probe band, question-token router statistics, several hidden layers, and gate training that reads
probes off the labels' closed-book traces. Unit tests on synthetic features; `slow` ones on the real SmolLM2
and a five-passage index."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from expertrag.errors import ExpertRAGError
from expertrag.gate.config import GateConfig
from expertrag.gate.features import (
    QUERY_FEATURES,
    RETRIEVAL_FEATURES,
    SAMPLE_FEATURES,
    TIME_FEATURES,
    capitalised_spans,
    probe_features,
    sample_features,
    time_sensitive,
)
from expertrag.gate.policies import make_policy
from expertrag.gate.train import GateExample, train_artifacts
from expertrag.gate.types import Probe


@dataclass
class Ctx:
    """A GateContext over fixed features (counts probes and sample calls)."""

    qf: dict[str, float]
    embedding: np.ndarray
    draft: Probe
    question: str = "q"
    metadata: dict[str, Any] = field(default_factory=dict)
    drafts: list[str] = field(default_factory=list)
    probes: int = 0
    sampled: int = 0

    def query_features(self) -> dict[str, float]:
        return self.qf

    def query_embedding(self) -> np.ndarray:
        return self.embedding

    def probe(self) -> Probe:
        self.probes += 1
        return self.draft

    def samples(self, n: int, temperature: float, seed: int) -> list[str]:
        self.sampled += 1
        return self.drafts[:n]


def examples(n: int = 120, seed: int = 0) -> list[GateExample]:
    """Synthetic questions whose need for retrieval shows (noisily) in every feature group."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        need = i % 2 == 0
        qf = {name: float(rng.normal()) for name in (*QUERY_FEATURES, *RETRIEVAL_FEATURES, *TIME_FEATURES)}
        qf["bm25_top1"] = float(rng.normal(1.0 if need else -1.0, 1.0))
        qf["absent_share"] = float(rng.normal(0.5 if need else 0.0, 0.3))
        probe = Probe("x", [1, 2], [-0.2, -0.3], [float(rng.normal(2.0 if need else 0.5, 0.4))] * 2)
        pf = {**probe_features(probe), "sample_agreement": float(rng.normal(0.2 if need else 0.8, 0.2)),
              "sample_jaccard": float(rng.normal()), "sample_distinct": float(rng.normal())}
        emb = rng.normal(size=4)
        out.append(GateExample(id=f"q{i}", label="retrieve" if need else "no_retrieve", query_features=qf,
                               probe_features=pf, query_embedding=emb / np.linalg.norm(emb),
                               closed_correct=not need, open_correct=True))
    return out


# ------------------------------------------------------------------------------------------ time cues


@pytest.mark.parametrize("q, sensitive", [
    ("Who is the current president of France?", True),
    ("What is the latest iPhone?", True),
    ("Who won the 2024 Champions League final?", True),
    ("Who is the CEO of Twitter now?", True),
    ("Who won the 1998 World Cup?", False),
    ("Who wrote Hamlet?", False),
    ("What is the nowhere man song about?", False),  # "now" only as a whole word
])
def test_time_sensitive(q, sensitive):
    assert time_sensitive(q) is sensitive


def test_time_rule_retrieves_whatever_the_score(tmp_path):
    ex = examples()
    cfg = GateConfig(use_query_embedding=False, calibration="none")
    train_artifacts(ex, cfg, tmp_path)
    e = next(x for x in ex if x.label == "no_retrieve")
    draft = Probe("x", [1], [-0.1], [0.1])
    ctx = Ctx(e.query_features, e.query_embedding, draft, question="Who is the current mayor of Tallinn?")
    on = make_policy("adaptive", cfg, tmp_path).decide(ctx)
    assert on.retrieve and on.stage == "rule" and on.score == 1.0 and ctx.probes == 0
    off = make_policy("adaptive", cfg.model_copy(update={"time_rule": False}), tmp_path).decide(ctx)
    assert off.stage in ("fast", "probe")
    plain = Ctx(e.query_features, e.query_embedding, draft, question="Who wrote Hamlet?")
    assert make_policy("adaptive", cfg, tmp_path).decide(plain).stage != "rule"


# ------------------------------------------------------------------------------------ cheap features


def test_capitalised_spans():
    assert capitalised_spans("Who founded the Zorblatt Institute in Tallinn?") == ["Zorblatt Institute", "Tallinn"]
    assert capitalised_spans("Barack Obama was born where?") == ["Barack Obama"]
    assert capitalised_spans("what is the capital of france?") == []


def test_sample_features_hand_case():
    f = sample_features("Paris", ["paris", "Paris.", "Lyon", "the city of Paris"])
    assert f["sample_agreement"] == pytest.approx(2 / 4)  # "paris" and "Paris." normalise to the draft
    assert f["sample_jaccard"] == pytest.approx((1 + 1 + 0 + 1 / 3) / 4)  # "the" is dropped by normalisation
    assert f["sample_distinct"] == pytest.approx(3 / 5)
    assert sample_features("x", []) == {"sample_agreement": 1.0, "sample_jaccard": 1.0, "sample_distinct": 1.0}


def test_feature_groups_are_switchable_and_recorded_in_the_gate(tmp_path):
    ex = examples()
    base = GateConfig(use_query_embedding=False)
    train_artifacts(ex, base, tmp_path / "base")
    fast = json.loads((tmp_path / "base" / "fast.json").read_text())["spec"]["names"]
    full = json.loads((tmp_path / "base" / "full.json").read_text())["spec"]["names"]
    assert tuple(fast) == QUERY_FEATURES and not set(full) & {*RETRIEVAL_FEATURES, *SAMPLE_FEATURES}
    rich = base.model_copy(update={"retrieval_evidence": True, "time_features": True, "sample_consistency": 3})
    train_artifacts(ex, rich, tmp_path / "rich")
    fast = json.loads((tmp_path / "rich" / "fast.json").read_text())["spec"]["names"]
    full = json.loads((tmp_path / "rich" / "full.json").read_text())["spec"]["names"]
    assert set(RETRIEVAL_FEATURES) | set(TIME_FEATURES) <= set(fast) and set(SAMPLE_FEATURES) <= set(full)
    # at answer time the policy asks for the samples only when the question reaches the probe stage
    e = ex[0]
    pol = make_policy("adaptive", rich, tmp_path / "rich")
    ctx = Ctx(e.query_features, e.query_embedding, Probe("x", [1], [-0.1], [0.3]), drafts=["x", "y", "x"])
    d = pol.decide(ctx)
    assert ctx.sampled == (1 if d.stage == "probe" else 0) and ctx.probes == ctx.sampled
    with pytest.raises(ExpertRAGError, match="sample_consistency"):
        make_policy("adaptive", rich.model_copy(update={"sample_consistency": 0}), tmp_path / "rich")
    for x in ex:
        del x.probe_features["sample_agreement"]
    with pytest.raises(ExpertRAGError, match="sample features"):
        train_artifacts(ex, rich, tmp_path / "bad")


# ------------------------------------------------------------------------------------ quantile band


@pytest.mark.parametrize("q", [0.1, 0.3, 0.6])
def test_quantile_band_probes_that_share_of_the_training_questions(tmp_path, q):
    ex = examples(200)
    cfg = GateConfig(use_query_embedding=False, band_quantile=q)
    report = train_artifacts(ex, cfg, tmp_path)
    assert (tmp_path / "band.json").is_file() and report["band"]["n"] == 200
    pol = make_policy("adaptive", cfg, tmp_path)
    assert pol.band_source == f"quantile {q:g}"
    probed = 0
    for e in ex:
        ctx = Ctx(e.query_features, e.query_embedding, Probe("x", [1], [-0.1], [0.3]))
        probed += pol.decide(ctx).stage == "probe"
    assert probed / len(ex) == pytest.approx(q, abs=0.03)


def test_absolute_band_stays_an_option_and_old_gate_folders_load(tmp_path):
    ex = examples()
    train_artifacts(ex, GateConfig(use_query_embedding=False), tmp_path)
    absolute = make_policy("adaptive", GateConfig(band_quantile=None, low=0.3, high=0.7), tmp_path)
    assert (absolute.low, absolute.high, absolute.band_source) == (0.3, 0.7, "low/high")
    (tmp_path / "band.json").unlink()  # a folder trained before band.json existed
    old = make_policy("adaptive", GateConfig(band=0.05), tmp_path)
    assert old.band_source == "band" and old.high - old.low == pytest.approx(0.1)
    (tmp_path / "band.json").write_text('{"format": "expertrag-gate-band", "version": 1, "threshold": "x"}')
    from expertrag.gate.models import GateArtifactError

    with pytest.raises(GateArtifactError, match="band.json"):
        make_policy("adaptive", GateConfig(), tmp_path)


def test_the_shipped_demo_gate_loads_with_the_default_quantile_band():
    import importlib.resources

    demo = Path(str(importlib.resources.files("expertrag") / "assets" / "demo_gate"))
    pol = make_policy("adaptive", GateConfig(band=0.02), demo)
    # no band.json in the shipped folder: the absolute band it was tuned with, as before
    assert pol.band_source == "band" and pol.high - pol.low == pytest.approx(0.04) and pol.time_rule
    assert make_policy("adaptive", GateConfig(), demo).band_source == "low/high"
