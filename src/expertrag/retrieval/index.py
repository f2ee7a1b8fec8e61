"""A built index directory, opened for search: BM25, dense and hybrid retrieval with filters.

Layout: manifest.json (the commit point), store.sqlite (passages, groups, embeddings),
bm25-<generation>/ and dense-<generation>.faiss. The manifest names the files of the committed
generation; readers never look at anything else, so a build in progress cannot disturb them.
Readers need no write access: the store is opened read-only.

Access control fails closed: a search without filters (or with `Filters()`) sees public passages only;
`Filters(groups=...)` adds the passages of those groups; only `Filters(all_groups=True)` sees everything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from expertrag.errors import IndexFormatError, InputError
from expertrag.retrieval.bm25 import BM25Index
from expertrag.retrieval.config import RetrievalConfig
from expertrag.retrieval.dense import DenseIndex
from expertrag.retrieval.embedder import (
    Embedder,
    check_backend_compatible,
    check_embedder_identity,
    query_backend,
)
from expertrag.retrieval.rrf import reciprocal_rank_fusion
from expertrag.retrieval.types import MODES, PUBLIC, Filters, Hit
from expertrag.store.docstore import DocStore, StoredPassage
from expertrag.store.manifest import read_manifest, verify_files

STORE_FILE = "store.sqlite"
PASSAGE_CACHE = 4096  # passages kept in memory: they never change within a generation
ALLOWED_CACHE = 64  # distinct filters (domain x access groups) whose rowids are kept


def bm25_dirname(gen: int) -> str:
    return f"bm25-{gen:06d}"


def dense_filename(gen: int) -> str:
    return f"dense-{gen:06d}.faiss"


class Index:
    """Open with `Index(path)`. Cheap to construct; the parts load on first use."""

    def __init__(self, directory: str | Path, config: RetrievalConfig | None = None, *, verify: bool = True):
        self.dir = Path(directory)
        self.config = config or RetrievalConfig()
        self.manifest = read_manifest(self.dir)
        # a packaged embedder is matched by name, a local folder (e.g. an ICT-trained one) by its weights
        check_embedder_identity(self.manifest.embedder, self.manifest.extra.get("embedder_identity"),
                                self.config.embedder, str(self.dir))
        built_backend = self.manifest.extra.get("embed_backend")  # absent: built before backends, by torch
        self.embed_backend = query_backend(self.config.embed_backend, built_backend)
        check_backend_compatible(built_backend or "torch", self.embed_backend, str(self.dir))
        if verify:
            verify_files(self.dir, self.manifest)
        self.store = DocStore(self.dir / STORE_FILE)
        if verify:
            self.store.check()
        self.generation = self.manifest.generation
        self._passages: OrderedDict[int, tuple[StoredPassage, dict]] = OrderedDict()
        # rowids per filter: fixed within a generation, and a domain expert's filter repeats every question
        self._allowed: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @property
    def version(self) -> str:
        """Changes whenever the index content changes: for cache keys."""
        digest = self.manifest.files.get(self.manifest.dense_file, "")[:12]
        return f"{self.generation}-{digest}"

    def __len__(self) -> int:
        return self.manifest.passages

    @cached_property
    def bm25(self) -> BM25Index:
        stem = bool(self.manifest.extra.get("bm25_stemmer", True))
        return BM25Index.load(self.dir / self.manifest.bm25_dir, stem=stem)

    @cached_property
    def dense(self) -> DenseIndex:
        return DenseIndex.load(self.dir / self.manifest.dense_file, self.manifest.dense_index,
                               nprobe=self.config.ivf_nprobe, ef_search=self.config.hnsw_ef_search)

    @cached_property
    def embedder(self) -> Embedder:
        # the config's name: checked above to give the index's vectors (a local folder may have moved since)
        embedder = Embedder(self.config.embedder, self.config.embed_batch_size, self.embed_backend)
        if embedder.dim != self.manifest.embedding_dim:
            raise IndexFormatError(
                f"{self.dir}: embedder {embedder.name!r} gives {embedder.dim}-d vectors, the index holds "
                f"{self.manifest.embedding_dim}-d; rebuild the index"
            )
        return embedder

    @cached_property
    def has_restricted(self) -> bool:
        """Whether any passage of this generation carries access groups (fixed per generation)."""
        return self.store.has_restricted(self.generation)

    def allowed(self, filters: Filters | None) -> np.ndarray | None:
        """Rowids the filters let through, or None when they let everything through.

        filters=None is `Filters()`: public passages only."""
        f = filters if filters is not None else PUBLIC
        if f.domains is None and (f.all_groups or not self.has_restricted):
            return None  # nothing to hide from this caller
        key = (f.domains, tuple(sorted(set(f.groups or ()))), f.all_groups)
        rows = self._allowed.get(key)
        if rows is None:
            rows = self.store.allowed_rowids(self.generation, domains=f.domains,
                                             groups=None if f.all_groups else (f.groups or ()), all_groups=f.all_groups)
            rows.setflags(write=False)  # shared between searches: nobody may change it in place
            self._allowed[key] = rows
            while len(self._allowed) > ALLOWED_CACHE:
                self._allowed.popitem(last=False)
        else:
            self._allowed.move_to_end(key)
        return rows

    # ---- search ----------------------------------------------------------------------------------
    def search(self, query: str, k: int | None = None, mode: str = "hybrid",
               filters: Filters | None = None) -> list[Hit]:
        return self.search_many([query], k, mode, filters)[0]

    def search_many(self, queries: Sequence[str], k: int | None = None, mode: str = "hybrid",
                    filters: Filters | None = None) -> list[list[Hit]]:
        k = self.config.default_k if k is None else k
        if mode not in MODES:
            raise InputError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")
        if k <= 0:
            raise InputError(f"k must be positive, got {k}")
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise InputError("empty query")
        allowed = self.allowed(filters)
        ranked = self.rank_many(queries, k, mode, allowed)
        return self.hits(ranked, allowed)

    def rank_many(self, queries: Sequence[str], k: int, mode: str, allowed: np.ndarray | None
                  ) -> list[list[tuple[int, float]]]:
        """(rowid, score) lists, best first; no store access."""
        depth = max(k, self.config.candidates) if mode == "hybrid" else k
        sparse, dense = self.component_rankings(queries, depth, allowed, mode=mode)
        return [self.fuse(s, d, k, mode) for s, d in zip(sparse, dense, strict=True)]

    def component_rankings(self, queries: Sequence[str], depth: int, allowed: np.ndarray | None, *,
                           mode: str = "hybrid", query_vectors: np.ndarray | None = None
                           ) -> tuple[list[list[tuple[int, float]] | None], list[list[tuple[int, float]] | None]]:
        """Per query, the BM25 and the dense ranking at `depth` (None for a retriever `mode` leaves out).

        The pipeline computes these once per question (the gate's query features read them) and fuses them
        later with `fuse`; `query_vectors` lets it pass the embedding it already has."""
        n = len(queries)
        sparse: list = [self.bm25.search(q, depth, allowed) for q in queries] if mode != "dense" else [None] * n
        dense: list = [None] * n
        if mode != "bm25":
            vectors = self.embedder.encode(list(queries)) if query_vectors is None else query_vectors
            dense = self.dense.search(vectors, depth, allowed)
        return sparse, dense

    def fuse(self, sparse: list[tuple[int, float]] | None, dense: list[tuple[int, float]] | None, k: int,
             mode: str) -> list[tuple[int, float]]:
        """The top k of one query for `mode`: a single retriever's ranking, or RRF of both (hybrid)."""
        if mode == "bm25":
            return sparse[:k]
        if mode == "dense":
            return dense[:k]
        weights = (self.config.weight_bm25, self.config.weight_dense)
        return reciprocal_rank_fusion([[r for r, _ in sparse], [r for r, _ in dense]], weights,
                                      self.config.rrf_k)[:k]

    def hits(self, ranked: list[list[tuple[int, float]]], allowed: np.ndarray | None = None) -> list[list[Hit]]:
        entries = self._entries({r for ranking in ranked for r, _ in ranking})
        allowed_set = set(allowed.tolist()) if allowed is not None else None
        out = []
        for ranking in ranked:
            hits = []
            for rowid, score in ranking:
                entry = entries.get(rowid)
                # Belt and braces: the filter already ran inside BM25/FAISS; a passage outside it (or
                # one retired by a later build) must still never come back.
                if entry is None or (allowed_set is not None and rowid not in allowed_set):
                    continue
                p, meta = entry
                # a fresh dict per hit: callers may change a hit's metadata, never the cached one
                hits.append(Hit(id=p.id, title=p.title, contents=p.contents, score=score, metadata=dict(meta)))
            out.append(hits)
        return out

    def document_passages(self, doc_id: str, filters: Filters | None = None) -> list[Hit]:
        """A document's passages in order, those the filters allow (none: the caller may not see it)."""
        rowids = self.store.document_rowids(doc_id, self.generation)
        allowed = self.allowed(filters)
        return self.hits([[(r, 0.0) for r in rowids]], allowed)[0]

    def passages(self, rowids: set[int]) -> dict[int, StoredPassage]:
        """Stored passages by rowid, from the in-memory LRU where possible."""
        return {r: p for r, (p, _) in self._entries(rowids).items()}

    def _entries(self, rowids: set[int]) -> dict[int, tuple[StoredPassage, dict]]:
        """(passage, its hit metadata) by rowid. The metadata (the passage's own plus doc_id/start/end) is
        built once per passage, when it enters the LRU, not once per hit."""
        found, missing = {}, []
        cache = self._passages
        for r in rowids:
            entry = cache.get(r)
            if entry is None:
                missing.append(r)
            else:
                cache.move_to_end(r)
                found[r] = entry
        if missing:
            for r, p in self.store.get(sorted(missing)).items():
                meta = dict(p.metadata)
                meta.update(doc_id=p.doc_id, start=p.start, end=p.end)
                found[r] = cache[r] = (p, meta)
            while len(cache) > PASSAGE_CACHE:
                cache.popitem(last=False)
        return found

    def close(self) -> None:
        self.store.close()
