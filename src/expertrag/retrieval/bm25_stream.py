"""BM25 built from a stream of passages with corpus-wide statistics, in bounded memory, straight into bm25s's
file format.

`bm25s.BM25.index` needs every passage's tokens in memory at once: ~1.1 MB per 1,000 passages, 1.1 GB at 1M
(RESULTS.md, "Scale"). This builder reads the passages once and never holds more than one batch of them:

1. One pass over the passages: tokenise each batch, reduce each passage to its (term id, term frequency)
   pairs, append them and the passage lengths to spill files on disk (8 bytes a distinct term of a passage),
   count per term the passages that contain it (document frequency).
2. The document frequencies give the score matrix's column pointers (a term's column holds exactly df
   entries), so the output files are laid out at their final size.
3. The columns are filled in blocks of consecutive terms whose postings fit in `block_bytes`: for each block
   the spill files are read again in chunks (the pairs as spilled: no re-counting), each (passage, term)
   score of the block's terms is computed with the corpus-wide idf and mean length and put at its place, and the finished block is written to the
   output files in one sequential write. Passages arrive in order, so every column ends up sorted.

The files are the ones `bm25s.BM25.save` writes (CSC data/indices/indptr, vocabulary, params) plus our rowids,
and `BM25Index.load` reads them with bm25s; the scores are bm25s's "lucene" BM25 computed in the same
precisions (tests/test_bm25_stream.py compares every posting with `bm25s.BM25.index` on real text).

Memory: the vocabulary (term -> id and three numbers per term: grows with distinct terms, which grow far
slower than passages), one batch or chunk, and one block of postings (`block_bytes`; a single term whose
postings alone exceed it is a block of its own). Time: one tokenisation and term count, plus one read of the
spill files per block (sequential, ~8 bytes a posting).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import bm25s
import numpy as np

from expertrag.retrieval.bm25 import ROWIDS, _stemmer, query_tokens

DATA, INDICES, INDPTR = "data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy"
VOCAB, PARAMS = "vocab.index.json", "params.index.json"
SCORE_DTYPE, INDEX_DTYPE = np.float32, np.int32  # bm25s's defaults (its `dtype`, `int_dtype`)
TERM_DTYPE = np.int32
TF_DTYPE = np.int32  # a term's count in one passage
CHUNK_DOCS = 1 << 13  # passages read back from the spill files at a time (~10 MB of temporaries)


class _Vocabulary:
    """Term -> id in first-seen order, with a document-frequency count per id."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.df = np.zeros(1 << 12, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, tokens: list[str]) -> list[int]:
        ids, setdefault = self.ids, self.ids.setdefault
        return [setdefault(t, len(ids)) for t in tokens]

    def count(self, unique_ids: np.ndarray) -> None:
        need = len(self.ids)
        if need > len(self.df):
            self.df = np.concatenate([self.df, np.zeros(max(need, 2 * len(self.df)) - len(self.df), np.int64)])
        np.add.at(self.df, unique_ids, 1)


def _pairs(terms: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(passage-in-chunk, term id, term frequency) for each distinct term of each passage, sorted by passage
    then term; `terms` are the passages' term ids end to end, `lengths` their token counts."""
    if len(terms) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    width = int(terms.max()) + 1
    keys, tf = np.unique(doc * width + terms.astype(np.int64), return_counts=True)
    return keys // width, keys % width, tf


def _blocks(indptr: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Runs [lo, hi) of consecutive terms whose postings together fit in `limit` entries (a term with more is
    a run of its own)."""
    out, lo, n = [], 0, len(indptr) - 1
    while lo < n:
        hi = int(np.searchsorted(indptr, indptr[lo] + limit, side="right")) - 1
        hi = min(max(hi, lo + 1), n)
        out.append((lo, hi))
        lo = hi
    return out


def _npy_file(path: Path, dtype, length: int) -> int:
    """Create `path` as a .npy file of `length` items (contents written later); returns the data offset."""
    header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(length,))
    offset = header.offset
    del header
    return offset


def write_bm25(batches: Iterable[list[tuple[int, str]]], directory: Path, *, k1: float, b: float, stem: bool,
               block_bytes: int = 32 << 20) -> int:
    """Build the BM25 index of the (rowid, text) batches into `directory`; returns the passage count."""
    directory.mkdir(parents=True, exist_ok=True)
    stemmer = _stemmer(stem)
    vocab = _Vocabulary()
    with tempfile.TemporaryDirectory(dir=directory, prefix=".spill-") as spill:
        spill_dir = Path(spill)
        paths = {n: spill_dir / n for n in ("terms", "tfs", "distinct", "lengths", "rowids")}
        # 1. tokenise once; each passage's (term, tf) pairs, its distinct-term count, its length and its
        # rowid go to the spill files
        n_docs = n_tokens = 0
        with contextlib.ExitStack() as stack:
            files = {n: stack.enter_context(open(p, "wb")) for n, p in paths.items()}
            for batch in batches:
                docs = [vocab.encode(query_tokens(t, stemmer)) for _, t in batch]
                lengths = np.fromiter((len(d) for d in docs), dtype=np.int32, count=len(docs))
                terms = np.fromiter((t for d in docs for t in d), dtype=TERM_DTYPE, count=int(lengths.sum()))
                doc, term, tf = _pairs(terms, lengths)
                vocab.count(term)
                term.astype(TERM_DTYPE).tofile(files["terms"])
                tf.astype(TF_DTYPE).tofile(files["tfs"])
                np.bincount(doc, minlength=len(batch)).astype(np.int32).tofile(files["distinct"])
                lengths.tofile(files["lengths"])
                np.fromiter((r for r, _ in batch), dtype=np.int64, count=len(batch)).tofile(files["rowids"])
                n_docs += len(batch)
                n_tokens += int(lengths.sum())
        if n_docs == 0:  # what BM25Index.save writes for an empty index: the rowids alone
            np.save(directory / ROWIDS, np.zeros(0, dtype=np.int64))
            return 0
        _copy_into_npy(paths["rowids"], directory / ROWIDS, np.int64, n_docs)

        # 2. the layout: column pointers from the document frequencies
        n_vocab = len(vocab)
        df = vocab.df[:n_vocab]
        indptr = np.zeros(n_vocab + 1, dtype=np.int64)
        np.cumsum(df, out=indptr[1:])
        # bm25s's lucene idf, computed in float64 and kept in its float32 (its _score_idf_lucene + _build_idf_array)
        idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5)).astype(SCORE_DTYPE)
        avg_len = n_tokens / n_docs
        nnz = int(indptr[-1])
        data_at = _npy_file(directory / DATA, SCORE_DTYPE, nnz)
        indices_at = _npy_file(directory / INDICES, INDEX_DTYPE, nnz)

        # 3. the columns, a block of terms at a time
        per_entry = np.dtype(SCORE_DTYPE).itemsize + np.dtype(INDEX_DTYPE).itemsize
        with open(directory / DATA, "r+b") as data_f, open(directory / INDICES, "r+b") as indices_f:
            for lo, hi in _blocks(indptr, max(1, block_bytes // per_entry)):
                base = int(indptr[lo])
                data = np.empty(int(indptr[hi]) - base, dtype=SCORE_DTYPE)
                indices = np.empty(len(data), dtype=INDEX_DTYPE)
                cursor = indptr[lo:hi] - base  # the next free slot of each of the block's columns
                for first, doc, term, tf, lengths in _chunks(paths, n_docs):
                    keep = (term >= lo) & (term < hi)
                    doc, term, tf = doc[keep], term[keep], tf[keep]
                    if len(term) == 0:
                        continue
                    # bm25s's order of operations and precisions: tf in float32, the length norm in float64
                    tf32 = tf.astype(SCORE_DTYPE)
                    tfc = tf32 / (k1 * ((1 - b) + b * lengths[doc].astype(np.int64) / avg_len) + tf32)
                    scores = (idf[term] * tfc).astype(SCORE_DTYPE)
                    order = np.argsort(term, kind="stable")  # within a term, passages stay in order
                    col = term[order] - lo
                    starts = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
                    counts = np.diff(np.r_[starts, len(col)])
                    slots = cursor[col] + (np.arange(len(col)) - np.repeat(starts, counts))
                    data[slots] = scores[order]
                    indices[slots] = (doc[order] + first).astype(INDEX_DTYPE)
                    cursor[col[starts]] += counts
                if not np.array_equal(cursor, indptr[lo + 1:hi + 1] - base):
                    raise RuntimeError(f"{directory}: internal mismatch filling BM25 terms {lo}-{hi}")
                data_f.seek(data_at + base * data.itemsize)
                data.tofile(data_f)  # tofile, not write(tobytes()): no second copy of the block
                indices_f.seek(indices_at + base * indices.itemsize)
                indices.tofile(indices_f)
                del data, indices
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


def _chunks(paths: dict[str, Path], n_docs: int):
    """(index of the chunk's first passage, passage-in-chunk, term id, tf, the passages' lengths) for the
    spilled pairs, CHUNK_DOCS passages at a time, read into memory (not mapped: mapped pages would stay
    resident and grow with the corpus)."""
    with (open(paths["terms"], "rb") as term_f, open(paths["tfs"], "rb") as tf_f,
          open(paths["distinct"], "rb") as distinct_f, open(paths["lengths"], "rb") as length_f):
        for first in range(0, n_docs, CHUNK_DOCS):
            count = min(CHUNK_DOCS, n_docs - first)
            distinct = np.fromfile(distinct_f, dtype=np.int32, count=count)
            lengths = np.fromfile(length_f, dtype=np.int32, count=count)
            n_pairs = int(distinct.sum())
            term = np.fromfile(term_f, dtype=TERM_DTYPE, count=n_pairs).astype(np.int64)
            tf = np.fromfile(tf_f, dtype=TF_DTYPE, count=n_pairs)
            if len(distinct) != count or len(lengths) != count or len(term) != n_pairs or len(tf) != n_pairs:
                raise RuntimeError(f"{paths['terms'].parent}: spill files shorter than their counts")
            doc = np.repeat(np.arange(count, dtype=np.int64), distinct)
            yield first, doc, term, tf, lengths


def _copy_into_npy(raw: Path, out: Path, dtype, length: int, chunk: int = 1 << 20) -> None:
    """A raw array file as a .npy file, copied in chunks."""
    offset = _npy_file(out, dtype, length)
    with open(raw, "rb") as src, open(out, "r+b") as dst:
        dst.seek(offset)
        while block := src.read(chunk * np.dtype(dtype).itemsize):
            dst.write(block)
