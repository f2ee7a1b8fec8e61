"""The demo's one-line gate summary reads the report that `train_artifacts` really writes."""

from __future__ import annotations

import numpy as np

from expertrag.cli.demo import held_out_summary
from expertrag.gate.config import GateConfig
from expertrag.gate.features import QUERY_FEATURES, probe_features
from expertrag.gate.train import GateExample, train_artifacts
from expertrag.gate.types import Probe


def _examples(n: int = 60) -> list[GateExample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        need = i % 2 == 0
        qf = {k: 0.0 for k in QUERY_FEATURES}
        qf["bm25_top1"] = float(rng.normal(5.0 if need else 12.0, 1.0))
        probe = Probe(text="x", token_ids=[1], logprobs=[-1.0 if need else -0.1],
                      entropies=[float(rng.normal(2.0 if need else 0.5, 0.2))])
        emb = rng.normal(size=4)
        out.append(GateExample(id=f"q{i}", label="retrieve" if need else "no_retrieve", query_features=qf,
                               probe_features=probe_features(probe), query_embedding=emb / np.linalg.norm(emb)))
    return out


def test_held_out_summary_reads_the_trained_report(tmp_path):
    report = train_artifacts(_examples(), GateConfig(validation_fraction=0.25), tmp_path)
    full = report["parts"]["full"]
    line = held_out_summary(report)
    assert line == f"; held-out AUROC {full['metrics']['auroc']:.2f} on {full['validation']} questions"
    assert full["validation"] > 0


def test_held_out_summary_is_silent_without_a_held_out_split(tmp_path):
    report = train_artifacts(_examples(), GateConfig(validation_fraction=0.0), tmp_path)
    assert report["parts"]["full"]["validation"] == 0
    assert held_out_summary(report) == ""
