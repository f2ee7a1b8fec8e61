"""`expertrag demo`: the main job. Builds (or updates) the demo index and shows what the system does."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from expertrag.cli.app import app

DEMO_QUERIES = [
    "Who painted the Mona Lisa?",
    "What is the speed of light?",
    "Which river flows through Cairo?",
    "What did Marie Curie discover?",
    "How do vaccines work?",
]


def demo_index_dir() -> Path:
    from expertrag.paths import cache_dir

    return cache_dir() / "indexes" / "wiki-offline"


@app.command("demo")
def demo_cmd(
    out: Path | None = typer.Option(None, "--out", help="index directory (default: the cache's demo index)"),
    limit: int | None = typer.Option(None, "--limit", help="index only the first N articles (quicker)"),
    k: int = typer.Option(3, "-k", help="hits shown per search"),
) -> None:
    """Index the packaged Wikipedia vital-article summaries and run a few searches with timings."""
    from expertrag.data.wiki_offline import iter_wiki_offline_documents
    from expertrag.retrieval.builder import build_index
    from expertrag.retrieval.index import Index

    out = out or demo_index_dir()
    print(f"[1/2] indexing the Wikipedia vital-article summaries into {out} "
          "(first run embeds ~10k passages: several minutes on 2 cores; later runs reuse them)")
    report = build_index(out, iter_wiki_offline_documents(limit=limit), sources=["wiki-offline"])
    c = report.counts
    print(f"      {report.passages} passages from {report.documents} articles; {c['added']} added, "
          f"{c['changed']} changed, {c['unchanged']} unchanged; embedded {report.embedded} in "
          f"{report.timings.get('embed_s', 0):.1f} s; total {report.seconds:.1f} s")

    print("[2/2] searching (hybrid = BM25 + dense, fused by reciprocal rank)")
    index = Index(out)
    index.search("warm-up", 1, "hybrid")  # loads the embedder; not part of the timings below
    for query in DEMO_QUERIES:
        t = time.perf_counter()
        hits = index.search(query, k, "hybrid")
        ms = (time.perf_counter() - t) * 1000
        print(f"\n  Q: {query}   ({ms:.1f} ms)")
        for rank, h in enumerate(hits, 1):
            snippet = h.contents[:110] + ("..." if len(h.contents) > 110 else "")
            print(f"    {rank}. {h.title} [{h.id}]: {snippet}")
