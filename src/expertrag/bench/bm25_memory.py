"""Peak memory and time of the two BM25 builds at 100k-1M passages: bm25s's in-memory index (the reference,
what `build_index` used before) against our streamed build (`retrieval/bm25_stream.py`).

Same corpus as `bench scale` (`write_derived_corpus`: real sentences of the shared corpora, then copies with
distinct ids and titles). Each build runs in its own fresh process, which streams the corpus file in
batches of 4,096 passages (as `build_index` streams them from the store) and saves the index; its peak RSS is
the kernel's high-water mark for it (`os.wait4`). A third process per size only reads the corpus the same way
(no BM25): the floor both builds share. Then both saved indexes answer the same questions, in a fourth
process, and their hits are compared (same passages in the same order, scores within float32 rounding).
The parent stays small on purpose: a child's peak RSS as the kernel reports it starts at the parent's size
at spawn time.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from expertrag.bench.scale import QUESTIONS, _run_child, write_derived_corpus
from expertrag.errors import InputError

BATCH = 4096
K1, B = 1.5, 0.75  # RetrievalConfig's defaults


def _batches(corpus: str) -> Iterator[list[tuple[int, str]]]:
    from expertrag.retrieval.embedder import passage_text

    batch: list[tuple[int, str]] = []
    with open(corpus, encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            batch.append((i, passage_text(row["title"], row["contents"])))
            if len(batch) == BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def _child(mode: str, corpus: str, out: str) -> None:
    t = time.perf_counter()
    if mode == "read":
        n = sum(len(b) for b in _batches(corpus))
    elif mode == "memory":
        from expertrag.retrieval.bm25 import BM25Index

        index = BM25Index.build(_batches(corpus), k1=K1, b=B, stem=True)
        index.save(Path(out))
        n = len(index)
    elif mode == "stream":
        from expertrag.retrieval.bm25_stream import write_bm25

        n = write_bm25(_batches(corpus), Path(out), k1=K1, b=B, stem=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps({"passages": n, "s": round(time.perf_counter() - t, 1)}))


def _child_compare(memory_dir: str, stream_dir: str, questions_path: str, n: int) -> None:
    from expertrag.data.questions import load_questions

    questions = [q.question for q in load_questions(Path(questions_path))][:n]
    print(json.dumps(compare(Path(memory_dir), Path(stream_dir), questions)))


def compare(memory_dir: Path, stream_dir: Path, questions: list[str], k: int = 10) -> dict:
    """How many questions get the same top-k passages, in the same order, from both indexes."""
    from expertrag.retrieval.bm25 import BM25Index

    a, b = BM25Index.load(memory_dir, stem=True), BM25Index.load(stream_dir, stem=True)
    same, worst = 0, 0.0
    for q in questions:
        ha, hb = a.search(q, k), b.search(q, k)
        if [r for r, _ in ha] == [r for r, _ in hb]:
            same += 1
            if ha:
                sa, sb = np.array([s for _, s in ha]), np.array([s for _, s in hb])
                worst = max(worst, float(np.max(np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-9))))
    return {"questions": len(questions), "same_top_k": same, "k": k, "max_rel_score_diff": worst}


def run(data: Path, sizes: list[int], *, work: Path, queries: int = 200, timeout_s: float = 3600,
        progress: bool = True) -> dict:
    questions_path = data / "questions" / QUESTIONS
    if not questions_path.is_file():
        raise InputError(f"{questions_path}: not found; pass the shared data folder (e.g. ../shared/data)")
    work.mkdir(parents=True, exist_ok=True)
    module = "expertrag.bench.bm25_memory"
    rows = []
    for n in sizes:
        corpus = work / f"bm25-corpus-{n}.jsonl"
        made = write_derived_corpus(data, n, corpus)
        row: dict = {"passages": made["passages"], "load_before": os.getloadavg()[0]}
        for mode in ("read", "memory", "stream"):
            out = work / f"bm25-{mode}-{n}"
            if out.exists():
                raise InputError(f"{out}: exists; remove it or give another --work folder", path=out)
            report, wall, rss = _run_child([mode, str(corpus), str(out)], 1, timeout_s, module=module)
            row[mode] = {"s": report["s"], "wall_s": round(wall, 1), "peak_rss_mb": round(rss, 1)}
            if mode != "read":
                row[mode]["disk_mb"] = round(sum(p.stat().st_size for p in out.iterdir()) / 2**20, 1)
            if progress:
                print(f"[{time.strftime('%H:%M:%S')}] {n} {mode}: {report['s']} s, peak RSS {rss:.0f} MB",
                      file=sys.stderr, flush=True)
        floor = row["read"]["peak_rss_mb"]
        for mode in ("memory", "stream"):
            row[mode]["above_read_mb"] = round(row[mode]["peak_rss_mb"] - floor, 1)
        row["stream_over_memory"] = {
            "peak_rss": round(row["stream"]["peak_rss_mb"] / row["memory"]["peak_rss_mb"], 3),
            "above_read": round(row["stream"]["above_read_mb"] / max(row["memory"]["above_read_mb"], 1e-9), 3),
            "time": round(row["stream"]["s"] / row["memory"]["s"], 3)}
        # in a child too: a child's peak RSS starts at this process's (the kernel counts the parent's pages it
        # was spawned from), so this process must stay small
        row["agreement"], _, _ = _run_child(["compare", str(work / f"bm25-memory-{n}"), str(work / f"bm25-stream-{n}"),
                                             str(questions_path), str(queries)], 1, timeout_s, module=module)
        row["load_after"] = os.getloadavg()[0]
        rows.append(row)
        corpus.unlink()
        for mode in ("memory", "stream"):
            shutil.rmtree(work / f"bm25-{mode}-{n}", ignore_errors=True)
    return {"sizes": rows, "threads": 1, "batch": BATCH, "questions": QUESTIONS}


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        _child_compare(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        _child(*sys.argv[1:4])
