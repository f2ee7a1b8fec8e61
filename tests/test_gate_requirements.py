"""Policies state the generator signals they read; a backend lacking one is refused at start-up, naming
both. The learned gate's needs are the features saved with it (what it was trained with)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from expertrag.gate.config import GateConfig
from expertrag.gate.features import QUERY_FEATURES, FeatureSpec, probe_features
from expertrag.gate.policies import POLICIES, EntropyPolicy, FlarePolicy, RouterPolicy, make_policy
from expertrag.gate.requirements import BackendCapabilityError, check_policy, spec_signals
from expertrag.gate.train import GateExample, train_artifacts
from expertrag.gate.types import Probe
from expertrag.model.backend import Capabilities

# These fixtures carry the query features only (no retrieval evidence, no time cue), so the tests switch those
# feature groups off, the package defaults being on; tests/test_gate_signals.py covers them.
QUERY_ONLY = {"retrieval_evidence": False, "time_features": False}

NATIVE_MOE = Capabilities("native", "ExpertRAG decoder (MoE)", hidden_states=True, router_stats=True,
                          retrieval_affinity=True, passage_memory=True, batched=True, batch_shares_router=True)
HF_DENSE = Capabilities("transformers", "llama", hidden_states=True, batched=True)
HF_MOE = Capabilities("transformers", "mixtral", hidden_states=True, router_stats=True, batched=True)
HTTP = Capabilities("openai", "m at http://x/v1", entropy="top_k", top_logprobs=True, continuation=False)


def _examples(with_router: bool, n: int = 60) -> list[GateExample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        need = i % 2 == 0
        qf = {k: 0.0 for k in QUERY_FEATURES} | {"bm25_top1": float(rng.normal(5.0 if need else 12.0, 2.0))}
        probe = Probe(text="x", token_ids=[1, 2], logprobs=[-0.2, -1.0 if need else -0.1],
                      entropies=[float(rng.normal(2.0 if need else 0.6, 0.3)), 1.0],
                      router_entropy=float(rng.normal(1.0, 0.1)) if with_router else None,
                      router_agreement=float(rng.uniform()) if with_router else None)
        out.append(GateExample(id=f"q{i}", label="retrieve" if need else "no_retrieve", query_features=qf,
                               probe_features=probe_features(probe), query_embedding=rng.normal(size=4),
                               hidden=rng.normal(size=8), metadata={}, closed_correct=not need, open_correct=True))
    return out


def test_the_learned_gate_refuses_backends_lacking_what_it_was_trained_with(tmp_path):
    train_artifacts(_examples(with_router=True), GateConfig(use_hidden=True, calibration="none", **QUERY_ONLY), tmp_path)
    gate = make_policy("adaptive", GateConfig(), tmp_path)
    needs = gate.requires()
    assert {"hidden", "entropy", "logprobs", "router_entropy", "router_agreement"} <= needs
    check_policy(gate, HF_MOE)  # a transformers MoE gives every one of them
    assert gate.hidden_dims() == {8}
    with pytest.raises(BackendCapabilityError, match=r"trained on 8-dim hidden states; backend 'native' .* gives 576"):
        check_policy(gate, Capabilities("native", "ExpertRAG decoder (MoE)", hidden_states=True, router_stats=True,
                                        hidden_size=576))
    check_policy(gate, Capabilities("native", "tiny", hidden_states=True, router_stats=True, hidden_size=8))
    with pytest.raises(BackendCapabilityError, match=r"policy 'adaptive' needs .*hidden state.*backend 'openai'"):
        check_policy(gate, HTTP)
    with pytest.raises(BackendCapabilityError, match=r"MoE router statistics.*'transformers' \(llama\)"):
        check_policy(gate, HF_DENSE)


def test_a_gate_trained_without_probe_vectors_runs_where_its_features_exist(tmp_path):
    train_artifacts(_examples(with_router=False), GateConfig(use_hidden=False, calibration="none", **QUERY_ONLY), tmp_path)
    gate = make_policy("adaptive", GateConfig(), tmp_path)
    assert "hidden" not in gate.requires() and "router_entropy" not in gate.requires()
    check_policy(gate, HF_DENSE)
    with pytest.raises(BackendCapabilityError, match="full next-token distribution"):
        check_policy(gate, HTTP)  # trained on full entropies: a top-k approximation is another feature


def test_baselines_state_their_signals(caplog):
    assert spec_signals(FeatureSpec(("q_words", "bm25_top1"))) == set()
    assert spec_signals(FeatureSpec(("min_logprob",), (("hidden", 8),))) == {"logprobs", "hidden"}
    for name in ("never", "always"):
        assert POLICIES[name]().requires() == frozenset()
    check_policy(FlarePolicy(0.2), HTTP)
    with pytest.raises(BackendCapabilityError, match="policy 'router' needs a retrieval expert"):
        check_policy(RouterPolicy(0.5), HF_MOE)
    check_policy(RouterPolicy(0.5), NATIVE_MOE)
    with caplog.at_level(logging.WARNING):
        check_policy(EntropyPolicy(1.0), HTTP)
    assert "approximated from the top-k" in caplog.text
    caplog.clear()
    check_policy(EntropyPolicy(1.0), HF_DENSE)
    assert caplog.text == ""
