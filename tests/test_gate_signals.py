"""The issue-14 gate signals: time cues and the time rule, retrieval-side evidence, sample consistency, the
quantile probe band, question-token router statistics, several hidden layers, and gate training that reads
probes off the labels' closed-book traces. Unit tests on synthetic features; `slow` ones on the real SmolLM2
and a five-passage index."""

from __future__ import annotations

import json
import math
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
    base = GateConfig(use_query_embedding=False, retrieval_evidence=False, time_features=False)  # both default on
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


# ----------------------------------------------------------------- with the real model and a small index

DOCS = [
    ("paris", "Paris", "Paris is the capital and largest city of France, on the Seine."),
    ("zorbl", "Zorblatt Institute", "The Zorblatt Institute was founded in 1987 by Mirela Quenton in Tallinn."),
    ("moon", "Moon", "The Moon is Earth's only natural satellite; it causes the tides."),
    ("tea", "Tea", "Tea is an aromatic beverage prepared by pouring hot water over cured tea leaves."),
]
QUESTIONS = ["What is the capital of France?", "Who founded the Zorblatt Institute?", "What causes tides?",
             "How is tea made?", "Who is Mirela Quenton?", "What is the Moon?"]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from expertrag.data.types import Document
    from expertrag.retrieval import Index, build_index

    out = tmp_path_factory.mktemp("signals") / "index"
    build_index(out, [Document(*d) for d in DOCS], progress=False)
    return Index(out)


@pytest.fixture(scope="module")
def rag(index, smollm2):
    from expertrag.gate.policies import make_policy
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.pipeline.config import PipelineConfig
    from expertrag.pipeline.rag import ExpertRAG

    cfg = PipelineConfig(k=2, max_new_tokens=12, probe_tokens=4, answer_cache_size=0, retrieval_cache_size=0)
    return ExpertRAG(index, ExpertRAGGenerator(*smollm2), make_policy("never"), cfg, "never")


@pytest.mark.slow
def test_retrieval_evidence_on_a_real_index(rag):
    from expertrag.pipeline.rag import PipelineGateContext

    known = PipelineGateContext(rag, "Who founded the Zorblatt Institute?", {}, None).query_features()
    unknown = PipelineGateContext(rag, "Who painted the Glorbnik Fresco?", {}, None).query_features()
    assert set(RETRIEVAL_FEATURES) <= set(known) and set(TIME_FEATURES) <= set(known)
    assert known["entity_found"] == 1.0 and known["entity_docs_log"] == pytest.approx(math.log1p(1))
    assert unknown["entity_found"] == 0.0 and unknown["absent_share"] > known["absent_share"]
    assert known["idf_max_present"] > 0 and known["bm25_mean"] > 0
    # the batched contexts compute the same features as one at a time
    many = PipelineGateContext.many(rag, [("Who founded the Zorblatt Institute?", {}), ("What causes tides?", {})])
    assert many[0].query_features() == pytest.approx(known)


@pytest.mark.slow
def test_batched_probes_and_several_hidden_layers(rag):
    one = [rag.probe(q) for q in QUESTIONS]
    many = rag.probe_many(QUESTIONS, batch_size=4)
    assert [p.token_ids for p in many] == [p.token_ids for p in one]  # left padding does not change them
    assert np.allclose([p.logprobs[0] for p in many], [p.logprobs[0] for p in one], atol=1e-3)
    assert np.allclose(many[1].hidden, one[1].hidden, atol=1e-3)
    h = rag.generator.capabilities.hidden_size
    layered = rag.config.model_copy(update={"probe_layers": [6, 18, -1]})
    old, rag.config = rag.config, layered
    try:
        p = rag.probe(QUESTIONS[0])
    finally:
        rag.config = old
    assert p.hidden.shape == (3 * h,)
    assert np.allclose(p.hidden[2 * h:], one[0].hidden, atol=1e-4)  # the last block is the default layer


@pytest.mark.slow
def test_sampled_drafts_are_seeded_and_feed_the_consistency_features(rag):
    a = rag.sample_drafts(QUESTIONS[:1], 4, 1.0, 7)[0]
    b = rag.sample_drafts(QUESTIONS[:1], 4, 1.0, 7)[0]
    c = rag.sample_drafts(QUESTIONS[:1], 4, 1.0, 8)[0]
    assert a == b and len(a) == 4 and a != c
    f = sample_features(rag.probe(QUESTIONS[0]).text, a)
    assert 0 <= f["sample_agreement"] <= 1 and 1 / 5 <= f["sample_distinct"] <= 1


@pytest.mark.slow
def test_question_token_router_statistics_on_the_upcycled_model(index, smollm2):
    import copy

    import torch

    from expertrag.gate.policies import make_policy
    from expertrag.model.generator import ExpertRAGGenerator
    from expertrag.model.upcycle import DEMO_MOE, upcycle
    from expertrag.pipeline.config import PipelineConfig
    from expertrag.pipeline.rag import ExpertRAG

    model, tok = smollm2
    moe_model = upcycle(copy.deepcopy(model), DEMO_MOE)
    torch.manual_seed(0)
    for layer in moe_model.layers:  # an upcycled router starts uniform; a trained one is not
        if getattr(layer.mlp, "router", None) is not None:
            torch.nn.init.normal_(layer.mlp.router.weight, std=0.05)
    gen = ExpertRAGGenerator(moe_model, tok)
    moe = ExpertRAG(index, gen, make_policy("never"), PipelineConfig(probe_tokens=2), "never")
    q = "Who founded the Zorblatt Institute?"
    g = gen.generate([{"role": "user", "content": q}], max_new_tokens=1, return_router=True, router_span=q)
    assert g.router_stats.span == "prompt" and g.question_router_stats.span == "question"
    n_question = len(tok(" " + q, add_special_tokens=False)["input_ids"])
    assert abs(g.question_router_stats.tokens - n_question) <= 1 < g.router_stats.tokens - n_question
    p = moe.probe(q)
    f = probe_features(p)
    for name in ("retrieval_affinity", "router_entropy", "router_agreement"):
        assert name in f and f"q_{name}" in f
    assert f["q_router_entropy"] != pytest.approx(f["router_entropy"])  # the template no longer dilutes it


@pytest.mark.slow
def test_training_reads_probes_off_label_traces_when_the_settings_match(rag, tmp_path):
    from expertrag.data.types import Question
    from expertrag.gate.labels import read_labels
    from expertrag.pipeline.labeling import gate_examples, label_questions, label_settings, trace_reuse

    qs = [Question(id=f"q{i}", question=q, golden_answers=["Paris" if i == 0 else "zzz"])
          for i, q in enumerate(QUESTIONS)]
    out = tmp_path / "labels.jsonl"
    label_questions(rag, qs, out, batch_size=3, progress=False)
    records = read_labels(out)
    model = {"setup": "native", "config": {"base": "smollm2"}}
    prov = {"settings": label_settings(rag, model)}
    mnt, why = trace_reuse(rag, model, prov)
    assert mnt == rag.config.max_new_tokens and why == ""
    assert trace_reuse(rag, model, None)[0] is None
    other = {"settings": {**prov["settings"], "model": {"setup": "llamacpp"}}}
    assert trace_reuse(rag, model, other) == (None, "the labels were made with other settings (model differ)")

    stats: dict = {}
    cfg = GateConfig()
    reused = gate_examples(rag, records, gate=cfg, trace_max_new_tokens=mnt, stats=stats, progress=False)
    assert stats["probes_from_traces"] == len(records) and stats["probes_run"] == 0
    fresh = gate_examples(rag, records, gate=cfg, stats={}, progress=False)
    for a, b in zip(reused, fresh, strict=True):
        assert a.query_features == pytest.approx(b.query_features)
        assert a.probe_features == pytest.approx(b.probe_features, abs=1e-3)  # batched labels: float rounding
    # a gate that reads hidden states still needs real probes (batched)
    st2: dict = {}
    hid = gate_examples(rag, records, gate=cfg.model_copy(update={"use_hidden": True}), trace_max_new_tokens=mnt,
                        stats=st2, progress=False)
    assert st2["probes_run"] == len(records) and all(e.hidden is not None for e in hid)
    # sample consistency rides on either
    st3: dict = {}
    smp = gate_examples(rag, records[:2], gate=cfg.model_copy(update={"sample_consistency": 3}),
                        trace_max_new_tokens=mnt, stats=st3, progress=False)
    assert all(set(SAMPLE_FEATURES) <= set(e.probe_features) for e in smp) and st3["samples_s"] >= 0


def test_trace_probe_stands_for_the_probe_only_where_it_can():
    from expertrag.gate.labels import LabelRecord
    from expertrag.pipeline.labeling import trace_probe

    def rec(n: int, answer: str = "Paris is big") -> LabelRecord:
        tr = {"token_ids": list(range(n)), "logprobs": [-0.1 * i for i in range(n)], "entropies": [0.5] * n}
        return LabelRecord("a", "q", "both_wrong", False, False, closed_answer=answer, closed_trace=tr)

    long = trace_probe(rec(10), 4, 24, decode=lambda ids: f"<{len(ids)} tokens>")
    assert long.token_ids == [0, 1, 2, 3] and long.logprobs == pytest.approx([0, -0.1, -0.2, -0.3])
    assert long.text == "<4 tokens>" and long.hidden is None
    assert trace_probe(rec(10), 4, 24) is None  # longer than the probe and no tokenizer to cut its text
    ended = trace_probe(rec(3), 4, 24)  # the answer ended (eos/stop) before the probe would have
    assert ended.token_ids == [0, 1, 2] and ended.text == "Paris is big"
    assert trace_probe(rec(3), 4, 3) is None  # cut at the labelling run's max_new_tokens: the probe goes on
    assert trace_probe(LabelRecord("b", "q", "retrieve"), 4, 24) is None  # no trace
