"""Index building and search with the real bm25s, FAISS and MiniLM embedder on a small fixture corpus."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from expertrag.data.types import Document
from expertrag.errors import IndexFormatError, InputError
from expertrag.retrieval import Filters, Index, RetrievalConfig, build_index
from expertrag.retrieval.bm25 import tokenize
from expertrag.retrieval.rrf import reciprocal_rank_fusion

CORPUS = [
    ("volcano", "Volcanoes", "A volcano is a rupture in the crust of a planet where lava, ash and gases escape.", {}),
    ("penguin", "Penguins", "Penguins are flightless seabirds that live almost exclusively in the Southern Hemisphere.", {}),
    ("violin", "Violin", "The violin is a wooden string instrument played with a bow; it is the smallest of its family.", {}),
    ("everest", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.", {}),
    ("photosynthesis", "Photosynthesis", "Photosynthesis lets plants convert light energy into chemical energy.", {}),
    ("contract", "Contract law", "A contract is a legally enforceable agreement; breach of contract gives damages.",
     {"domain": "legal", "groups": ["legal"]}),
    ("warranty", "Product warranty", "The X200 blender carries a two-year warranty covering the motor.",
     {"domain": "product", "groups": ["support"]}),
    ("python", "Python language", "Python is a programming language created by Guido van Rossum.", {"domain": "code"}),
]


def docs(rows=CORPUS) -> list[Document]:
    return [Document(id=i, title=t, contents=c, metadata=dict(m)) for i, t, c, m in rows]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index(out, docs(), progress=False)
    return out


@pytest.fixture(scope="module")
def index(index_dir) -> Index:
    return Index(index_dir)


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_each_mode_finds_the_right_passage(index, mode):
    assert index.search("highest mountain in the Himalayas", 3, mode)[0].id == "everest"
    assert index.search("flightless seabirds", 3, mode)[0].id == "penguin"


def test_hit_fields(index):
    hit = index.search("wooden string instrument bow", 1, "hybrid")[0]
    assert hit.id == "violin" and hit.title == "Violin" and "bow" in hit.contents
    assert hit.metadata["doc_id"] == "violin" and hit.score > 0


def _reference_bm25(texts: list[list[str]], query: list[str], k1=1.5, b=0.75) -> np.ndarray:
    """Lucene's BM25 (the variant bm25s implements by default; Lucene drops the constant (k1 + 1)
    factor of Robertson's form, which leaves the ranking unchanged), written out from the formula."""
    n = len(texts)
    avgdl = sum(len(t) for t in texts) / n
    df = Counter(tok for t in texts for tok in set(t))
    scores = np.zeros(n)
    for i, t in enumerate(texts):
        tf = Counter(t)
        for q in query:
            if tf[q] == 0:
                continue
            idf = math.log(1 + (n - df[q] + 0.5) / (df[q] + 0.5))
            scores[i] += idf * tf[q] / (tf[q] + k1 * (1 - b + b * len(t) / avgdl))
    return scores


def test_bm25_scores_match_reference_formula(index):
    rows = [row for batch in index.store.iter_live_texts(index.generation) for row in batch]
    texts = tokenize([f"{t}. {c}" for _, t, c in rows], index.bm25.stemmer)
    query = "contract agreement damages for a blender motor"
    expected = _reference_bm25(texts, tokenize([query], index.bm25.stemmer)[0])
    got = dict(index.bm25.search(query, len(rows)))
    for (rowid, _, _), score in zip(rows, expected, strict=True):
        assert got.get(rowid, 0.0) == pytest.approx(score, rel=1e-4, abs=1e-5)


QUERIES = [
    "Who wrote the play Hamlet, and when?", "what's the HIGHEST mountain on Earth's surface",
    "Flightless seabirds of the southern hemisphere", "the the and of", "x y z", "naïve café résumé 1990s",
    "Photosynthesis: light → chemical energy!!", "", "contract-law breach damages (two-year warranty)",
]


@pytest.mark.parametrize("stem", [True, False])
def test_query_tokens_are_bm25s_tokens(stem):
    """Our one-query tokenizer follows bm25s.tokenize exactly (same regex, stop list, stemmer, order)."""
    from expertrag.retrieval.bm25 import _stemmer, query_tokens

    stemmer = _stemmer(stem)
    texts = QUERIES + [f"{t}. {c}" for _, t, c, _ in CORPUS]
    for text in texts:
        assert query_tokens(text, stemmer) == tokenize([text], stemmer)[0], text


def test_bm25_search_returns_what_bm25s_retrieve_returns(index):
    """Ours sums the same precomputed postings as bm25s `retrieve`: same passages, order and scores."""
    bm25 = index.bm25
    for query in QUERIES[:3] + ["contract agreement damages for a blender motor", "python programming guido"]:
        tokens = [t for t in tokenize([query], bm25.stemmer)[0] if t in bm25.model.vocab_dict]
        docs_, scores = bm25.model.retrieve([tokens], k=5, show_progress=False, n_threads=0)
        expected = [(int(bm25.rowids[d]), float(s)) for d, s in zip(docs_[0], scores[0], strict=True) if s > 0]
        got = bm25.search(query, 5)
        assert [r for r, _ in got] == [r for r, _ in expected], query
        assert [s for _, s in got] == pytest.approx([s for _, s in expected])
        assert got, query  # each of these queries shares a term with the corpus


def test_hit_metadata_is_a_copy_per_hit(index):
    """Hits share a cached passage; changing one hit's metadata must not leak into the next search."""
    first = index.search("wooden string instrument bow", 1, "bm25")[0]
    first.metadata["doc_id"] = "tampered"
    first.metadata["extra"] = 1
    again = index.search("wooden string instrument bow", 1, "bm25")[0]
    assert again.metadata["doc_id"] == "violin" and "extra" not in again.metadata


def test_dense_scores_are_cosines(index):
    query = "plants turning light into energy"
    q = index.embedder.encode([query])[0]
    hits = index.search(query, 3, "dense")
    for h in hits:
        v = index.embedder.encode([f"{h.title}. {h.contents}"])[0]
        assert h.score == pytest.approx(float(q @ v), abs=1e-4)
    assert hits[0].id == "photosynthesis"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_rrf_hand_computed():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]], [1.0, 0.5], k=60)
    expected = {1: 1 / 61 + 0.5 / 62, 2: 1 / 62, 3: 1 / 63 + 0.5 / 61}
    assert [d for d, _ in fused] == sorted(expected, key=lambda d: -expected[d])
    for d, s in fused:
        assert s == pytest.approx(expected[d])
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([[1]], [1.0, 2.0])


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_access_groups_are_enforced_inside_retrieval(index, mode):
    query = "legally enforceable contract agreement breach damages"
    assert index.search(query, 8, mode, Filters(all_groups=True))[0].id == "contract"  # administrator: found
    assert "contract" not in {h.id for h in index.search(query, 8, mode)}  # no groups: public only
    seen = index.search(query, 8, mode, Filters(groups=("support",)))
    ids = {h.id for h in seen}
    assert "contract" not in ids
    # the support group's passage, and public passages, stay visible to that group in every mode (queries
    # that share words with them, so BM25 can find them too)
    assert "warranty" in {h.id for h in index.search("blender warranty motor", 8, mode, Filters(groups=("support",)))}
    visible = {h.id for h in index.search("volcano lava penguins seabirds", 8, mode, Filters(groups=("support",)))}
    assert {"volcano", "penguin"} <= visible and "contract" not in visible
    legal = index.search(query, 8, mode, Filters(groups=("legal",)))
    assert legal[0].id == "contract"


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_domain_filter(index, mode):
    hits = index.search("programming language warranty contract", 8, mode, Filters(domains=("code",)))
    assert [h.id for h in hits] == ["python"]
    assert index.search("volcano", 5, mode, Filters(domains=("nothing",))) == []


def test_bad_queries(index):
    with pytest.raises(InputError, match="empty query"):
        index.search("   ")
    with pytest.raises(InputError, match="unknown search mode"):
        index.search("volcano", 3, "fuzzy")
    with pytest.raises(InputError, match="k must be positive"):
        index.search("volcano", 0)


def test_query_with_no_known_terms(index):
    assert index.search("zzzqqq xxyyzz", 3, "bm25") == []
    assert len(index.search("zzzqqq xxyyzz", 3, "dense")) == 3


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_approximate_dense_indexes(tmp_path, kind):
    cfg = RetrievalConfig(dense_index=kind, ivf_nlist=4, ivf_pq_m=8)
    build_index(tmp_path / "i", docs(), retrieval=cfg, progress=False)
    idx = Index(tmp_path / "i", cfg)
    assert idx.manifest.dense_index == kind
    assert idx.search("highest mountain in the Himalayas", 2, "dense")[0].id == "everest"
    hits = idx.search("contract agreement", 5, "dense", Filters(groups=()))
    assert "contract" not in {h.id for h in hits}


def test_incremental_update_embeds_only_new_or_changed(tmp_path):
    out = tmp_path / "i"
    first = build_index(out, docs(), progress=False)
    assert first.embedded == len(CORPUS) and first.counts["added"] == len(CORPUS)
    again = build_index(out, docs(), progress=False)
    assert again.embedded == 0 and again.counts["unchanged"] == len(CORPUS) and again.passages == len(CORPUS)

    changed = [r if r[0] != "volcano" else ("volcano", "Volcanoes", "Volcanoes erupt basaltic magma on Iceland.", {})
               for r in CORPUS]
    changed.append(("glacier", "Glaciers", "A glacier is a persistent body of dense ice moving under its own weight.", {}))
    third = build_index(out, docs(changed), progress=False)
    assert third.embedded == 2 and third.counts["changed"] == 1 and third.counts["added"] == 1
    idx = Index(out)
    assert len(idx) == len(CORPUS) + 1
    assert idx.search("basaltic magma Iceland", 1, "bm25")[0].id == "volcano"
    assert idx.search("persistent body of dense ice", 1, "hybrid")[0].id == "glacier"
    assert idx.store.live_ids(idx.generation).count("volcano") == 1  # no duplicate rows
    idx.close()

    deleted = build_index(out, [], delete_ids=["glacier", "nope"], progress=False)
    assert deleted.deleted == 1 and deleted.missing_deletes == ["nope"] and deleted.embedded == 0
    idx = Index(out)
    assert "glacier" not in {h.id for h in idx.search("persistent body of dense ice", 9, "hybrid")}
    assert len(idx) == len(CORPUS)


def test_a_text_shared_across_embed_blocks_and_pages_is_embedded_once(tmp_path, monkeypatch):
    """Blocks of 3 distinct texts, read from the store in pages of 3 rows: A A B | C B D. The first block
    (A, B, C) fills on the second page and is committed while that page is still walked; the page's B must
    not be handed out again (the 1M-passage scale build once stopped on 'internal mismatch' from this)."""
    from expertrag.retrieval import builder

    monkeypatch.setattr(builder, "EMBED_COMMIT_ROWS", 3)
    texts = ["Alpha text about rivers.", "Alpha text about rivers.", "Beta text about hills.",
             "Gamma text about lakes.", "Beta text about hills.", "Delta text about caves."]
    given: list[str] = []

    def encoder(embedder, blocks):
        for block in blocks:
            given.extend(block)
            yield embedder.encode(block)

    report = build_index(tmp_path / "i", [Document(f"d{i}", "Same", t) for i, t in enumerate(texts)],
                         progress=False, encoder=encoder)
    assert report.passages == 6 and report.embedded == 4
    assert len(given) == len(set(given)) == 4
    idx = Index(tmp_path / "i")
    assert {h.id for h in idx.search("Beta text about hills", 2, "dense")} == {"d2", "d4"}


def test_changed_document_with_fewer_chunks_retires_the_rest(tmp_path):
    long_text = " ".join(f"Sentence {i} talks about topic number {i} in some detail." for i in range(120))
    out = tmp_path / "i"
    build_index(out, [Document(id="long", title="Long", contents=long_text)], progress=False)
    n_before = len(Index(out))
    assert n_before > 2
    build_index(out, [Document(id="long", title="Long", contents="Now it is short.")], progress=False)
    idx = Index(out)
    assert len(idx) == 1 and idx.store.live_ids(idx.generation) == ["long"]


def test_embedder_mismatch_is_refused(index_dir, tmp_path):
    with pytest.raises(IndexFormatError, match="all-MiniLM-L6-v2.*other-model"):
        Index(index_dir, RetrievalConfig(embedder="other-model"))
    with pytest.raises(IndexFormatError, match="embedder"):
        build_index(index_dir, docs(), retrieval=RetrievalConfig(embedder=str(tmp_path)), progress=False)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_files_give_clear_errors(index_dir, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(IndexFormatError, match="not found"):
        Index(missing)

    bad = _copy(index_dir, tmp_path / "truncated")
    dense = next(bad.glob("dense-*.faiss"))
    dense.write_bytes(dense.read_bytes()[:100])
    with pytest.raises(IndexFormatError, match=rf"{dense.name}.*(corrupt|truncated)"):
        Index(bad)

    bad = _copy(index_dir, tmp_path / "manifest")
    (bad / "manifest.json").write_text('{"format_version": 1, "generation"')
    with pytest.raises(IndexFormatError, match="manifest.json: corrupt manifest"):
        Index(bad)

    bad = _copy(index_dir, tmp_path / "store")
    (bad / "store.sqlite").write_bytes(b"this is not a database at all" * 100)
    for extra in bad.glob("store.sqlite-*"):
        extra.unlink()
    with pytest.raises(IndexFormatError, match="store.sqlite"):
        Index(bad)

    bad = _copy(index_dir, tmp_path / "format")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="format 99"):
        Index(bad)


def _dense_reference(bm25, query: str, k: int, allowed=None) -> list[tuple[int, float]]:
    """bm25s's own N-long score array (`get_scores_from_ids`), ranked by score then index position."""
    ids = [bm25.model.vocab_dict[t] for t in tokenize([query], bm25.stemmer)[0] if t in bm25.model.vocab_dict]
    if not ids:
        return []
    scores = bm25.model.get_scores_from_ids(ids)
    if allowed is not None:
        scores = scores * np.isin(bm25.rowids, allowed)
    order = [int(i) for i in np.lexsort((np.arange(scores.size), -scores)) if scores[i] > 0][:k]
    return [(int(bm25.rowids[i]), float(scores[i])) for i in order]


@pytest.mark.parametrize("share", [0, 10**9])  # 0: always the sorted postings; 10**9: always the N-long bincount
def test_bm25_search_scores_only_the_query_postings_and_breaks_ties_by_position(monkeypatch, share):
    """Duplicated passages tie exactly: the earlier-indexed one comes first, at the k-th place too, and both
    candidate paths rank every query as bm25s's full score array does (with and without `allowed`)."""
    from expertrag.retrieval import bm25 as bm25_module
    from expertrag.retrieval.bm25 import BM25Index

    texts = [f"{t}. {c}" for _, t, c, _ in CORPUS]
    rows = [(100 + 7 * i, text) for i, text in enumerate(texts + texts[:4] + texts[:2])]  # ties, rowids not positions
    bm25 = BM25Index.build([rows], k1=1.5, b=0.75, stem=True)
    monkeypatch.setattr(bm25_module, "SPARSE_SHARE", share)
    allowed = np.array(sorted(r for r, _ in rows[::2]))
    for query in QUERIES + ["contract agreement damages for a blender motor", "python programming guido"]:
        for k in (1, 2, 3, 5, len(rows)):
            expected = _dense_reference(bm25, query, k)
            got = bm25.search(query, k)
            assert [r for r, _ in got] == [r for r, _ in expected], (query, k)
            assert [s for _, s in got] == pytest.approx([s for _, s in expected], rel=1e-6)
            limited = _dense_reference(bm25, query, k, allowed)
            assert [r for r, _ in bm25.search(query, k, allowed)] == [r for r, _ in limited], (query, k)
    first = texts[0].split(".")[0]  # the first passage's title: it and its copy score the same
    top2 = [r for r, _ in bm25.search(first, 2)]
    assert top2 == [100, 100 + 7 * len(texts)]
