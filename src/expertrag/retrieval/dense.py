"""Dense retrieval: normalised embeddings in FAISS, ids = store rowids.

flat (exact inner product) by default; ivf and hnsw for large corpora; ivfpq (IVF with product-quantised
codes: `pq_m` bytes a vector instead of 4 x dim) where the vectors themselves no longer fit in memory.
Vectors arrive in batches from the store, so building never holds more than the index itself plus one
batch (and, for ivf/ivfpq, the training sample).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np

from expertrag.errors import IndexFormatError


class DenseIndex:
    def __init__(self, index: faiss.Index, kind: str, *, nprobe: int = 16, ef_search: int = 64):
        self.index = index
        self.kind = kind
        self.nprobe = nprobe
        self.ef_search = ef_search

    @classmethod
    def build(cls, batches: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, kind: str = "flat", *,
              nlist: int = 256, nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 64,
              total: int | None = None, pq_m: int = 48, train: np.ndarray | None = None) -> DenseIndex:
        """train: for ivf/ivfpq, the vectors to train on (a sample spread over the corpus); without it
        the first batches are the sample, which for a corpus read in file order is its first documents."""
        batches = iter(batches)
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            index = faiss.IndexIDMap2(faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT))
        elif kind in ("ivf", "ivfpq"):
            # IVF must be trained before anything is added: on the given sample, else on the first batches
            head: list = []
            if train is None:
                head, batches = _take(batches, max(nlist * 40, 4096))
                train = np.concatenate([v for _, v in head]) if head else np.zeros((0, dim), np.float32)
            train = np.ascontiguousarray(train, dtype=np.float32)
            # small corpora: fewer lists. ivfpq (meant for large ones) allows faiss's own minimum of 39
            # training vectors per list; ivf keeps its sqrt rule so existing indexes build as before
            cap = len(train) // 39 if kind == "ivfpq" else int(math.sqrt(max(len(train), 1)))
            nlist = max(1, min(nlist, cap))
            quantizer = faiss.IndexFlatIP(dim)
            if kind == "ivf":
                ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                if dim % pq_m:
                    raise ValueError(f"retrieval.ivf_pq_m={pq_m} must divide the embedding width {dim}")
                # 8-bit codes need 256 training vectors per sub-quantiser centroid set; below that (a tiny
                # corpus) fewer bits, so a small index still builds
                nbits = 8 if len(train) >= 256 * 39 else max(1, min(8, int(math.log2(max(len(train), 2) / 39))))
                ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
            if len(train):
                ivf.train(train)
            index = faiss.IndexIDMap2(ivf)
            batches = _chain(head, batches)
        else:
            raise ValueError(f"unknown dense index kind {kind!r} (flat, ivf, ivfpq, hnsw)")
        for ids, vectors in batches:
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
        return cls(index, kind, nprobe=nprobe, ef_search=ef_search)

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, kind: str, *, nprobe: int = 16, ef_search: int = 64) -> DenseIndex:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise IndexFormatError(f"{path}: unreadable FAISS index ({str(e).splitlines()[0]}); rebuild the index") from None
        return cls(index, kind, nprobe=nprobe, ef_search=ef_search)

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    def _params(self, allowed: np.ndarray | None):
        sel = faiss.IDSelectorBatch(allowed.astype(np.int64)) if allowed is not None else None
        if self.kind in ("ivf", "ivfpq"):
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=self.ef_search)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
               ) -> list[list[tuple[int, float]]]:
        """Top-k (rowid, cosine) per query row; `allowed` rowids restrict the search inside FAISS."""
        if self.index.ntotal == 0 or k <= 0 or (allowed is not None and len(allowed) == 0):
            return [[] for _ in range(len(queries))]
        k = min(k, self.index.ntotal)
        params = self._params(allowed)
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        # FAISS pads with id -1 when fewer than k pass the filter; tolist() converts a row in one call
        out = []
        for row_ids, row_scores in zip(ids, scores, strict=True):
            keep = row_ids >= 0
            out.append(list(zip(row_ids[keep].tolist(), row_scores[keep].tolist(), strict=True)))
        return out


def _take(it: Iterator, n_rows: int):
    head, rows = [], 0
    for item in it:
        head.append(item)
        rows += len(item[0])
        if rows >= n_rows:
            break
    return head, it


def _chain(head, rest):
    yield from head
    yield from rest
