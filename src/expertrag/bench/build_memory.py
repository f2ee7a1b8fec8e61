"""Peak memory of `expertrag index` as the corpus grows: one fresh build per size, each in its own process.

Each size builds a new index from the first N documents of the shared corpora (a fixed file order, so the
smaller corpus is a prefix of the larger), with the same config, in a child process running the real
`expertrag index` command. The child's peak RSS comes from `os.wait4`, i.e. the kernel's high-water mark
for that child alone (`RUSAGE_CHILDREN` would be the maximum over every child so far). The figure to read
is `ratio_largest_smallest`: the issue's target is a flat peak, within ±10% from 2k to 15k passages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from expertrag.errors import InputError
from expertrag.store.manifest import read_manifest

# wiki_vital (10,033) + lfrqa_answers (4,800) hold 14,833 documents; the rest tops 15k up
CORPUS_ORDER = ("wiki_vital.jsonl", "lfrqa_answers.jsonl", "retrievalqa_passages.jsonl", "wiki18_sample.jsonl",
                "pubmedqa_abstracts.jsonl")
TARGET_RATIO = 1.10


def parse_sizes(text: str, unit: str = "document", example: str = "2000,5000,15000") -> list[int]:
    """"15000,2000" -> [2000, 15000]: the --sizes of the build benchmarks (this one counts documents,
    bench scale passages), sorted, deduplicated, positive."""
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise InputError(f"--sizes: expected comma-separated {unit} counts such as {example}, got {text!r}") \
            from None
    if not sizes or sizes[0] <= 0:
        raise InputError(f"--sizes: expected positive {unit} counts, got {text!r}")
    return sizes


def write_prefix(data: Path, n: int, out: Path) -> int:
    """The first `n` lines of the shared corpora in CORPUS_ORDER into `out`; returns how many were written."""
    corpora = data / "corpora"
    files = [corpora / name for name in CORPUS_ORDER if (corpora / name).is_file()]
    if not files:
        raise InputError(f"{corpora}: none of {', '.join(CORPUS_ORDER)} found; pass the shared data folder")
    written = 0
    with open(out, "w", encoding="utf-8") as sink:
        for f in files:
            with open(f, encoding="utf-8") as src:
                for line in src:
                    if written >= n:
                        return written
                    if line.strip():
                        sink.write(line if line.endswith("\n") else line + "\n")
                        written += 1
    return written


def _child_command(corpus: Path, out: Path, config: Path | None) -> list[str]:
    # the same interpreter as this process, so the child runs the same installed (or PYTHONPATH) package
    cmd = [sys.executable, "-m", "expertrag",
           "index", "--corpus", str(corpus), "--out", str(out), "--json"]
    if config is not None:
        cmd += ["--config", str(config)]
    return cmd


def measure_build(corpus: Path, out: Path, config: Path | None, threads: int) -> dict:
    """Run one `expertrag index` build in a child process; its wall time, peak RSS and build report."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    src = str(Path(__file__).resolve().parents[2])  # the package's own tree, for an uninstalled checkout
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(_child_command(corpus, out, config), stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        stdout.seek(0)
        stderr.seek(0)
        out_text, err_text = stdout.read().decode(), stderr.read().decode()
    if proc.returncode != 0:
        last = (err_text.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"index build of {corpus} failed (exit {proc.returncode}): {last}")
    report = json.loads(out_text.strip().splitlines()[-1])
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0, "report": report}


def run(data: Path, sizes: list[int], *, config: Path | None = None, threads: int = 1,
        progress: bool = True) -> dict:
    if not (data / "corpora").is_dir():
        raise InputError(f"{data}: no corpora/ folder; pass the shared data folder (e.g. ../shared/data)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="expertrag-buildmem-") as tmp:
        if config is None:  # one shared config for every size: the fastest embedder installed (resolve_backend)
            config = Path(tmp) / "config.yaml"
            config.write_text("retrieval:\n  embed_backend: auto\n", encoding="utf-8")
            config_label = "retrieval.embed_backend: auto"
        else:
            config_label = str(config)
        for n in sizes:
            corpus = Path(tmp) / f"corpus-{n}.jsonl"
            documents = write_prefix(data, n, corpus)
            if documents < n:
                raise InputError(f"{data}: only {documents} documents in the shared corpora, fewer than {n}")
            if progress:
                print(f"building {n} documents ...", file=sys.stderr, flush=True)
            m = measure_build(corpus, Path(tmp) / f"index-{n}", config, threads)
            report = m["report"]
            manifest = read_manifest(Path(tmp) / f"index-{n}")
            rows.append({"documents": n, "passages": report["passages"], "wall_s": round(m["wall_s"], 1),
                         "embed_backend": manifest.extra.get("embed_backend"),
                         "peak_rss_mb": round(m["peak_rss_mb"], 1), "timings_s": report.get("timings", {}),
                         # the child's own high-water mark after each phase: which phase set the peak
                         "peak_rss_mb_after_phase": report.get("peak_rss_mb", {})})
            if progress:
                print(f"  {report['passages']} passages, {m['wall_s']:.0f} s, peak RSS {m['peak_rss_mb']:.0f} MB",
                      file=sys.stderr, flush=True)
            corpus.unlink()
    smallest, largest = rows[0]["peak_rss_mb"], rows[-1]["peak_rss_mb"]
    ratio = largest / smallest if smallest else float("nan")
    return {"sizes": rows, "threads": threads, "config": config_label,
            "ratio_largest_smallest": round(ratio, 3), "target_ratio": TARGET_RATIO, "flat": ratio <= TARGET_RATIO}
