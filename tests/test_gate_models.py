"""Gate models on synthetic numeric features: fitting, thresholds, calibration, files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expertrag.errors import ExpertRAGError
from expertrag.eval.metrics import auroc
from expertrag.gate.features import FeatureError, FeatureSpec
from expertrag.gate.models import (
    GateArtifactError,
    LogisticGate,
    MLPGate,
    RouterGate,
    ThresholdGate,
    best_threshold,
    load_gate,
)

SPEC = FeatureSpec(("x0", "x1"))


@pytest.fixture(scope="module")
def toy():
    """Two overlapping Gaussian clusters; label 1 = retrieval needed. Split into fit / held-out halves."""
    rng = np.random.default_rng(0)
    n = 200
    y = (rng.random(n) < 0.4).astype(int)
    X = rng.normal(size=(n, 2)) + np.where(y[:, None] == 1, [2.0, 1.0], [-1.0, 0.0])
    return X[:100], y[:100], X[100:], y[100:]


def _models():
    return [
        LogisticGate(SPEC),
        MLPGate(SPEC, hidden=8, epochs=150, lr=0.05),
    ]


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.kind)
def test_fit_separable_and_round_trip(model, toy, tmp_path):
    Xtr, ytr, Xte, yte = toy
    model.fit(Xtr, ytr)
    s = model.score_batch(Xte)
    assert auroc(yte, s) > 0.9
    assert ((0 <= s) & (s <= 1)).all()
    assert model.score(Xte[0]) == pytest.approx(s[0])
    assert model.decide(0.9) and not model.decide(0.1)
    path = model.save(tmp_path / "g.json")
    assert (tmp_path / "g.safetensors").is_file()
    back = load_gate(path)
    assert type(back) is type(model) and back.spec == SPEC
    assert np.array_equal(back.score_batch(Xte), s)
    # calibrated models round-trip too
    model.calibrate(Xte[:50], yte[:50])
    model.save(path)
    assert np.array_equal(load_gate(path).score_batch(Xte), model.score_batch(Xte))


def test_threshold_gate_fit_direction_and_round_trip(toy, tmp_path):
    Xtr, ytr, Xte, yte = toy
    g = ThresholdGate("x0", direction="auto").fit(Xtr[:, :1], ytr)
    assert g.direction == "above"
    assert auroc(yte, g.score_batch(Xte[:, :1])) > 0.9
    assert g.score(np.array([g.threshold])) == pytest.approx(0.5) and g.decide(0.5)
    below = ThresholdGate("neg", direction="auto").fit(-Xtr[:, :1], ytr)
    assert below.direction == "below" and below.threshold == pytest.approx(-g.threshold)
    np.testing.assert_allclose(below.score_batch(-Xte[:, :1]), g.score_batch(Xte[:, :1]))
    g.save(tmp_path / "t.json")
    assert not (tmp_path / "t.safetensors").exists()  # no weights to store
    back = load_gate(tmp_path / "t.json")
    assert isinstance(back, ThresholdGate) and np.array_equal(back.score_batch(Xte[:, :1]), g.score_batch(Xte[:, :1]))


def test_best_threshold_hand_cases():
    v = [0.1, 0.2, 0.3, 0.8, 0.9]
    y = [0, 0, 1, 1, 1]
    assert best_threshold(v, y) == pytest.approx(0.25)  # retrieve {0.3, 0.8, 0.9}: F1 = 1
    assert best_threshold(v, y, target_rate=0.4) == pytest.approx(0.55)  # 2 of 5 retrieved
    assert best_threshold(v, y, target_rate=0.0) > 0.9  # retrieve none
    assert best_threshold(v, y, target_rate=1.0) == pytest.approx(0.1)  # retrieve all
    # ties in F1 go to the higher threshold (fewer retrievals)
    # retrieve all: tp 2 of 4 -> F1 4/6; retrieve {4}: tp 1 of 1 -> F1 2/3 as well
    assert best_threshold([1, 2, 3, 4], [1, 0, 0, 1]) == pytest.approx(3.5)
    assert best_threshold([1.0, 1.0, 2.0], [1, 0, 1]) == pytest.approx(1.0)  # all: F1 0.8 > {2.0}: 2/3


def test_threshold_fit_to_target_rate(toy):
    Xtr, ytr, _, _ = toy
    g = ThresholdGate("x0").fit(Xtr[:, :1], ytr, target_rate=0.3)
    rate = (g.score_batch(Xtr[:, :1]) >= g.decision_threshold).mean()
    assert rate == pytest.approx(0.3, abs=0.011)


def test_router_gate(tmp_path):
    aff = np.array([[0.05], [0.1], [0.15], [0.4], [0.5], [0.7]])
    y = np.array([0, 0, 0, 1, 1, 1])
    g = RouterGate().fit(aff, y)
    assert 0.15 < g.threshold < 0.4
    assert np.allclose(g.score_batch(aff), aff[:, 0])
    assert auroc(y, g.score_batch(aff)) == 1.0
    g.save(tmp_path / "r.json")
    assert load_gate(tmp_path / "r.json").threshold == g.threshold


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_keeps_auroc_and_maps_to_unit_interval(method, toy):
    Xtr, ytr, Xte, yte = toy
    g = LogisticGate(SPEC).fit(Xtr, ytr)
    raw = g.score_batch(Xte)
    before = g.predict_batch(Xte)
    g.calibrate(Xte[:50], yte[:50], method)
    cal = g.score_batch(Xte)
    assert ((0 <= cal) & (cal <= 1)).all()
    if method == "platt":  # strictly monotone: ranking and decisions unchanged
        assert auroc(yte, cal) == pytest.approx(auroc(yte, raw), abs=1e-12)
        assert np.array_equal(g.predict_batch(Xte), before)
    else:  # monotone with ties
        assert auroc(yte, cal) > 0.9
    with pytest.raises(ValueError, match="already calibrated"):
        g.calibrate(Xte[:50], yte[:50])


def test_platt_corrects_overconfident_scores():
    rng = np.random.default_rng(1)
    z = rng.normal(size=2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(-z))).astype(int)  # true P = sigmoid(z)
    g = ThresholdGate("z", threshold=0.0, scale=0.1)  # overconfident: sigmoid(10 z)
    X = z[:, None]
    g.calibrate(X[:1000], y[:1000])
    assert g.calibrator.a == pytest.approx(0.1, abs=0.03)  # learns to undo the factor of 10
    brier_raw = np.mean((1 / (1 + np.exp(-10 * z[1000:])) - y[1000:]) ** 2)
    brier_cal = np.mean((g.score_batch(X[1000:]) - y[1000:]) ** 2)
    assert brier_cal < brier_raw


def test_fit_errors_and_shape_errors():
    g = LogisticGate(SPEC)
    with pytest.raises(ValueError, match="only one class"):
        g.fit(np.zeros((4, 2)), [1, 1, 1, 1])
    with pytest.raises(ValueError, match="0/1"):
        g.fit(np.zeros((2, 2)), [0, 2])
    with pytest.raises(FeatureError, match="expects 2 features"):
        g.score_batch(np.zeros((3, 3)))


def test_load_errors_name_the_file(toy, tmp_path):
    Xtr, ytr, _, _ = toy
    path = LogisticGate(SPEC).fit(Xtr, ytr).save(tmp_path / "g.json")
    with pytest.raises(GateArtifactError, match=r"nope\.json: gate file not found"):
        load_gate(tmp_path / "nope.json")
    doc = json.loads(path.read_text())

    def broken(text: str, match: str):
        p = tmp_path / "b.json"
        p.write_text(text)
        with pytest.raises(GateArtifactError, match=match) as e:
            load_gate(p)
        assert "b.json" in str(e.value) or "g.safetensors" in str(e.value)
        assert isinstance(e.value, ExpertRAGError)

    broken('{"format": "expertrag-gate", "vers', r"b\.json: corrupt gate file \(not valid JSON")
    broken("[1, 2]", "expected a JSON object")
    broken(json.dumps({**doc, "version": 99}), r"version 99.*`expertrag train gate`")
    broken(json.dumps({**doc, "format": "other"}), "not an ExpertRAG gate file")
    broken(json.dumps({**doc, "kind": "forest"}), "unknown gate kind 'forest'")
    broken(json.dumps({**doc, "spec": {"names": ["x0"], "vectors": []}}), "corrupt gate file: tensor 'mean' has shape")
    broken(json.dumps({k: v for k, v in doc.items() if k != "decision_threshold"}), "corrupt gate file")
    # weights: tampered, then missing
    st = tmp_path / "g.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-1] ^= 0xFF
    st.write_bytes(bytes(raw))
    with pytest.raises(GateArtifactError, match=r"g\.safetensors: checksum mismatch"):
        load_gate(path)
    st.unlink()
    with pytest.raises(GateArtifactError, match=r"g\.safetensors: weights of gate .*g\.json not found"):
        load_gate(path)


def test_load_as_wrong_class(tmp_path):
    ThresholdGate("x", 1.0).save(tmp_path / "t.json")
    with pytest.raises(GateArtifactError, match="holds a 'threshold' gate, expected 'logistic'"):
        LogisticGate.load(tmp_path / "t.json")
    assert isinstance(ThresholdGate.load(tmp_path / "t.json"), ThresholdGate)


def test_platt_never_inverts_the_ranking():
    from expertrag.gate.models import Calibrator

    rng = np.random.default_rng(2)
    z = rng.normal(size=69)
    y = (z < -1.0).astype(int)  # a small split that ranks against the model: best slope is negative
    y[:3] = [1, 1, 1]
    c = Calibrator.fit(z, y, "platt")
    assert c.a == 1.0  # slope kept, only the base rate is fitted
    p = c(z)
    assert np.all(np.diff(p[np.argsort(z)]) > 0)  # strictly increasing in z
    n_pos = int(y.sum())
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (len(y) - n_pos + 2))
    assert p.mean() == pytest.approx(t.mean(), abs=1e-6)  # the offset matches the smoothed base rate
    same = Calibrator.fit(z, (z > 0).astype(int), "platt")  # a split agreeing with the model: fitted slope
    assert same.a > 1.0
