"""The demo's one-line gate summary reads the report that `train_artifacts` really writes."""

from __future__ import annotations

import numpy as np

from expertrag.cli.demo import held_out_summary
from expertrag.gate.config import GateConfig
from expertrag.gate.features import QUERY_FEATURES, probe_features
from expertrag.gate.train import GateExample, train_artifacts
from expertrag.gate.types import Probe

# the examples carry query and probe features only; the defaults also read retrieval evidence and the time cue
QUERY_ONLY = {"retrieval_evidence": False, "time_features": False}


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
    report = train_artifacts(_examples(), GateConfig(validation_fraction=0.25, **QUERY_ONLY), tmp_path)
    full = report["parts"]["full"]
    line = held_out_summary(report)
    assert line == f"; held-out AUROC {full['metrics']['auroc']:.2f} on {full['validation']} questions"
    assert full["validation"] > 0


def test_held_out_summary_is_silent_without_a_held_out_split(tmp_path):
    report = train_artifacts(_examples(), GateConfig(validation_fraction=0.0, **QUERY_ONLY), tmp_path)
    assert report["parts"]["full"]["validation"] == 0
    assert held_out_summary(report) == ""


def test_shipped_gate_is_installed_into_a_new_index_and_loads(tmp_path, capsys):
    """A new demo index gets the gate this project ships (no minutes of training on first run), and the
    adaptive policy loads it; a second call finds it in place."""
    import pytest

    from expertrag.cli.demo import SHIPPED_GATE, _ensure_gate, asset
    from expertrag.config import ExpertRAGConfig
    from expertrag.gate.policies import ARTIFACTS, make_policy
    from expertrag.pipeline.build import gate_dir

    config = ExpertRAGConfig.load(None)
    shipped = asset(SHIPPED_GATE)
    if not (shipped / ARTIFACTS["full"]).exists():
        # the folder is filled by a training run (assets/README.md); without it the demo trains on first run
        pytest.skip(f"no gate shipped in {shipped} yet")
    # rag_never is only used to train; None proves the shipped path never trains
    _ensure_gate(None, tmp_path, config, retrain=False)
    out = gate_dir(tmp_path)
    for key in ("fast", "full"):
        assert (out / ARTIFACTS[key]).read_bytes() == (shipped / ARTIFACTS[key]).read_bytes()
    assert "the gate this project trained" in capsys.readouterr().out
    policy = make_policy("adaptive", config.gate, out)
    assert policy is not None
    _ensure_gate(None, tmp_path, config, retrain=False)
    assert "gate artifacts found" in capsys.readouterr().out


def test_background_build_completes_the_index_while_it_is_read(tmp_path, capsys):
    """The demo's step 2 for real, on the packaged corpus: a subset is indexed and opened, a child process
    indexes more into the same directory, the open index keeps answering from its generation meanwhile,
    and afterwards the directory holds the larger index."""
    import itertools

    import pytest

    from expertrag.cli.demo import Clock, start_background_build, wait_background
    from expertrag.data.wiki_offline import iter_wiki_offline_documents
    from expertrag.retrieval import Index, build_index

    try:
        subset = list(itertools.islice(iter_wiki_offline_documents(limit=12), 0, None, 3))
    except Exception as e:  # the corpus is a set-up step (`make demo`), not a code dependency
        pytest.skip(str(e))
    out = tmp_path / "idx"
    build_index(out, subset, progress=False)
    index = Index(out)
    before = index.search("music", 4, "hybrid")
    proc = start_background_build(out, None, limit=12)
    wait_background(proc, out, Clock())
    assert "index complete" in capsys.readouterr().out
    assert [h.id for h in index.search("music", 4, "hybrid")] == [h.id for h in before]  # its generation
    index.close()
    full = Index(out)
    assert full.manifest.documents == 12 and full.manifest.generation == 2
    assert {d.id for d in subset} <= set(full.store.live_ids(full.generation))
    full.close()
