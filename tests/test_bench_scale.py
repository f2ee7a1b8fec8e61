"""`expertrag bench scale`'s derived corpus and stand-in vectors (the measured run is in RESULTS.md, "Scale").

Tiny fixture corpora written here (tests never read the shared data); no model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from expertrag.bench.scale import HashedProjection, SampledEncoder, is_real, parse_sizes, write_derived_corpus
from expertrag.errors import InputError


def _data(tmp: Path) -> Path:
    corpora = tmp / "data" / "corpora"
    corpora.mkdir(parents=True)
    vital = [{"id": "vital_0", "title": "Moon", "contents": "The Moon orbits the Earth once a month. It causes the "
              "tides of the oceans.\nIts surface is covered in craters and dust.", "metadata": {"source": "v"}}]
    rqa = [{"id": "rqa_0", "title": "Tea", "contents": "Tea is brewed from the leaves of a shrub. Short.",
            "metadata": {"source": "r"}}]
    (corpora / "wiki_vital.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vital), encoding="utf-8")
    (corpora / "retrievalqa_passages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rqa), encoding="utf-8")
    return tmp / "data"


def test_derived_corpus_is_real_sentences_then_copies_with_distinct_ids(tmp_path):
    out = tmp_path / "c.jsonl"
    made = write_derived_corpus(_data(tmp_path), 10, out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # 4 sentences of >= 5 words ("Short." is dropped), then copies of them until 10 rows
    assert made == {"passages": 10, "distinct_sentences": 4, "copies": 3}
    assert [r["contents"] for r in rows[:4]] == [
        "The Moon orbits the Earth once a month.", "It causes the tides of the oceans.",
        "Its surface is covered in craters and dust.", "Tea is brewed from the leaves of a shrub."]
    assert len({r["id"] for r in rows}) == 10 and "#" not in "".join(r["id"] for r in rows)
    assert rows[4]["id"] == "vital_0-s0-c1" and rows[4]["title"] == "Moon (copy 1)"
    assert rows[4]["contents"] == rows[0]["contents"] and rows[8]["title"] == "Moon (copy 2)"
    # every row's embedded text (title + contents) differs: the embedding cache dedupes none of them
    assert len({(r["title"], r["contents"]) for r in rows}) == 10


def test_derived_corpus_needs_the_shared_files(tmp_path):
    with pytest.raises(InputError, match="wiki_vital.jsonl: not found"):
        write_derived_corpus(tmp_path, 5, tmp_path / "c.jsonl")


@pytest.mark.parametrize("text", ["", "a,b", "0,100", "-5"])
def test_bad_sizes_are_one_clear_error(text):
    with pytest.raises(InputError, match="--sizes"):
        parse_sizes(text)


def test_stand_in_vectors_keep_word_overlap_and_are_deterministic():
    p = HashedProjection(384)
    v = p.encode(["the moon causes the ocean tides", "tides of the ocean are caused by the moon",
                  "tea is brewed from leaves", ""])
    assert v.shape == (4, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1.0, rtol=1e-5)
    assert not v[3].any()  # no words: a zero vector (finite, so the store's checks accept it)
    assert v[0] @ v[1] > 0.4 > abs(v[0] @ v[2])  # shared words -> similar, none -> near orthogonal
    np.testing.assert_array_equal(v, HashedProjection(384).encode(
        ["the moon causes the ocean tides", "tides of the ocean are caused by the moon",
         "tea is brewed from leaves", ""]))


def test_sampled_encoder_gives_the_real_embedder_exactly_the_crc_sample():
    from expertrag.retrieval.embedder import Embedder

    texts = [f"passage number {i} about rivers" for i in range(40)]
    real_rows = [i for i, t in enumerate(texts) if is_real(t, 7)]
    assert 0 < len(real_rows) < 40
    emb = Embedder("all-MiniLM-L6-v2", 64, "torch")  # the real packaged MiniLM
    enc = SampledEncoder(period=7)
    flat = np.concatenate(list(enc(emb, [texts[:20], texts[20:]])))
    assert enc.real == len(real_rows) and enc.standin == 40 - len(real_rows)
    np.testing.assert_allclose(flat[real_rows], emb.encode([texts[i] for i in real_rows]), atol=1e-5)
    rest = [i for i in range(40) if i not in real_rows]
    np.testing.assert_allclose(flat[rest], HashedProjection(384).encode([texts[i] for i in rest]), atol=1e-6)


def test_bench_bm25_builds_both_ways_and_compares_their_hits(tmp_path):
    """`bench bm25` end to end on the tiny corpus: three child processes per size, both indexes answer the
    questions with the same hits."""
    from expertrag.bench.bm25_memory import run

    data = _data(tmp_path)
    (data / "questions").mkdir()
    (data / "questions" / "nq_open_dev.jsonl").write_text(
        json.dumps({"id": "q1", "question": "what causes the tides", "golden_answers": ["the Moon"]}) + "\n"
        + json.dumps({"id": "q2", "question": "how is tea brewed", "golden_answers": ["leaves"]}) + "\n",
        encoding="utf-8")
    result = run(data, [12], work=tmp_path / "w", queries=2, progress=False)
    (row,) = result["sizes"]
    assert row["passages"] == 12
    assert {m: row[m]["peak_rss_mb"] > 0 for m in ("read", "memory", "stream")} == dict.fromkeys(
        ("read", "memory", "stream"), True)
    assert row["agreement"] == {"questions": 2, "same_top_k": 2, "k": 10, "max_rel_score_diff": 0.0}
    assert not list((tmp_path / "w").iterdir())  # corpus and indexes removed after the size
