"""Building and updating an index directory, safely.

A build writes generation G+1 beside the committed generation G and commits by rewriting the manifest:
1. roll back the leftovers of any build that died before its commit;
2. upsert passages (new rows for new/changed text, old rows retired) and apply deletions;
3. embed only text whose (content hash, embedder) has no cached vector, committing batch by batch, so a
   rerun after a kill resumes where the embedder stopped;
4. write BM25 and FAISS files under generation-specific names;
5. write the manifest atomically (the commit), then remove the previous generation's files.
Temporary files a killed build left behind are removed when the next build starts.
Killing the process anywhere before 5 leaves generation G readable and intact.

Every document is validated first (`validate_document`: ids without '#', valid Unicode, JSON metadata),
so passage ids are unique by construction. Cached vectors are verified against their checksums before
FAISS sees them; a bad one is re-embedded and counted in `BuildReport.reembedded`.
"""

from __future__ import annotations

import collections
import fcntl
import functools
import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from expertrag.data.config import ChunkingConfig
from expertrag.data.readers import validate_document
from expertrag.data.types import Document, Passage
from expertrag.errors import ExpertRAGError, IndexFormatError, InputError
from expertrag.fileio import atomic_path, commit_dir
from expertrag.peak_rss import peak_rss_mb
from expertrag.retrieval.bm25_stream import write_bm25
from expertrag.retrieval.config import RetrievalConfig
from expertrag.retrieval.dense import DenseIndex
from expertrag.retrieval.embedder import (
    Embedder,
    check_backend_compatible,
    embedder_identity,
    embedder_path,
    passage_text,
    query_backend,
)
from expertrag.retrieval.index import STORE_FILE, bm25_dirname, dense_filename
from expertrag.store.docstore import DocStore, UpsertCounts
from expertrag.store.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    read_manifest,
    sha256_file,
    write_manifest,
)

DOCS_PER_TRANSACTION = 500
EMBED_COMMIT_ROWS = 512

# The two pluggable steps (the Ray build, retrieval/ray_build.py, supplies both; None = in this process).
# A chunker maps validated documents to their passages, in document order, each document's passages in
# chunk order. An encoder gets the build's Embedder (name, batch size and backend resolved against the
# index; its model is not loaded) and blocks of passage texts, and gives one float32 array per block.
Chunker = Callable[[Iterable[Document]], Iterable[Passage]]
BlockEncoder = Callable[[Embedder, Iterable[list[str]]], Iterator]


@dataclass
class BuildReport:
    index_dir: str
    generation: int
    passages: int
    documents: int
    counts: dict[str, int] = field(default_factory=dict)
    deleted: int = 0  # ids given to delete that matched something
    missing_deletes: list[str] = field(default_factory=list)
    removed_by_id: dict[str, list[str]] = field(default_factory=dict)  # delete id -> passage ids it removed
    deleted_passages: int = 0
    embedded: int = 0
    reembedded: int = 0  # cached vectors that failed verification and were computed again
    rolled_back: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    # the process's peak RSS (MB) at the end of each phase: which phase raised the high-water mark
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    # the peak RSS (MB) of each worker process that embedded for this build (index --ray); empty in process
    worker_peak_rss_mb: list[float] = field(default_factory=list)

    @property
    def passages_per_s(self) -> float:
        return self.passages / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["passages_per_s"] = self.passages_per_s
        return d


class _BuildLock:
    """One writer per index directory; a second concurrent build fails fast with a clear message."""

    def __init__(self, directory: Path):
        self.path = directory / ".build.lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ExpertRAGError(f"{self.path.parent}: another build is running on this index") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        return False


@functools.lru_cache(maxsize=4)
def load_chunk_tokenizer(embedder_name: str):
    """The embedder's own tokenizer bounds passage length, so a passage never exceeds what it embeds.
    Loaded once per process (a long-lived process builds many times)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedder_path(embedder_name)))


@functools.lru_cache(maxsize=4)
def _embedder(name: str, batch_size: int, backend: str = "torch") -> Embedder:
    """One loaded embedder per (name, batch size, backend) per process."""
    return Embedder(name, batch_size, backend)


def build_index(out_dir: str | Path, documents: Iterable[Document], *,
                retrieval: RetrievalConfig | None = None, chunking: ChunkingConfig | None = None,
                delete_ids: Sequence[str] = (), sources: Sequence[str] = (), progress: bool | None = None,
                missing_ok: bool = True, on_progress: Callable[[str, int, int | None], None] | None = None,
                chunker: Chunker | None = None, encoder: BlockEncoder | None = None) -> BuildReport:
    """Add/update `documents` in the index at `out_dir` (created if absent) and delete `delete_ids`.

    progress: True/False forces bars on/off; None shows them only on a terminal.
    on_progress(phase, done, total): called as the store and embed phases advance (total None while the
    number of documents is unknown), for a caller that shows progress of a build it runs elsewhere.
    missing_ok=False: a delete id that matches nothing is an InputError and the build changes nothing.
    chunker/encoder: replace the in-process chunking and embedding (see `Chunker`, `BlockEncoder`); they
    must give what the in-process steps give, since everything after them (store, cache, BM25, FAISS,
    manifest, commit) is this function's own."""
    from expertrag.data.chunking import chunk_documents

    retrieval = retrieval or RetrievalConfig()
    chunking = chunking or ChunkingConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a directory; an index is a directory", path=out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the index directory: {e.strerror or e}", path=out) from None
    started = time.perf_counter()
    timings: dict[str, float] = {}
    rss: dict[str, float] = {"start": _peak_rss_mb()}
    disable = None if progress is None else not progress

    with _BuildLock(out):
        previous = read_manifest(out) if (out / MANIFEST).exists() else None
        if previous is not None and previous.embedder != retrieval.embedder:
            raise IndexFormatError(
                f"{out}: index was built with embedder {previous.embedder!r}, not {retrieval.embedder!r}; "
                "use a new --out directory to change embedders"
            )
        built_backend = previous.extra.get("embed_backend") if previous else None
        backend = query_backend(retrieval.embed_backend, built_backend) if previous else retrieval.embed_backend
        if previous is not None:
            check_backend_compatible(built_backend or "torch", backend, str(out))
        committed = previous.generation if previous else 0
        gen = committed + 1
        _remove_stale_temporaries(out)
        store = DocStore(out / STORE_FILE, create=True)
        try:
            rolled_back = store.rollback_uncommitted(committed)

            # 2. passages
            t = time.perf_counter()
            counts = UpsertCounts()
            validated = (validate_document(d) for d in documents)
            if chunker is None:
                passages = chunk_documents(validated, chunking, load_chunk_tokenizer(retrieval.embedder))
            else:
                passages = iter(chunker(validated))
            by_doc = itertools.groupby(passages, key=lambda p: p.doc_id)
            bar = tqdm(desc="store", unit="doc", disable=disable)
            docs_done = 0
            while True:
                # groupby's groups die when it advances: materialise each document's passages
                block = [(d, list(ps)) for d, ps in itertools.islice(by_doc, DOCS_PER_TRANSACTION)]
                if not block:
                    break
                with store.transaction():
                    for doc_id, doc_passages in block:
                        store.upsert_document(doc_id, doc_passages, gen, counts)
                bar.update(len(block))
                docs_done += len(block)  # tqdm's own count stands still when the bar is disabled
                if on_progress is not None:
                    on_progress("store", docs_done, None)
            bar.close()
            missing: list[str] = []
            removed: dict[str, list[tuple[str, str]]] = {}
            if delete_ids:
                with store.transaction():
                    removed = store.delete_ids(delete_ids, gen)
                    missing = [i for i, r in removed.items() if not r]
                    if missing and not missing_ok:  # rolls the deletions back; the build commits nothing
                        shown = ", ".join(repr(m) for m in missing[:10])
                        raise InputError(f"not in the index: {shown}"
                                         + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
                                         + "; nothing was deleted", path=out)
            timings["store_s"] = time.perf_counter() - t
            rss["store"] = _peak_rss_mb()

            # 3. embeddings for new text only
            t = time.perf_counter()
            embedder = _embedder(retrieval.embedder, retrieval.embed_batch_size, backend)
            # cached vectors are keyed by model and vector family (int8 apart from fp32), see Embedder.cache_key;
            # they are verified, never trusted: a bad one is dropped and embedded again
            bad = store.bad_embeddings(gen, embedder.cache_key, previous.embedding_dim if previous else None)
            if bad:
                store.drop_embeddings(bad, embedder.cache_key)
            n_todo = store.count_missing_embeddings(gen, embedder.cache_key)
            # read lazily, page by page (no list of every hash: at 1M passages that alone was ~120 MB): an
            # encoder takes a block's texts, embeds them and hands the vectors back before it reads far ahead
            # (in-process: one block; Ray: a few in flight), and each block is committed below before the
            # next is waited for, so a rerun after a kill resumes from the cache
            text_blocks = _TodoBlocks(store, gen, embedder.cache_key, EMBED_COMMIT_ROWS, n_todo)
            encode = encoder or (lambda emb, blocks: (emb.encode(texts) for texts in blocks))
            dim_seen, embedded = None, 0
            bar = tqdm(total=n_todo, desc="embed", unit="passage", disable=disable)
            for vectors in encode(embedder, text_blocks):
                hashes = text_blocks.pop_read()
                if len(vectors) != len(hashes):
                    raise ExpertRAGError(f"{out}: internal mismatch: {len(hashes)} texts, {len(vectors)} vectors")
                store.put_embeddings(hashes, vectors, embedder.cache_key)
                dim_seen = int(vectors.shape[1])
                bar.update(len(hashes))
                embedded += len(hashes)
                if on_progress is not None:
                    on_progress("embed", embedded, n_todo)
            if text_blocks.unanswered() or embedded != n_todo:
                raise ExpertRAGError(f"{out}: internal mismatch: {n_todo} texts to embed, {embedded} vectors")
            bar.close()
            if n_todo:
                embedder.release_memory()
            timings["embed_s"] = time.perf_counter() - t
            rss["embed"] = _peak_rss_mb()
            # the vectors' own width where there were any: a plugged-in encoder never loads the model here
            dim = dim_seen or (previous.embedding_dim if previous is not None else embedder.dim)

            # 4. sparse and dense indexes, under this generation's names
            t = time.perf_counter()
            bm25_dir = out / bm25_dirname(gen)
            tmp_dir = out / (bm25_dirname(gen) + ".tmp")
            shutil.rmtree(tmp_dir, ignore_errors=True)
            shutil.rmtree(bm25_dir, ignore_errors=True)
            # streamed from the store (bm25_stream.py): memory bounded by the vocabulary and one block of
            # postings, not the corpus (bm25s's own index() held every passage's tokens: ~1.1 GB at 1M)
            n_bm25 = write_bm25(
                ([(r, passage_text(ti, c)) for r, ti, c in batch] for batch in store.iter_live_texts(gen)),
                tmp_dir, k1=retrieval.bm25_k1, b=retrieval.bm25_b, stem=retrieval.bm25_stemmer,
            )
            commit_dir(tmp_dir, bm25_dir)
            timings["bm25_s"] = time.perf_counter() - t
            rss["bm25"] = _peak_rss_mb()

            t = time.perf_counter()
            n_live = store.count_live(gen)
            train = None
            if retrieval.dense_index in ("ivf", "ivfpq"):
                # a sample over the whole corpus, bounded by ivf_train_size, read before the vectors stream in
                train = store.sample_live_vectors(gen, embedder.cache_key, dim, retrieval.ivf_train_size)
            dense = DenseIndex.build(
                store.iter_live_vectors(gen, embedder.cache_key, dim), dim, retrieval.dense_index,
                nlist=retrieval.ivf_nlist, hnsw_m=retrieval.hnsw_m, total=n_live, pq_m=retrieval.ivf_pq_m,
                train=train,
            )
            del train
            if len(dense) != n_live or n_bm25 != n_live:
                raise ExpertRAGError(
                    f"{out}: internal mismatch: {n_live} passages, {n_bm25} in BM25, {len(dense)} vectors"
                )
            dense_path = out / dense_filename(gen)
            with atomic_path(dense_path) as tmp_path:
                dense.save(tmp_path)
            timings["dense_s"] = time.perf_counter() - t
            rss["dense"] = _peak_rss_mb()

            # 5. commit
            files = {str(p.relative_to(out)): sha256_file(p) for p in sorted(bm25_dir.iterdir())}
            files[dense_path.name] = sha256_file(dense_path)
            documents_live = store.conn.execute(
                "SELECT COUNT(DISTINCT doc_id) FROM passages WHERE added_gen <= ? AND "
                "(retired_gen IS NULL OR retired_gen > ?)", (gen, gen)).fetchone()[0]
            now = datetime.now(UTC).isoformat(timespec="seconds")
            manifest = Manifest(
                format_version=FORMAT_VERSION, generation=gen, embedder=embedder.name, embedding_dim=dim,
                dense_index=retrieval.dense_index, passages=n_live, documents=documents_live, files=files,
                bm25_dir=bm25_dir.name, dense_file=dense_path.name,
                sources=sorted(set(previous.sources if previous else []) | set(sources)),
                created_at=previous.created_at if previous else now, updated_at=now,
                extra={"bm25_stemmer": retrieval.bm25_stemmer, "chunking": chunking.model_dump(),
                       "embed_backend": embedder.backend},
            )
            identity = embedder_identity(embedder.name)
            if identity is not None:  # a local folder: Index refuses query vectors from other weights
                manifest.extra["embedder_identity"] = identity
            write_manifest(out, manifest)

            # after the commit: nothing below can lose data
            _remove_old_generations(out, keep=gen)
            store.purge_retired(gen)
        finally:
            store.close()

    seconds = time.perf_counter() - started
    return BuildReport(
        index_dir=str(out), generation=gen, passages=n_live, documents=documents_live, counts=counts.as_dict(),
        deleted=len(removed) - len(missing), missing_deletes=missing,
        removed_by_id={i: [pid for pid, _ in r] for i, r in removed.items()},
        deleted_passages=sum(len(r) for r in removed.values()), embedded=embedded, reembedded=len(bad),
        rolled_back=rolled_back, seconds=seconds, timings=timings, peak_rss_mb=rss,
    )


class _TodoBlocks:
    """Blocks of `rows` distinct texts still without a cached vector, read from the store page by page
    only when iterated to (an encoder that reads ahead holds a few blocks, never the whole todo list).
    Sized (how many blocks), so an encoder knows the number of shards without reading them. The builder
    takes each block's hashes back with `pop_read` in the order the blocks were read. A hash already in a
    block read but not yet committed is not read again (a text shared by several passages is embedded once)."""

    def __init__(self, store: DocStore, gen: int, model: str, rows: int, total: int):
        self.store, self.gen, self.model, self.rows, self.total = store, gen, model, rows, total
        self._read: collections.deque[list[str]] = collections.deque()
        self._in_flight: set[str] = set()

    def __len__(self) -> int:
        return -(-self.total // self.rows)

    def __iter__(self) -> Iterator[list[str]]:
        after, hashes, texts = 0, [], []
        while True:
            page = self.store.missing_embeddings_page(self.gen, self.model, after, self.rows)
            # the page is a snapshot: a hash handed out before it was read (in flight now, or in the block
            # being filled) may be committed, and leave the in-flight set, while the page is still being
            # walked; the page still lists it. So every hash out when the page was read counts as seen,
            # with those this page adds (a block spanning two pages once embedded a text twice).
            seen: set[str] = set(self._in_flight)
            for rowid, h, title, body in page:
                after = rowid
                if h in self._in_flight or h in seen:
                    continue
                seen.add(h)
                self._in_flight.add(h)
                hashes.append(h)
                texts.append(passage_text(title, body))
                if len(hashes) == self.rows:
                    self._read.append(hashes)
                    yield texts
                    hashes, texts = [], []
            if len(page) < self.rows:
                break
        if hashes:
            self._read.append(hashes)
            yield texts

    def pop_read(self) -> list[str]:
        """The hashes of the oldest block handed out and not yet taken back (now committed by the caller)."""
        if not self._read:
            raise ExpertRAGError("internal mismatch: the encoder gave more blocks than it was given")
        hashes = self._read.popleft()
        self._in_flight.difference_update(hashes)
        return hashes

    def unanswered(self) -> int:
        return len(self._read)


def _peak_rss_mb() -> float:
    """This process's peak resident set so far (its own, not a parent's carried over the exec)."""
    return round(peak_rss_mb() or 0.0, 1)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a build that was killed (`atomic_path`'s `.NAME.XXXX.tmp`, the BM25 folder and
    FAISS file written before their rename). Only the lock holder writes here, so none is in use."""
    for path in out.iterdir():
        name = path.name
        if not name.endswith(".tmp"):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _remove_old_generations(out: Path, keep: int) -> None:
    for path in out.iterdir():
        name = path.name
        if not (name.startswith("bm25-") or name.startswith("dense-")):
            continue
        if name in (bm25_dirname(keep), dense_filename(keep)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
