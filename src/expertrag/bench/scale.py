"""Index builds at 100k-1M passages (issue 17, "Scale"): build time, size on disk, peak RSS, search latency.

The corpus is derived from the real shared corpora, in code (`write_derived_corpus`): every document of
`wiki_vital.jsonl` and `retrievalqa_passages.jsonl` is cut into sentences (one passage each); when those run
out, the same sentences come again as copies with distinct ids (`DOC-sJ-cR`) and titles ("TITLE (copy R)"),
so every copy has its own text (the title is part of the embedded and hashed text) and nothing is
deduplicated by the embedding cache. Only the copies' title suffix is invented; every sentence is real.

Vectors: computing MiniLM for 1M passages takes hours on this box (~90/s at best), so only a sample gets the
real embedder: passages whose crc32(text) % `real_period` == 0 (deterministic, about 1 in `real_period`).
Every other passage gets a stand-in (`HashedProjection`): its lower-cased word tokens (the BM25 tokenizer's
pattern, \\w\\w+) counted into 2^14 buckets by crc32 (a signed hash: a second crc32 bit picks +1/-1), that
count vector multiplied by a fixed Gaussian matrix (2^14 x 384, seed 0, N(0, 1/384)) and L2-normalised.
So texts sharing words get similar vectors (the projection keeps cosines of the bag-of-words vectors up to
~1/sqrt(384) distortion), which gives IVF lists a realistic spread; the stand-ins are not MiniLM vectors
and say nothing about retrieval quality: this bench measures cost (time, disk, memory, latency), not recall.

Each size is built in its own child process by the project's `build_index` (store, embedding cache, BM25,
IVF-PQ, manifest, commit), with the stand-in encoder plugged in through its `encoder` hook; the child's peak
RSS is the kernel's high-water mark for it (`os.wait4`). Search latency is timed in a second child on the
committed index, one query at a time through `Index.search` (what `expertrag search` runs: BM25, the query
embedded by the real embedder then IVF-PQ, hybrid = both + RRF, hits read from the store).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from expertrag.bench import build_memory
from expertrag.errors import InputError

SOURCES = ("wiki_vital.jsonl", "retrievalqa_passages.jsonl")
QUESTIONS = "nq_open_dev.jsonl"
MIN_WORDS = 5  # shorter "sentences" are mostly list debris ("See also.", "Nov. 3.")
BUCKETS = 1 << 14
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|\n+")
_WORDS = re.compile(r"(?u)\b\w\w+\b")
# the scale builds' retrieval settings: IVF-PQ with 1,024 lists and 48-byte codes, trained on 65,536 vectors
# sampled over the corpus (faiss wants >= 39 per list); nprobe 16 at search time (the package default)
SCALE_RETRIEVAL = {"dense_index": "ivfpq", "ivf_nlist": 1024, "ivf_pq_m": 48, "ivf_train_size": 65536,
                   "embed_backend": "auto"}


def parse_sizes(text: str) -> list[int]:
    return build_memory.parse_sizes(text, unit="passage", example="100000,300000")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if len(s.split()) >= MIN_WORDS]


def _base_rows(data: Path) -> Iterator[dict]:
    """One row per sentence of the source corpora, in file order (streamed: nothing is held)."""
    for name in SOURCES:
        path = data / "corpora" / name
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    doc_id, title, contents = str(doc["id"]), str(doc.get("title") or ""), str(doc["contents"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise InputError(f"unreadable corpus row ({type(e).__name__}: {e})", path=path, line=line_no) \
                        from None
                source = (doc.get("metadata") or {}).get("source", name.removesuffix(".jsonl"))
                for j, s in enumerate(sentences(contents)):
                    yield {"id": f"{doc_id}-s{j}", "title": title, "contents": s, "metadata": {"source": source}}


def write_derived_corpus(data: Path, n: int, out: Path) -> dict:
    """The first `n` rows of the derived corpus (sentences, then copies) into `out` (JSONL)."""
    for name in SOURCES:
        if not (data / "corpora" / name).is_file():
            raise InputError(f"{data / 'corpora' / name}: not found; pass the shared data folder (e.g. ../shared/data)")
    written, copy, base = 0, 0, 0
    with open(out, "w", encoding="utf-8") as sink:
        while written < n:
            before = written
            for row in _base_rows(data):
                if written >= n:
                    break
                if copy:
                    row["id"] += f"-c{copy}"
                    row["title"] = f"{row['title']} (copy {copy})"
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
            if copy == 0:
                base = written
            if written == before:
                raise InputError(f"{data}: the source corpora give no sentences")
            copy += 1
    return {"passages": written, "distinct_sentences": base, "copies": copy}


class HashedProjection:
    """The stand-in embedder (see the module docstring): signed feature hashing + a fixed Gaussian projection."""

    def __init__(self, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.matrix = (rng.standard_normal((BUCKETS, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        import scipy.sparse as sp

        rows, cols, vals = [], [], []
        for i, t in enumerate(texts):
            for w in _WORDS.findall(t.lower()):
                h = zlib.crc32(w.encode("utf-8"))
                rows.append(i)
                cols.append(h & (BUCKETS - 1))
                vals.append(1.0 if (h >> 20) & 1 else -1.0)
        x = sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(len(texts), BUCKETS))
        v = np.asarray(x @ self.matrix, dtype=np.float32)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        return v / np.where(norms > 0, norms, 1.0)


def is_real(text: str, period: int) -> bool:
    return zlib.crc32(text.encode("utf-8")) % period == 0


class SampledEncoder:
    """`build_index`'s encoder: the real embedder for the sample, the stand-in for the rest; counts both."""

    def __init__(self, period: int):
        self.period = period
        self.real = 0
        self.standin = 0
        self.real_s = 0.0
        self.projection: HashedProjection | None = None

    def __call__(self, embedder, blocks: Iterable[list[str]]) -> Iterator[np.ndarray]:
        for texts in blocks:
            pick = [i for i, t in enumerate(texts) if is_real(t, self.period)]
            if self.projection is None:
                self.projection = HashedProjection(embedder.dim)
            out = self.projection.encode(texts)
            if pick:
                t = time.perf_counter()
                out[pick] = embedder.encode([texts[i] for i in pick])
                self.real_s += time.perf_counter() - t
            self.real += len(pick)
            self.standin += len(texts) - len(pick)
            yield out


def _child_build(corpus: str, out: str, period: int) -> None:
    import torch

    from expertrag.data.readers import iter_documents
    from expertrag.retrieval.builder import build_index
    from expertrag.retrieval.config import RetrievalConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    encoder = SampledEncoder(period)
    report = build_index(out, iter_documents([Path(corpus)]), retrieval=RetrievalConfig(**SCALE_RETRIEVAL),
                         progress=False, encoder=encoder)
    d = report.as_dict()
    d.update(real_vectors=encoder.real, standin_vectors=encoder.standin, real_embed_s=round(encoder.real_s, 1))
    print(json.dumps(d))


def _percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2)}


def _child_search(index_dir: str, questions: str, n: int) -> None:
    import torch

    from expertrag.data.questions import load_questions
    from expertrag.retrieval.config import RetrievalConfig
    from expertrag.retrieval.index import Index

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t = time.perf_counter()
    idx = Index(index_dir, RetrievalConfig(**SCALE_RETRIEVAL))
    _ = idx.bm25, idx.dense, idx.embedder.dim  # load every part before timing
    load_s = time.perf_counter() - t
    qs = [q.question for q in load_questions(Path(questions))][:n]
    for q in qs[:10]:  # warm-up: first calls pay lazy set-up (model graph, numba)
        idx.search(q, 10, "hybrid")
    out = {"queries": len(qs), "load_s": round(load_s, 1)}
    for mode in ("bm25", "dense", "hybrid"):
        ms = []
        for q in qs:
            t = time.perf_counter()
            idx.search(q, 10, mode)
            ms.append((time.perf_counter() - t) * 1000)
        out[mode] = _percentiles(ms)
    print(json.dumps(out))


def _run_child(args: list[str], threads: int, timeout_s: float, module: str = "expertrag.bench.scale"
               ) -> tuple[dict, float, float]:
    """(its JSON report, wall s, peak RSS MB) of `python -m MODULE ARGS` in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    src = str(Path(__file__).resolve().parents[2])  # the package's own tree, for an uninstalled checkout
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=stdout,
                                stderr=stderr, env=env)
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise TimeoutError(f"{args[0]} {args[1]}: over {timeout_s:.0f} s")
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        stdout.seek(0)
        stderr.seek(0)
        out_text, err_text = stdout.read().decode(), stderr.read().decode()
    if proc.returncode != 0:
        last = (err_text.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{args[0]} {args[1]} failed (exit {proc.returncode}): {last}")
    return json.loads(out_text.strip().splitlines()[-1]), wall, usage.ru_maxrss / 1024.0


def _disk_mb(index_dir: Path) -> dict:
    parts: dict[str, float] = {}
    for p in index_dir.iterdir():
        if p.name.startswith("."):  # the build lock (empty)
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        key = "store" if p.name.startswith("store.sqlite") else p.name.split("-")[0].split(".")[0]
        parts[key] = parts.get(key, 0.0) + size / 2**20
    out = {k: round(v, 1) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()), 1)
    return out


def run(data: Path, sizes: list[int], *, work: Path, threads: int = 1, real_period: int = 500, queries: int = 300,
        timeout_s: float = 3600, keep: bool = False, progress: bool = True) -> dict:
    if not (data / "corpora").is_dir():
        raise InputError(f"{data}: no corpora/ folder; pass the shared data folder (e.g. ../shared/data)")
    questions = data / "questions" / QUESTIONS
    if not questions.is_file():
        raise InputError(f"{questions}: not found; pass the shared data folder")
    if real_period < 1:
        raise InputError(f"--real-period must be at least 1, got {real_period}")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        corpus, out = work / f"corpus-{n}.jsonl", work / f"index-{n}"
        if out.exists():
            raise InputError(f"{out}: exists; remove it or give another --work folder", path=out)
        t = time.perf_counter()
        made = write_derived_corpus(data, n, corpus)
        corpus_s = time.perf_counter() - t
        if progress:
            print(f"[{time.strftime('%H:%M:%S')}] {n}: corpus written ({made}, {corpus_s:.0f} s); building ...",
                  file=sys.stderr, flush=True)
        row = {"passages_requested": n, "corpus": made, "corpus_write_s": round(corpus_s, 1),
               "load_before": os.getloadavg()[0]}
        try:
            report, wall, rss = _run_child(["build", str(corpus), str(out), str(real_period)], threads, timeout_s)
        except (TimeoutError, RuntimeError) as e:
            row["error"] = str(e)
            rows.append(row)
            if progress:
                print(f"  {e}", file=sys.stderr, flush=True)
            break  # a larger size would not fit either
        row.update(passages=report["passages"], build_wall_s=round(wall, 1), build_peak_rss_mb=round(rss, 1),
                   timings_s={k: round(v, 1) for k, v in report["timings"].items()},
                   peak_rss_mb_after_phase=report["peak_rss_mb"], real_vectors=report["real_vectors"],
                   standin_vectors=report["standin_vectors"], real_embed_s=report["real_embed_s"],
                   disk_mb=_disk_mb(out))
        if progress:
            print(f"  built: {wall:.0f} s, peak RSS {rss:.0f} MB, disk {row['disk_mb']['total']:.0f} MB; "
                  "timing searches ...", file=sys.stderr, flush=True)
        search, swall, srss = _run_child(["search", str(out), str(questions), str(queries)], threads, timeout_s)
        row.update(search=search, search_process_peak_rss_mb=round(srss, 1), load_after=os.getloadavg()[0])
        rows.append(row)
        if progress:
            print(f"  search: bm25 {search['bm25']}, dense {search['dense']}, hybrid {search['hybrid']}",
                  file=sys.stderr, flush=True)
        corpus.unlink()
        if not keep:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
    return {"sizes": rows, "threads": threads, "real_period": real_period, "retrieval": SCALE_RETRIEVAL,
            "sources": list(SOURCES), "questions": QUESTIONS}


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "build":
        _child_build(rest[0], rest[1], int(rest[2]))
    elif cmd == "search":
        _child_search(rest[0], rest[1], int(rest[2]))
    else:
        raise SystemExit(f"unknown child command {cmd!r}")
