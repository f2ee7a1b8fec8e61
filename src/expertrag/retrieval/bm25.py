"""Sparse retrieval: BM25 via bm25s, over the store's live passages, keyed by store rowid."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import bm25s
import numpy as np

from expertrag.errors import IndexFormatError

ROWIDS = "rowids.npy"


def _stemmer(enabled: bool):
    if not enabled:
        return None
    import Stemmer

    return Stemmer.Stemmer("english")


def tokenize(texts: list[str], stemmer) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)


class BM25Index:
    def __init__(self, model: bm25s.BM25, rowids: np.ndarray, stem: bool):
        self.model = model
        self.rowids = rowids
        self.stemmer = _stemmer(stem)
        self._vocab = getattr(model, "vocab_dict", None) or {}

    @classmethod
    def build(cls, batches: Iterable[list[tuple[int, str]]], *, k1: float, b: float, stem: bool) -> BM25Index:
        """Index (rowid, text) batches. bm25s needs every document's tokens at once to build its
        sparse matrix; the token lists are far smaller than the texts, which we do not keep."""
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

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Top-k (rowid, score) with score > 0; `allowed` (sorted rowids) restricts the candidates."""
        if len(self.rowids) == 0 or k <= 0:
            return []
        query_tokens = [t for t in tokenize([query], self.stemmer)[0] if t in self._vocab]
        if not query_tokens:
            return []
        mask = None
        if allowed is not None:
            mask = np.isin(self.rowids, allowed).astype(np.float32)
            if not mask.any():
                return []
        k = min(k, len(self.rowids))
        docs, scores = self.model.retrieve(
            [query_tokens], k=k, show_progress=False, weight_mask=mask, n_threads=0
        )
        out = []
        for doc, score in zip(docs[0], scores[0], strict=True):
            if score <= 0:
                continue  # no query term in the passage (or masked out)
            out.append((int(self.rowids[doc]), float(score)))
        return out
