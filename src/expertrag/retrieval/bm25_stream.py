"""BM25 built in two streamed passes, with corpus-wide statistics, written straight into bm25s's file format.

`bm25s.BM25.index` needs every passage's tokens in memory at once: ~1.1 MB per 1,000 passages, 1.1 GB at 1M
(RESULTS.md, "Scale"). This builder holds one batch of passages at a time instead:

- pass 1 reads the passages, tokenises them and counts, per term, the passages that contain it (document
  frequency), and the corpus's passage and token counts (for the mean passage length);
- between the passes the column pointers of the score matrix follow from the document frequencies (a term's
  column holds exactly its df entries), so the output arrays are allocated on disk at their final size;
- pass 2 reads the passages again and writes each (passage, term) score, with the corpus-wide idf and mean
  length, at its place in its term's column; passages arrive in order, so every column ends up sorted.

The files are the ones `bm25s.BM25.save` writes (CSC data/indices/indptr, vocabulary, params) plus our rowids,
and `BM25Index.load` reads them with bm25s; the scores are bm25s's "lucene" BM25 computed in the same
precision (tests/test_bm25_stream.py compares every posting with `bm25s.BM25.index` on real text).

Memory: the vocabulary (term -> id, document frequencies, column cursors: grows with distinct terms, which
grow far slower than passages), one batch, and the output pages written since the last flush: those are
synced and dropped from this process (`MADV_DONTNEED`) every `flush_bytes`, so they stay in the page cache,
not in its resident set.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable, Iterable
from pathlib import Path

import bm25s
import numpy as np

from expertrag.retrieval.bm25 import ROWIDS, _stemmer, query_tokens

Batches = Callable[[], Iterable[list[tuple[int, str]]]]
DATA, INDICES, INDPTR = "data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy"
VOCAB, PARAMS = "vocab.index.json", "params.index.json"
SCORE_DTYPE, INDEX_DTYPE = np.float32, np.int32  # bm25s's defaults (its `dtype`, `int_dtype`)


class _Vocabulary:
    """Term -> id in first-seen order, with a document-frequency count per id."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.df = np.zeros(1 << 12, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, tokens: list[str], grow: bool) -> list[int]:
        if grow:
            ids, setdefault = self.ids, self.ids.setdefault
            return [setdefault(t, len(ids)) for t in tokens]
        return [self.ids[t] for t in tokens]

    def count(self, unique_ids: np.ndarray) -> None:
        need = len(self.ids)
        if need > len(self.df):
            self.df = np.concatenate([self.df, np.zeros(max(need, 2 * len(self.df)) - len(self.df), np.int64)])
        np.add.at(self.df, unique_ids, 1)


def _tokenize_batch(texts: list[str], stemmer) -> list[list[str]]:
    return [query_tokens(t, stemmer) for t in texts]


def _batch_pairs(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(doc-in-batch, term id, term frequency) for each distinct term of each passage, sorted by passage then
    term, and every passage's token count."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    if lengths.sum() == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, lengths
    doc = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
    term = np.fromiter((t for d in docs for t in d), dtype=np.int64, count=int(lengths.sum()))
    width = int(term.max()) + 1
    keys, tf = np.unique(doc * width + term, return_counts=True)
    return keys // width, keys % width, tf, lengths


class _DiskArray:
    """A .npy file of a fixed length, written through a shared mapping whose pages are synced and dropped
    from the process every `flush_bytes` of writes."""

    def __init__(self, path: Path, dtype, length: int, flush_bytes: int):
        header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(length,))
        offset = header.offset
        del header
        self._file = open(path, "r+b")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._file.fileno(), 0)
        self.array = np.frombuffer(self._map, dtype=dtype, count=length, offset=offset)
        self._flush_bytes, self._dirty = flush_bytes, 0

    def wrote(self, n: int) -> None:
        self._dirty += n * self.array.itemsize
        if self._dirty >= self._flush_bytes:
            self._map.flush()
            if hasattr(mmap, "MADV_DONTNEED"):  # Linux; elsewhere the kernel reclaims the clean pages itself
                self._map.madvise(mmap.MADV_DONTNEED)
            self._dirty = 0

    def close(self) -> None:
        self._map.flush()
        del self.array
        self._map.close()
        self._file.close()


def write_bm25(batches: Batches, directory: Path, *, k1: float, b: float, stem: bool,
               flush_bytes: int = 64 << 20) -> int:
    """Build the BM25 index of the (rowid, text) batches that `batches()` yields (called twice: it must give
    the same passages in the same order both times) into `directory`; returns the passage count."""
    directory.mkdir(parents=True, exist_ok=True)
    stemmer = _stemmer(stem)
    vocab = _Vocabulary()

    # pass 1: vocabulary, document frequencies, passage and token counts
    n_docs = n_tokens = 0
    for batch in batches():
        docs = [vocab.encode(toks, grow=True) for toks in _tokenize_batch([t for _, t in batch], stemmer)]
        _, term, _, lengths = _batch_pairs(docs)
        vocab.count(term)
        n_docs += len(docs)
        n_tokens += int(lengths.sum())

    if n_docs == 0:  # what BM25Index.save writes for an empty index: the rowids alone
        np.save(directory / ROWIDS, np.zeros(0, dtype=np.int64))
        return 0
    rowids = np.lib.format.open_memmap(directory / ROWIDS, mode="w+", dtype=np.int64, shape=(n_docs,))
    n_vocab = len(vocab)
    df = vocab.df[:n_vocab]
    indptr = np.zeros(n_vocab + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    # bm25s's lucene idf, computed in float64 and kept in its float32 (its _score_idf_lucene + _build_idf_array)
    idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5)).astype(SCORE_DTYPE)
    avg_len = n_tokens / n_docs
    nnz = int(indptr[-1])
    data = _DiskArray(directory / DATA, SCORE_DTYPE, nnz, flush_bytes)
    indices = _DiskArray(directory / INDICES, INDEX_DTYPE, nnz, flush_bytes)
    cursor = indptr[:-1].copy()  # the next free slot of each term's column

    # pass 2: every (passage, term) score at its place in its term's column
    done = 0
    try:
        for batch in batches():
            texts = [t for _, t in batch]
            rowids[done:done + len(batch)] = [r for r, _ in batch]
            docs = [vocab.encode(toks, grow=False) for toks in _tokenize_batch(texts, stemmer)]
            doc, term, tf, lengths = _batch_pairs(docs)
            # bm25s's order of operations and precisions: tf in float32, the length norm in float64
            tf32 = tf.astype(SCORE_DTYPE)
            tfc = tf32 / (k1 * ((1 - b) + b * lengths[doc] / avg_len) + tf32)
            scores = (idf[term] * tfc).astype(SCORE_DTYPE)
            order = np.argsort(term, kind="stable")  # within a term, passages stay in order
            term_sorted = term[order]
            starts = np.flatnonzero(np.r_[True, term_sorted[1:] != term_sorted[:-1]])
            rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
            slots = cursor[term_sorted] + rank
            data.array[slots] = scores[order]
            indices.array[slots] = (doc[order] + done).astype(INDEX_DTYPE)
            np.add.at(cursor, term_sorted[starts], np.diff(np.r_[starts, len(order)]))
            data.wrote(len(order))
            indices.wrote(len(order))
            done += len(batch)
    finally:
        data.close()
        indices.close()
    if done != n_docs or not np.array_equal(cursor, indptr[1:]):
        raise RuntimeError(f"{directory}: the passages changed between the two BM25 passes "
                           f"({n_docs} then {done}); rebuild the index")
    rowids.flush()
    del rowids
    np.save(directory / INDPTR, indptr)
    # bm25s appends the empty token (its create_empty_token) with no column of its own
    ids = dict(vocab.ids)
    ids.setdefault("", n_vocab)
    (directory / VOCAB).write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    params = {"k1": k1, "b": b, "delta": 0.5, "method": "lucene", "idf_method": "lucene",
              "dtype": np.dtype(SCORE_DTYPE).name, "int_dtype": np.dtype(INDEX_DTYPE).name, "num_docs": n_docs,
              "version": bm25s.__version__, "backend": "numpy"}
    (directory / PARAMS).write_text(json.dumps(params, indent=4), encoding="utf-8")
    return n_docs
