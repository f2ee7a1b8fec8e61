"""Inverse-cloze pairs (pure), a one-step ICT fine-tune of the real MiniLM, and the identity an index built
with it records: the manifest check refuses the base model's query vectors, and a model changed in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertrag.data.types import Document
from expertrag.errors import IndexFormatError, InputError
from expertrag.retrieval import Index
from expertrag.retrieval.builder import build_index
from expertrag.retrieval.config import RetrievalConfig
from expertrag.retrieval.embedder import TRAINED_META, embedder_identity, vector_cache_key
from expertrag.retrieval.ict import IctPair, ict_pairs, pair_for, sentence_blocks, split_sentences, train_ict

RECORDS = [
    Document("tides", "Tides", "The Moon's gravity pulls the oceans toward it. Two bulges of water travel around "
             "the planet each day. The Sun adds a smaller pull of its own. Spring tides come when both line up."),
    Document("comet", "Comet", "A comet is an icy body that releases gas near the Sun. Its tail always points "
             "away from the Sun. Halley's comet returns roughly every seventy-six years."),
    Document("kelp", "Kelp", "Kelp forests grow in cold and nutrient-rich coastal water. Sea otters eat the urchins "
             "that graze on kelp. Without otters the forests can collapse into urchin barrens."),
    Document("short", "", "One sentence only, so there is no rest of the passage to be its positive."),
    Document("tiny", "Tiny", "Too short. Also short."),  # no sentence reaches MIN_QUERY_WORDS
]


def test_split_sentences_and_blocks():
    assert split_sentences("It rains.  Then it stops! Does it? 3 more follow.") == [
        "It rains.", "Then it stops!", "Does it?", "3 more follow."]
    assert split_sentences("version 2.5 is out") == ["version 2.5 is out"]  # no space after the point
    blocks = sentence_blocks(["a" * 10, "b" * 10, "c" * 10, "d" * 30], max_chars=25)
    assert blocks == [["a" * 10, "b" * 10], ["c" * 10], ["d" * 30]]  # a too-long sentence is its own block


def test_pair_is_one_sentence_and_the_rest_of_its_passage():
    pairs = ict_pairs(RECORDS, seed=0, keep_rate=0.0)
    assert sorted(p.doc_id for p in pairs) == ["comet", "kelp", "tides"]  # one each; none from short/tiny
    by_doc = {r.id: r for r in RECORDS}
    for p in pairs:
        record = by_doc[p.doc_id]
        sentences = split_sentences(record.contents)
        assert p.query in sentences and not p.kept
        assert p.positive.startswith(f"{record.title}. ")  # the title gives the context, as in the index
        rest = [s for s in sentences if s != p.query]
        assert p.positive == f"{record.title}. " + " ".join(rest)  # order kept, the query removed
        assert p.query not in p.positive


def test_keep_rate_leaves_the_sentence_in():
    for p in ict_pairs(RECORDS, seed=3, keep_rate=1.0):
        assert p.kept and p.query in p.positive


def test_pairs_are_seeded_per_record_and_capped():
    a = ict_pairs(RECORDS, seed=1)
    assert a == ict_pairs(RECORDS, seed=1)
    # a record's pair does not depend on the other records or their order
    assert pair_for(RECORDS[0], 1) == next(p for p in ict_pairs(list(reversed(RECORDS)), seed=1)
                                           if p.doc_id == "tides")
    assert len(ict_pairs(RECORDS, seed=1, max_pairs=2)) == 2
    queries = {pair_for(RECORDS[0], s, keep_rate=0.0).query for s in range(20)}
    assert len(queries) > 1  # different seeds pick different sentences
    with pytest.raises(InputError, match="max_pairs"):
        ict_pairs(RECORDS, max_pairs=0)
    with pytest.raises(InputError, match="keep_rate"):
        ict_pairs(RECORDS, keep_rate=1.5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real training step of MiniLM on tiny pairs (the budget stops it after the first step)."""
    out = tmp_path_factory.mktemp("ict") / "model"
    pairs = [IctPair(q, pos, str(i), False) for i, (q, pos) in enumerate([
        ("what pulls the tides", "Tides. The Moon's gravity pulls the oceans."),
        ("icy body near the sun", "Comet. A comet releases gas near the Sun."),
        ("otters eat urchins", "Kelp. Sea otters keep kelp forests alive."),
        ("capital of france", "Paris. Paris is the capital of France."),
    ])]
    report = train_ict(pairs, out, batch_size=2, budget_s=0.001, max_seq_length=32, seed=0)
    return out, report


def test_training_saves_a_model_with_its_identity(trained):
    out, report = trained
    assert report["steps"] == 1 and report["stopped_by_budget"] and report["planned_steps"] == 2
    meta = json.loads((out / TRAINED_META).read_text())
    assert meta["method"] == "ict" and meta["base"] == "all-MiniLM-L6-v2"
    identity = embedder_identity(str(out))
    assert identity["fingerprint"] == report["fingerprint"] and identity["base"] == "all-MiniLM-L6-v2"
    assert embedder_identity("all-MiniLM-L6-v2") is None  # packaged: its name is its identity
    assert vector_cache_key(str(out), "torch") == f"{out}@{identity['fingerprint']}"
    # the sequence length the index reads passages with is the base model's, not the training one
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    with pytest.raises(InputError, match="too few"):
        train_ict([IctPair("q", "p", "x", False)] * 3, out.parent / "x", batch_size=2)
    assert not (out.parent / "x").exists()  # refused before anything was written


def test_index_records_the_trained_embedder_and_refuses_the_base(trained, tmp_path):
    out, _ = trained
    index_dir = tmp_path / "idx"
    cfg = RetrievalConfig(embedder=str(out))
    build_index(index_dir, RECORDS[:3], retrieval=cfg, progress=False)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["embedder"] == str(out)
    assert manifest["extra"]["embedder_identity"]["fingerprint"] == embedder_identity(str(out))["fingerprint"]
    assert Index(index_dir, cfg).search("what pulls the oceans", 1, "dense")[0].id.startswith("tides")
    with pytest.raises(IndexFormatError, match="would not match") as err:
        Index(index_dir, RetrievalConfig())  # the base MiniLM's query vectors
    assert "ict fine-tune of 'all-MiniLM-L6-v2'" in str(err.value) and str(index_dir) in str(err.value)


def test_a_model_changed_in_place_is_refused(trained, tmp_path):
    import shutil

    src, _ = trained
    model = tmp_path / "model"
    shutil.copytree(src, model)
    index_dir = tmp_path / "idx"
    cfg = RetrievalConfig(embedder=str(model))
    build_index(index_dir, RECORDS[:2], retrieval=cfg, progress=False)
    Index(index_dir, cfg)  # opens
    conf = model / "config_sentence_transformers.json"  # any recorded file: here a config, as a retrain would
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "note": "retrained"}))
    with pytest.raises(IndexFormatError, match="would not match"):
        Index(index_dir, cfg)
    Path(model / "model.safetensors").unlink()
    with pytest.raises(IndexFormatError, match="cannot be checked"):
        Index(index_dir, cfg)
