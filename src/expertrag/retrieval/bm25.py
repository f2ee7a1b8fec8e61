"""Sparse retrieval: BM25 via bm25s, over the store's live passages, keyed by store rowid."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from expertrag.errors import IndexFormatError

ROWIDS = "rowids.npy"
# postings * SPARSE_SHARE < N: sum the sorted postings (~P log P), else one N-long bincount (~N). A rough
# switch point, not tuned; both paths give the same scores (scripts/bm25_query_bench.py times the whole search)
SPARSE_SHARE = 4


def best_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest positive scores, best first; ties by lower index. O(n) selection, then a
    sort of the k (plus whatever ties the k-th score)."""
    if scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    if scores.size > k:
        kth = np.partition(scores, scores.size - k)[scores.size - k]
        chosen = np.flatnonzero(scores >= kth)
    else:
        chosen = np.arange(scores.size)
    chosen = chosen[scores[chosen] > 0]
    return chosen[np.lexsort((chosen, -scores[chosen]))][:k]


def _stemmer(enabled: bool):
    if not enabled:
        return None
    import Stemmer

    return Stemmer.Stemmer("english")


def tokenize(texts: list[str], stemmer) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)


# bm25s.tokenize's own rules (scikit-learn's token pattern, lower-casing, its English stop list, then the
# stemmer), applied to one query without what a corpus tokenizer does besides: building a vocabulary and
# creating four (disabled) tqdm bars per call, which cost more than the regex. Must give the same tokens
# as `tokenize` (tests/test_retrieval.py checks that on real text).
_SPLIT = re.compile(r"(?u)\b\w\w+\b").findall
_STOPWORDS = frozenset(STOPWORDS_EN)


def query_tokens(query: str, stemmer) -> list[str]:
    tokens = [t for t in _SPLIT(query.lower()) if t not in _STOPWORDS]
    return stemmer.stemWords(tokens) if stemmer is not None and tokens else tokens


class BM25Index:
    def __init__(self, model: bm25s.BM25, rowids: np.ndarray, stem: bool):
        self.model = model
        self.rowids = rowids
        self.stemmer = _stemmer(stem)
        self._vocab = getattr(model, "vocab_dict", None) or {}

    @classmethod
    def build(cls, batches: Iterable[list[tuple[int, str]]], *, k1: float, b: float, stem: bool) -> BM25Index:
        """Index (rowid, text) batches in memory with bm25s. The reference build: index directories are
        built by `bm25_stream.write_bm25` in bounded memory; this one, which needs every document's tokens
        at once (~1.1 GB at 1M passages), serves the tests and `bench bm25` as what the streamed files must
        equal."""
        stemmer = _stemmer(stem)
        rowids: list[int] = []
        tokens: list[list[str]] = []
        for batch in batches:
            rowids.extend(r for r, _ in batch)
            tokens.extend(tokenize([t for _, t in batch], stemmer))
        model = bm25s.BM25(k1=k1, b=b)
        if tokens:
            model.index(tokens, show_progress=False)
        return cls(model, np.asarray(rowids, dtype=np.int64), stem)

    def save(self, directory: Path) -> None:
        """Write a `build` result in bm25s's format (the files `write_bm25` writes; reference use only)."""
        directory.mkdir(parents=True, exist_ok=True)
        if len(self.rowids):
            self.model.save(str(directory), show_progress=False)
        np.save(directory / ROWIDS, self.rowids)

    @classmethod
    def load(cls, directory: Path, *, stem: bool) -> BM25Index:
        try:
            rowids = np.load(directory / ROWIDS)
            if len(rowids) == 0:
                return cls(bm25s.BM25(), rowids, stem)
            model = bm25s.BM25.load(str(directory), mmap=False, show_progress=False)
        except (OSError, ValueError, KeyError) as e:
            raise IndexFormatError(f"{directory}: unreadable BM25 index ({e}); rebuild the index") from None
        return cls(model, rowids, stem)

    def __len__(self) -> int:
        return len(self.rowids)

    @property
    def num_docs(self) -> int:
        return len(self.rowids)

    def analyse(self, text: str) -> list[str]:
        """`text` as the index's terms (the query tokenizer: stop words dropped, stemmed as indexed)."""
        return query_tokens(text, self.stemmer)

    def _column(self, tid: int) -> tuple[np.ndarray, np.ndarray]:
        """Term `tid`'s postings: (index positions of the passages holding it, their per-term scores).
        bm25s keeps a CSC score matrix: a term's nonzero rows are exactly the passages that contain it."""
        sc = self.model.scores
        lo, hi = sc["indptr"][tid], sc["indptr"][tid + 1]
        return sc["indices"][lo:hi], sc["data"][lo:hi]

    def _postings(self, term: str) -> np.ndarray:
        """Index positions of the passages holding `term` (empty for a term not in the vocabulary)."""
        tid = self._vocab.get(term)
        sc = getattr(self.model, "scores", None)
        if tid is None or not isinstance(sc, dict) or tid + 1 >= len(sc["indptr"]):
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self._column(tid)[0])

    def document_frequency(self, terms: Iterable[str]) -> list[int]:
        """Per term (index terms, see `analyse`): how many passages contain it (0 = not in the vocabulary)."""
        return [int(self._postings(t).size) for t in terms]

    def docs_with_all(self, terms: Iterable[str]) -> int:
        """How many passages contain every one of `terms` (0 for no terms)."""
        common: np.ndarray | None = None
        for t in dict.fromkeys(terms):
            post = self._postings(t)
            common = post if common is None else np.intersect1d(common, post, assume_unique=True)
            if common.size == 0:
                return 0
        return 0 if common is None else int(common.size)

    def term_ids(self, query: str) -> list[int]:
        """The query's terms as vocabulary ids, in query order (repeats kept, unknown terms dropped)."""
        vocab = self._vocab
        return [vocab[t] for t in query_tokens(query, self.stemmer) if t in vocab]

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Top-k (rowid, score) with score > 0, best first; `allowed` (sorted rowids) restricts the candidates.
        Equal scores are ordered by index position (the earlier-indexed passage first), so a search is
        deterministic, ties at the k-th place included.

        Scores are bm25s's: a passage's score is the sum of its precomputed per-term scores over the query's
        term ids (a repeated term counts twice, as in `bm25s.BM25.get_scores_from_ids`). Only the passages
        that hold a query term are scored (`_candidates`): bm25s fills an N-long array per query, which
        made the query time grow with the corpus rather than with the query's postings."""
        if len(self.rowids) == 0 or k <= 0:
            return []
        ids = self.term_ids(query)
        if not ids:
            return []
        if getattr(self.model, "nonoccurrence_array", None) is not None:
            # BM25L/BM25+ give every passage a score for absent terms: no sparse shortcut; not built by us
            positions = np.arange(len(self.rowids))
            scores = self.model.get_scores_from_ids(ids).astype(np.float64)
        else:
            positions, scores = self._candidates(ids)
        if allowed is not None:
            keep = np.isin(self.rowids[positions], allowed)
            positions, scores = positions[keep], scores[keep]
        top = best_k(scores, k)
        return list(zip(self.rowids[positions[top]].tolist(), scores[top].astype(np.float32).tolist(),
                        strict=True))

    def _candidates(self, term_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(index positions, scores) of every passage holding one of `term_ids`, positions ascending.

        Few postings (the usual query): sort them and sum per passage. Postings near the corpus size (a
        term in most passages): one N-long bincount is cheaper than the sort. Both sum in float64 in
        posting order, so the two paths give identical scores."""
        columns = [self._column(t) for t in term_ids]
        docs = np.concatenate([c[0] for c in columns])
        weights = np.concatenate([c[1] for c in columns]).astype(np.float64)
        if docs.size * SPARSE_SHARE < len(self.rowids):
            positions, inverse = np.unique(docs, return_inverse=True)
            return positions, np.bincount(inverse, weights=weights, minlength=positions.size)
        summed = np.bincount(docs, weights=weights, minlength=len(self.rowids))
        positions = np.flatnonzero(summed)
        return positions, summed[positions]
