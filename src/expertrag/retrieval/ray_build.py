"""Index builds with chunking and embedding on Ray (`expertrag index --ray`, issue 17).

Only the two expensive, embarrassingly parallel steps leave the driver: chunking (documents -> passages,
a Ray Data `map_batches` over a callable class, so every actor loads its tokenizer once) and embedding
(passage texts -> vectors, on a pool of embedder actors, each loaded once). Everything else is
`build_index`'s own code, plugged in through its `chunker` and `encoder` parameters: reading and validating
the corpus (the same readers, so skip/strict/duplicate-id rules are unchanged), the store upsert, the
embedding cache (only passages without a cached vector are sent to Ray, so incremental updates work as
before), BM25 with corpus-wide statistics, FAISS, the manifest and the atomic commit. Results are put back
in input order, so the order never depends on which actor finished first.

Resuming: the embedding step works in shards, the builder's commit blocks (`EMBED_COMMIT_ROWS` texts each).
The driver reads a shard's texts from the store only when an actor is free for it (at most
`IN_FLIGHT_PER_WORKER` shards per actor are out), and the builder commits each shard's vectors into the
store's embedding cache as soon as it and every shard before it have come back, before more are waited
for. A build that dies (a shard that fails, the driver killed, the cluster gone) leaves those shards in the
cache; the rerun's cache lookup finds them, so only the shards that were not committed are embedded again,
exactly as the single-process build resumes. What a kill loses is the shards in flight (at most
`IN_FLIGHT_PER_WORKER` x workers). A worker process that dies is restarted and its shard sent again
(`WORKER_RESTARTS` times). (An earlier design streamed the texts through one Ray Data pipeline read with
`iter_batches(preserve_order)`; it hung, and a dataset cannot hand back a shard before the ones before it.)

What this part does not do: chunking is not resumable (as without Ray, a rerun chunks and upserts again,
which is cheap next to embedding), and the chunked documents are held in the driver while Ray chunks them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from expertrag.data.config import ChunkingConfig
from expertrag.data.types import Document, Passage
from expertrag.errors import ExpertRAGError, InputError
from expertrag.retrieval.config import RetrievalConfig

INSTALL_HINT = "pip install -e '.[ray]'"
CHUNK_DOCS_PER_CALL = 256
WORKER_RESTARTS = 2  # a worker that dies is restarted (and its job retried) this many times, then the run fails
IN_FLIGHT_PER_WORKER = 2  # one job running, one queued: an actor never waits on the driver between jobs


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


class EncodeWorker:
    """One embedder per actor, loaded once, with `threads` intra-op threads (a worker owns its CPUs).
    `encode(texts)` embeds one shard. A subclass may add behaviour (the resume test's failing shard)."""

    def __init__(self, name: str, batch_size: int, backend: str, threads: int):
        import torch

        from expertrag.retrieval.embedder import Embedder

        torch.set_num_threads(threads)
        self.embedder = Embedder(name, batch_size, backend)
        self.embedder.encode(["warm-up"])  # load now, not inside the first shard's timing

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(texts)

    def peak_rss_mb(self) -> float | None:
        from expertrag.peak_rss import peak_rss_mb

        return peak_rss_mb()


def _unwrap(e: Exception) -> Exception:
    """A user error raised inside a worker, as itself (Ray wraps it with the remote traceback)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, ExpertRAGError) else e


def start_workers(cls: type, n: int, threads: int, *args: Any) -> list[Any]:
    import ray

    remote = ray.remote(num_cpus=threads, max_restarts=WORKER_RESTARTS, max_task_retries=WORKER_RESTARTS)(cls)
    return [remote.remote(*args) for _ in range(n)]


def ordered_results(actors: Sequence[Any], method: str, jobs: Iterable[Any]) -> Iterator[Any]:
    """Yield `getattr(actor, method).remote(job)` for every job, in job order, whichever actor did it:
    free actors take the next job (load balance across uneven jobs), finished results wait in a buffer
    until all before them are out. Jobs are taken from `jobs` only when an actor is free for them, so a
    lazy iterable is read as the work goes (at most IN_FLIGHT_PER_WORKER jobs per actor are out), and a
    result is yielded before the next one is waited for: the caller can commit it first. A worker that
    died more often than its restarts allow ends the run."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    jobs = iter(jobs)
    pending: dict[Any, tuple[int, Any]] = {}  # ref -> (job number, actor)
    done: dict[int, Any] = {}
    # slots round-robin (A, B, A, B): every actor gets its first job before any gets a second. Actor by
    # actor (A, A, B, B) gave both of a 3-shard build's full shards to one worker while the other
    # embedded the 18-row tail: `bench ray` on a quiet box showed 2 workers no faster than 1.
    idle = [a for _ in range(IN_FLIGHT_PER_WORKER) for a in actors]
    next_job, next_out, exhausted = 0, 0, False
    while True:
        while idle and not exhausted:
            job = next(jobs, _END)
            if job is _END:
                exhausted = True
                break
            actor = idle.pop(0)
            pending[getattr(actor, method).remote(job)] = (next_job, actor)
            next_job += 1
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        number, actor = pending.pop(ref)
        try:
            done[number] = ray.get(ref)
        except RayTaskError as e:
            err = _unwrap(e)
            if err is not e:
                raise err from None
            raise
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            if getattr(e, "actor_init_failed", False):  # its constructor raised: not retried, Ray keeps the text only
                lines = [x.strip() for x in str(e).splitlines() if x.strip()]
                raise ExpertRAGError(f"a Ray worker could not start: {lines[-1] if lines else e}") from None
            raise ExpertRAGError(f"a Ray worker died more than {WORKER_RESTARTS} times (last on job {number}); "
                                 f"results before it are kept: {str(e).splitlines()[0]}") from None
        idle.append(actor)
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1


_END = object()


class RayBuild:
    """The `chunker` and `encoder` for `build_index`, running on the current Ray session."""

    def __init__(self, retrieval: RetrievalConfig, chunking: ChunkingConfig, num_workers: int = 2,
                 threads_per_worker: int = 1, encode_worker: type = EncodeWorker):
        if num_workers < 1:
            raise InputError(f"--num-workers must be at least 1, got {num_workers}")
        if threads_per_worker < 1:
            raise InputError(f"threads per worker must be at least 1, got {threads_per_worker}")
        self.retrieval = retrieval
        self.chunking = chunking
        self.num_workers = num_workers
        self.threads = threads_per_worker
        self.encode_worker = encode_worker
        # each embedding worker's peak RSS (MB), read just before the workers are stopped
        self.worker_peak_rss_mb: list[float] = []

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
        """One shard per block, in block order, as each comes back (see the module docstring: the builder
        commits each before the next is waited for, which is what makes a rerun resume)."""
        from ray.exceptions import RayTaskError

        # the builder's blocks know their number (they are read lazily); no more actors than shards: an
        # actor without work would still load its embedder
        n = max(1, min(self.num_workers, len(blocks))) if hasattr(blocks, "__len__") else self.num_workers
        blocks = iter(blocks)
        first = next(blocks, None)
        if first is None:
            return
        # the builder's embedder: its backend is already resolved against an existing index's vectors
        actors = start_workers(self.encode_worker, n, self.threads, embedder.name, embedder.batch_size,
                               embedder.backend, self.threads)
        shard = 0
        try:
            for vectors in ordered_results(actors, "encode", itertools.chain([first], blocks)):
                yield np.asarray(vectors, dtype=np.float32)
                shard += 1
        except RayTaskError as e:  # a Python error in a worker (not a user error): one line, not Ray's traceback
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            raise ExpertRAGError(f"embedding shard {shard} failed on a Ray worker ({lines[-1] if lines else e}); "
                                 f"the {shard} shards before it are saved: run the same command again to "
                                 "resume") from None
        finally:
            import ray

            self.worker_peak_rss_mb = _worker_peaks(actors)
            for a in actors:
                ray.kill(a)


def _worker_peaks(actors: Sequence[Any]) -> list[float]:
    """Each live actor's peak RSS; a dead or hung one is left out (a figure, never a reason to fail)."""
    import ray

    peaks = []
    for a in actors:
        try:
            mb = ray.get(a.peak_rss_mb.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - a worker that died or hangs has no figure
            continue
        if mb is not None:
            peaks.append(round(mb, 1))
    return peaks


def build_index_on_ray(out_dir: str | Path, documents: Iterable[Document], *,
                       retrieval: RetrievalConfig | None = None, chunking: ChunkingConfig | None = None,
                       sources=(), progress: bool | None = None, address: str | None = None,
                       num_workers: int = 2, threads_per_worker: int = 1, encode_worker: type = EncodeWorker):
    """`build_index` with chunking and embedding on Ray: same index directory, same passages and vectors.
    Without `address` a local cluster of num_workers * threads_per_worker CPUs is started and stopped.
    A build that stops half way (a failing shard, a kill) resumes on the next run: see the module docstring."""
    from expertrag.retrieval.builder import build_index

    retrieval = retrieval or RetrievalConfig()
    chunking = chunking or ChunkingConfig()
    plan = RayBuild(retrieval, chunking, num_workers, threads_per_worker, encode_worker)
    with ray_session(address, num_cpus=num_workers * threads_per_worker):
        report = build_index(out_dir, documents, retrieval=retrieval, chunking=chunking, sources=sources,
                             progress=progress, chunker=plan.chunker, encoder=plan.encoder)
    report.worker_peak_rss_mb = plan.worker_peak_rss_mb
    return report
