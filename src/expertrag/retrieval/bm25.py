"""Sparse retrieval: BM25 via bm25s, over the store's live passages, keyed by store rowid."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import bm25s
import numpy as np
from bm25s.selection import topk
from bm25s.stopwords import STOPWORDS_EN

from expertrag.errors import IndexFormatError

ROWIDS = "rowids.npy"


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

    def _postings(self, term: str) -> np.ndarray:
        """Column positions of the passages holding `term` (empty for a term not in the vocabulary).
        bm25s keeps a CSC score matrix: a term's nonzero rows are exactly the passages that contain it."""
        tid = self._vocab.get(term)
        sc = getattr(self.model, "scores", None)
        if tid is None or not isinstance(sc, dict) or tid + 1 >= len(sc["indptr"]):
            return np.zeros(0, dtype=np.int64)
        ip = sc["indptr"]
        return np.asarray(sc["indices"][ip[tid]:ip[tid + 1]])

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

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Top-k (rowid, score) with score > 0; `allowed` (sorted rowids) restricts the candidates.

        The same scores and selection as `bm25s.BM25.retrieve` (its `get_scores_from_ids` and `topk`), called
        directly: `retrieve` validates its input, converts token lists and opens tqdm bars on every call,
        which for one query costs more than the scoring."""
        if len(self.rowids) == 0 or k <= 0:
            return []
        vocab = self._vocab
        ids = [vocab[t] for t in query_tokens(query, self.stemmer) if t in vocab]
        if not ids:
            return []
        mask = None
        if allowed is not None:
            mask = np.isin(self.rowids, allowed).astype(np.float32)
            if not mask.any():
                return []
        k = min(k, len(self.rowids))
        scores, docs = topk(self.model.get_scores_from_ids(ids, weight_mask=mask), k, sorted=True)
        keep = scores > 0  # no query term in the passage (or masked out)
        return list(zip(self.rowids[docs[keep]].tolist(), scores[keep].tolist(), strict=True))
