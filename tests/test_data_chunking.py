"""Chunking invariants with the real MiniLM tokenizer: token bound, overlap, exact offsets, stable ids."""

from __future__ import annotations

import hashlib
import random

import pytest
from pydantic import ValidationError

from expertrag.data import (
    ChunkingConfig,
    Document,
    chunk_document,
    chunk_documents,
    content_hash,
    count_tokens,
    load_tokenizer,
)
from expertrag.errors import ConfigError

WORDS = ("the river runs past old stone bridges while merchants carry saffron, copper and wool toward "
         "Zürich and São Paulo; engineers measured 3.14159 metres of cable in 1987 under extraordinarily "
         "unusual conditions").split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def make_text(seed: int, sentences: int) -> str:
    rng = random.Random(seed)
    paras, cur = [], []
    for i in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 30))]
        cur.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", '."']))
        if i % 7 == 6:
            paras.append(" ".join(cur))
            cur = []
    paras.append(" ".join(cur))
    return "  " + "\n\n".join(p for p in paras if p) + "\n"


def doc(contents: str, id: str = "d1", title: str = "A Title", **meta) -> Document:
    return Document(id=id, title=title, contents=contents, metadata=meta, source="corpus.jsonl", line=1)


def check_invariants(d: Document, passages, cfg: ChunkingConfig, tok, *, overlap_slack: int = 0) -> None:
    """Consecutive passages share >= overlap_tokens - overlap_slack tokens. Overlap falls short only where
    its start lands inside a word that begins at or before the previous passage's start (tiny windows)."""
    text = d.contents
    assert passages, "at least one passage"
    for i, p in enumerate(passages):
        assert p.contents == text[p.start:p.end]
        assert p.contents == p.contents.strip() and p.contents
        assert count_tokens(tok, p.contents) <= cfg.max_tokens
        assert p.doc_id == d.id and p.title == d.title
        assert p.metadata["chunk"] == i and p.metadata["doc_id"] == d.id
        assert p.content_hash == hashlib.sha256(f"{p.title}\n{p.contents}".encode()).hexdigest()
    assert passages[0].start == len(text) - len(text.lstrip())
    assert passages[-1].end == len(text.rstrip())
    for prev, nxt in zip(passages, passages[1:], strict=False):
        assert prev.start < nxt.start and prev.end < nxt.end
        if cfg.overlap_tokens:
            assert nxt.start < prev.end
            shared = count_tokens(tok, text[nxt.start:prev.end])
            assert shared >= max(1, cfg.overlap_tokens - overlap_slack)
        else:
            assert not text[prev.end:nxt.start].strip()  # nothing but whitespace is left out


@pytest.mark.parametrize("max_tokens, overlap, slack", [(200, 40, 0), (64, 16, 0), (30, 0, 0), (12, 6, 3),
                                                        (12, 11, 11)])
def test_long_document_invariants(tok, max_tokens, overlap, slack):
    cfg = ChunkingConfig(max_tokens=max_tokens, overlap_tokens=overlap)
    d = doc(make_text(max_tokens, 60))
    passages = chunk_document(d, cfg, tok)
    assert len(passages) > 2
    check_invariants(d, passages, cfg, tok, overlap_slack=slack)
    assert [p.id for p in passages] == [f"d1#{i}" for i in range(len(passages))]


def test_passages_end_at_sentence_ends(tok):
    cfg = ChunkingConfig(max_tokens=80, overlap_tokens=10)
    passages = chunk_document(doc(make_text(3, 80)), cfg, tok)
    ends = [p.contents[-1] for p in passages[:-1]]
    assert all(c in '.!?"' for c in ends), ends
    unsnapped = chunk_document(doc(make_text(3, 80)), cfg.model_copy(update={"snap_to_sentences": False}), tok)
    check_invariants(doc(make_text(3, 80)), unsnapped, cfg, tok)


def test_single_passage_keeps_doc_id_and_metadata(tok):
    d = doc("  Short text about Zürich.\n", id="wiki:Zürich", title="Zürich", domain="geography",
            groups=["public"], source="wikipedia")
    (p,) = chunk_document(d, ChunkingConfig(), tok)
    assert p.id == "wiki:Zürich" and p.contents == "Short text about Zürich."
    assert (p.start, p.end) == (2, 26)
    assert p.metadata == {"domain": "geography", "groups": ["public"], "source": "wikipedia",
                          "doc_id": "wiki:Zürich", "chunk": 0}
    assert p.content_hash == content_hash("Zürich", "Short text about Zürich.")
    (q,) = chunk_document(doc("no source metadata"), ChunkingConfig(), tok)
    assert q.metadata["source"] == "corpus.jsonl"  # falls back to the file the document came from


def test_ids_and_hashes_stable_across_runs_and_batching(tok):
    cfg = ChunkingConfig(max_tokens=50, overlap_tokens=10)
    docs = [doc(make_text(s, 1 + s * 3), id=f"doc{s}") for s in range(12)]

    def run(batch_size):
        return [(p.id, p.start, p.end, p.content_hash) for p in chunk_documents(docs, cfg, tok,
                                                                             batch_size=batch_size)]

    first = run(256)
    assert first == run(256) == run(5)
    assert first == [(p.id, p.start, p.end, p.content_hash) for d in docs for p in chunk_document(d, cfg, tok)]
    assert len({pid for pid, *_ in first}) == len(first)
    assert any(pid == "doc0" for pid, *_ in first)  # a one-passage document keeps its id


def test_words_longer_than_the_window_are_cut_within_the_bound(tok):
    cfg = ChunkingConfig(max_tokens=10, overlap_tokens=3)
    d = doc("Pi is " + "31415926535897932384626433832795028841971693993751" * 2 + " roughly.")
    passages = chunk_document(d, cfg, tok)
    assert len(passages) > 3
    check_invariants(d, passages, cfg, tok, overlap_slack=cfg.overlap_tokens)


def test_unicode_and_odd_whitespace_offsets(tok):
    cfg = ChunkingConfig(max_tokens=9, overlap_tokens=2)
    text = "Café\u00a0crème in 東京都 costs ¥500.\tNaïve résumé — “quoted” text\u200b here.\r\n\r\nΑλφα βήτα γάμμα."
    d = doc(text)
    passages = chunk_document(d, cfg, tok)
    check_invariants(d, passages, cfg, tok)


def test_config_validation(tok):
    with pytest.raises(ValidationError, match="overlap_tokens .* must be smaller than max_tokens"):
        ChunkingConfig(max_tokens=20, overlap_tokens=20)
    bad = ChunkingConfig.model_construct(max_tokens=20, overlap_tokens=25)
    with pytest.raises(ConfigError, match="overlap_tokens"):
        chunk_document(doc("text"), bad, tok)
    with pytest.raises(ConfigError):
        list(chunk_documents([doc("text")], bad, tok))
