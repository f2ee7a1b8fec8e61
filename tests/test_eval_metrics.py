"""Metrics against hand-computed cases (and scikit-learn for AUROC)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from expertrag.eval.metrics import (
    answer_recall_at_k,
    auroc,
    contains_answer,
    exact_match,
    latency_summary,
    normalize_answer,
    percentile,
    precision_recall_f1,
    token_f1,
)


def test_squad_normalization():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # 'the' only as a word


def test_exact_match_and_f1():
    assert exact_match("the Beatles", ["Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    # pred tokens: [paris, france]; gold: [paris] -> P=1/2, R=1, F1=2/3
    assert token_f1("Paris, France", ["Paris"]) == pytest.approx(2 / 3)
    assert token_f1("Lyon", ["Paris", "Lyon city"]) == pytest.approx(2 / 3)
    assert token_f1("", ["Paris"]) == 0.0


def test_contains_answer_word_boundaries():
    assert contains_answer("He was a politician in Ohio.", ["politician"]) == 1.0
    assert contains_answer("The answer is 1984.", ["1984"]) == 1.0
    assert contains_answer("A cathedral", ["cat"]) == 0.0
    assert contains_answer("anything", [""]) == 0.0


def test_answer_recall_at_k():
    passages = ["nothing here", "Paris is the capital", "more"]
    assert answer_recall_at_k(passages, ["paris"], 1) == 0.0
    assert answer_recall_at_k(passages, ["paris"], 2) == 1.0


def test_auroc_hand_case_and_sklearn():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs won 3 of 4
    assert auroc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    assert auroc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # tie counts half
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounding makes ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_precision_recall_f1():
    got = precision_recall_f1([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3)
    assert precision_recall_f1([0, 0], [0, 0]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_percentiles():
    values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    # numpy linear: position (n-1)*q = 9*0.95 = 8.55 -> 9 + 0.55*(10-9)
    assert percentile(values, 95) == pytest.approx(9.55)
    assert percentile(values, 50) == pytest.approx(5.5)
    s = latency_summary(values)
    assert s["latency_ms_mean"] == pytest.approx(5.5) and s["latency_ms_p99"] == pytest.approx(9.91)
    assert np.isnan(percentile([], 50))
