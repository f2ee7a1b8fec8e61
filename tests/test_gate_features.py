"""Gate feature functions on hand cases, and FeatureSpec vectorisation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from expertrag.errors import InputError
from expertrag.gate.features import (
    QUERY_FEATURES,
    FeatureError,
    FeatureSpec,
    popularity_features,
    probe_features,
    query_features,
    question_type,
)
from expertrag.gate.types import Probe
from expertrag.retrieval.types import Hit


def _hits(*pairs: tuple[str, float]) -> list[Hit]:
    return [Hit(id=i, title="", contents="", score=s) for i, s in pairs]


def test_question_type_first_wh_word():
    assert question_type("Who wrote Hamlet?") == "who"
    assert question_type("In what year and where was X born?") == "what"
    assert question_type("whose idea was it") == "who"
    assert question_type("Name the capital of France") == "other"
    assert question_type("Somewhere over the rainbow") == "other"  # 'where' only as a whole word


def test_query_features_hand_case():
    bm25 = _hits(("a", 12.0), ("b", 9.5), ("c", 3.0), ("d", 2.0), ("e", 1.0), ("f", 0.5))
    dense = _hits(("b", 0.8), ("x", 0.75), ("a", 0.6), ("y", 0.5), ("z", 0.4))
    f = query_features("When did Apollo 11 land on the Moon?", bm25, dense)
    assert set(f) == set(QUERY_FEATURES)
    assert f["q_words"] == 8 and f["q_chars"] == len("When did Apollo 11 land on the Moon?")
    assert f["qtype_when"] == 1.0 and sum(f[k] for k in f if k.startswith("qtype_")) == 1.0
    assert f["q_has_digit"] == 1.0
    assert f["q_capitalised"] == 2.0  # Apollo, Moon (the first word does not count)
    assert f["bm25_top1"] == 12.0 and f["bm25_gap"] == pytest.approx(2.5)
    assert f["dense_top1"] == 0.8 and f["dense_gap"] == pytest.approx(0.05)
    assert f["top5_overlap"] == pytest.approx(2 / 5)  # a, b


def test_query_features_no_or_one_hit():
    f = query_features("what is it", [], _hits(("a", 0.3)))
    assert f["bm25_top1"] == 0.0 and f["bm25_gap"] == 0.0
    assert f["dense_top1"] == 0.3 and f["dense_gap"] == pytest.approx(0.3)
    assert f["top5_overlap"] == 0.0 and f["q_has_digit"] == 0.0 and f["qtype_what"] == 1.0


def test_probe_features():
    p = Probe(text="Paris", token_ids=[1, 2, 3], logprobs=[-0.1, -2.0, -0.3], entropies=[1.5, 0.5, 1.0])
    f = probe_features(p)
    assert f == pytest.approx({"first_token_entropy": 1.5, "mean_token_entropy": 1.0, "max_token_entropy": 1.5,
                               "min_logprob": -2.0, "mean_logprob": -0.8, "draft_tokens": 3.0})
    assert "retrieval_affinity" not in f and "router_entropy" not in f
    p2 = Probe(text="", token_ids=[], logprobs=[], entropies=[], retrieval_affinity=0.3, router_entropy=1.2)
    f2 = probe_features(p2)
    assert f2["draft_tokens"] == 0.0 and f2["mean_token_entropy"] == 0.0
    assert f2["retrieval_affinity"] == 0.3 and f2["router_entropy"] == 1.2


def test_popularity_features():
    assert popularity_features({"s_pop": 99}) == {"log_s_pop": pytest.approx(math.log(100))}
    assert popularity_features({"relation": "occupation"}) == {}
    with pytest.raises(InputError, match="metadata.s_pop"):
        popularity_features({"s_pop": "many"})


def test_vectorize_order_blocks_and_errors():
    spec = FeatureSpec.build(("b", "a"), use_query_embedding=True, embedding_dim=3)
    assert spec.dim == 5 and spec.use_query_embedding and not spec.use_hidden and not spec.needs_probe
    v = spec.vectorize({"a": 1.0, "b": 2.0, "extra": 9.0}, {"query_embedding": np.array([0.1, 0.2, 0.3])})
    assert v.tolist() == [2.0, 1.0, 0.1, 0.2, 0.3]
    with pytest.raises(FeatureError, match="feature 'a' is missing"):
        spec.vectorize({"b": 1.0}, {"query_embedding": np.zeros(3)})
    with pytest.raises(FeatureError, match="'query_embedding' is missing"):
        spec.vectorize({"a": 1.0, "b": 1.0}, {})
    with pytest.raises(FeatureError, match="has 2 values, the gate expects 3"):
        spec.vectorize({"a": 1.0, "b": 1.0}, {"query_embedding": np.zeros(2)})
    with pytest.raises(FeatureError, match="'b' is not finite"):
        spec.vectorize({"a": 1.0, "b": float("nan")}, {"query_embedding": np.zeros(3)})
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    full = FeatureSpec.build(("mean_token_entropy",), use_hidden=True).with_dims({"hidden": np.zeros((1, 4))})
    assert full.needs_probe and full.dim == 5
    with pytest.raises(ValueError, match="duplicate"):
        FeatureSpec(("a", "a"))
