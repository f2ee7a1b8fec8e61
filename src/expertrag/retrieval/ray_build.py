"""Index builds with chunking and embedding on Ray Data (`expertrag index --ray`, issue 17).

Only the two expensive, embarrassingly parallel steps leave the driver: chunking (documents -> passages)
and embedding (passage texts -> vectors), each a `map_batches` over a callable class, so every actor loads
its tokenizer or embedder once and works on whole batches. Everything else is `build_index`'s own code,
plugged in through its `chunker` and `encoder` parameters: reading and validating the corpus (the same
readers, so skip/strict/duplicate-id rules are unchanged), the store upsert, the embedding cache (only
passages without a cached vector are sent to Ray, so incremental updates work as before), BM25 with
corpus-wide statistics, FAISS, the manifest and the atomic commit. Results are gathered by row number, so
the order never depends on which actor finished first.

What this part does not do yet: a build killed during the Ray embedding step loses that step's vectors
(they are committed to the store only once all have come back), and the documents and todo texts are held
in the driver's memory while Ray works on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from expertrag.data.config import ChunkingConfig
from expertrag.data.types import Document, Passage
from expertrag.errors import ExpertRAGError, InputError
from expertrag.retrieval.config import RetrievalConfig

INSTALL_HINT = "pip install -e '.[ray]'"
ENCODE_ROWS_PER_CALL = 256  # texts per actor call; the embedder batches them again by its own batch size
CHUNK_DOCS_PER_CALL = 256


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the [data] extra: pyarrow, pandas)
    except ImportError as e:
        raise ExpertRAGError(f"--ray needs Ray Data, which is not installed ({e.name}): {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to the cluster at `address` ("auto" or HOST:PORT), or start a local one on loopback with
    `num_cpus` CPUs; shut down at the end what this call started. A Ray session the caller already opened
    (a test fixture, a notebook) is used as is and left running."""
    ray = require_ray()
    if ray.is_initialized():
        _quiet_ray_data()
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from a build
    kwargs = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
    except ConnectionError as e:
        raise InputError(f"--address {address}: cannot connect to a Ray cluster: {e}") from None
    _quiet_ray_data()
    try:
        yield
    finally:
        ray.shutdown()


def _quiet_ray_data() -> None:
    """Ray Data logs a progress block every few seconds; a build's own report is what a user reads."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _doc_to_json(doc: Document) -> str:
    return json.dumps(dataclasses.asdict(doc), ensure_ascii=False)


def _passage_from_json(text: str) -> Passage:
    return Passage(**json.loads(text))


class _ChunkActor:
    """One fast tokenizer per actor; chunks a batch of documents with the builder's own chunking code."""

    def __init__(self, embedder: str, chunking: dict):
        from expertrag.retrieval.builder import load_chunk_tokenizer

        self.tokenizer = load_chunk_tokenizer(embedder)
        self.cfg = ChunkingConfig.model_validate(chunking)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from expertrag.data.chunking import chunk_documents

        docs = [Document(**json.loads(str(d))) for d in batch["doc"]]
        row_of = {d.id: int(i) for d, i in zip(docs, batch["i"], strict=True)}  # ids are unique (validated)
        rows, orders, out = [], [], []
        for j, p in enumerate(chunk_documents(docs, self.cfg, self.tokenizer)):
            rows.append(row_of[p.doc_id])
            orders.append(j)
            out.append(json.dumps(dataclasses.asdict(p), ensure_ascii=False))
        return {"i": np.asarray(rows, dtype=np.int64), "j": np.asarray(orders, dtype=np.int64),
                "passage": np.asarray(out, dtype=object)}


class _EncodeActor:
    """One embedder per actor, loaded once, with `threads` intra-op threads (a worker owns its CPUs)."""

    def __init__(self, name: str, batch_size: int, backend: str, threads: int):
        import torch

        from expertrag.retrieval.embedder import Embedder

        torch.set_num_threads(threads)
        self.embedder = Embedder(name, batch_size, backend)
        self.embedder.encode(["warm-up"])  # load now, not inside the first batch's timing

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.embedder.encode([str(t) for t in batch["text"]])
        return {"i": batch["i"], "vector": vectors}


class RayBuild:
    """The `chunker` and `encoder` for `build_index`, running on the current Ray session."""

    def __init__(self, retrieval: RetrievalConfig, chunking: ChunkingConfig, num_workers: int = 2,
                 threads_per_worker: int = 1):
        if num_workers < 1:
            raise InputError(f"--num-workers must be at least 1, got {num_workers}")
        if threads_per_worker < 1:
            raise InputError(f"threads per worker must be at least 1, got {threads_per_worker}")
        self.retrieval = retrieval
        self.chunking = chunking
        self.num_workers = num_workers
        self.threads = threads_per_worker

    def _blocks(self, n_rows: int, rows_per_call: int) -> int:
        # enough blocks that every worker gets several (load balance), never an empty one
        return max(1, min(n_rows, max(self.num_workers * 4, -(-n_rows // rows_per_call))))

    def chunker(self, documents: Iterable[Document]) -> Iterator[Passage]:
        import ray.data

        docs = [{"i": i, "doc": _doc_to_json(d)} for i, d in enumerate(documents)]
        if not docs:
            return iter(())
        blocks = self._blocks(len(docs), CHUNK_DOCS_PER_CALL)
        ds = ray.data.from_items(docs, override_num_blocks=blocks)
        ds = ds.map_batches(
            _ChunkActor, fn_constructor_kwargs={"embedder": self.retrieval.embedder,
                                                "chunking": self.chunking.model_dump()},
            # no more actors than blocks: an actor without work would still load its tokenizer
            batch_size=CHUNK_DOCS_PER_CALL, batch_format="numpy", concurrency=min(self.num_workers, blocks),
            num_cpus=1,
        )
        gathered: list[tuple[int, int, str]] = []
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            gathered.extend(zip(batch["i"].tolist(), batch["j"].tolist(), batch["passage"], strict=True))
        gathered.sort(key=lambda r: (r[0], r[1]))  # input order, whichever actor finished first
        return (_passage_from_json(str(p)) for _, _, p in gathered)

    def encoder(self, embedder, blocks: Iterable[list[str]]) -> Iterator[np.ndarray]:
        import ray.data

        blocks = list(blocks)
        texts = [t for block in blocks for t in block]
        if not texts:
            return iter([np.zeros((0, 0), dtype=np.float32) for _ in blocks])
        n_blocks = self._blocks(len(texts), ENCODE_ROWS_PER_CALL)
        ds = ray.data.from_items([{"i": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=n_blocks)
        # the builder's embedder: its backend is already resolved against an existing index's vectors
        ds = ds.map_batches(
            _EncodeActor, fn_constructor_kwargs={"name": embedder.name, "batch_size": embedder.batch_size,
                                                 "backend": embedder.backend, "threads": self.threads},
            batch_size=ENCODE_ROWS_PER_CALL, batch_format="numpy", concurrency=min(self.num_workers, n_blocks),
            num_cpus=self.threads,
        )
        vectors: np.ndarray | None = None
        seen = np.zeros(len(texts), dtype=bool)
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            v = np.asarray(batch["vector"], dtype=np.float32)
            if vectors is None:
                vectors = np.empty((len(texts), v.shape[1]), dtype=np.float32)
            vectors[batch["i"]] = v
            seen[batch["i"]] = True
        if vectors is None or not seen.all():
            raise ExpertRAGError(f"Ray embedding returned {int(seen.sum())} of {len(texts)} vectors")
        out, start = [], 0
        for block in blocks:
            out.append(vectors[start:start + len(block)])
            start += len(block)
        return iter(out)


def build_index_on_ray(out_dir: str | Path, documents: Iterable[Document], *,
                       retrieval: RetrievalConfig | None = None, chunking: ChunkingConfig | None = None,
                       sources=(), progress: bool | None = None, address: str | None = None,
                       num_workers: int = 2, threads_per_worker: int = 1):
    """`build_index` with chunking and embedding on Ray: same index directory, same passages and vectors.
    Without `address` a local cluster of num_workers * threads_per_worker CPUs is started and stopped."""
    from expertrag.retrieval.builder import build_index

    retrieval = retrieval or RetrievalConfig()
    chunking = chunking or ChunkingConfig()
    plan = RayBuild(retrieval, chunking, num_workers, threads_per_worker)
    with ray_session(address, num_cpus=num_workers * threads_per_worker):
        return build_index(out_dir, documents, retrieval=retrieval, chunking=chunking, sources=sources,
                           progress=progress, chunker=plan.chunker, encoder=plan.encoder)
