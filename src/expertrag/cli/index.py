"""`expertrag index`, `expertrag delete` and `expertrag search`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig
from expertrag.errors import InputError

WIKI_OFFLINE = "wiki-offline"


def _documents(corpora: list[str], config: ExpertRAGConfig, skip_bad: bool, report) -> Iterator:
    from expertrag.data.readers import iter_documents
    from expertrag.data.wiki_offline import iter_wiki_offline_documents

    files = []
    for c in corpora:
        if c == WIKI_OFFLINE and not Path(c).exists():
            yield from iter_wiki_offline_documents()
        else:
            files.append(Path(c))
    if files:
        yield from iter_documents(files, config=config.chunking, skip_bad=skip_bad, report=report)


@app.command("index")
def index_cmd(
    corpus: list[str] = typer.Option(..., "--corpus", "-c",
                                     help=f"JSONL/CSV/.txt/.md file or folder; '{WIKI_OFFLINE}' = the packaged "
                                          "Wikipedia vital-article summaries. Repeat, or list several after it."),
    more: list[str] | None = typer.Argument(None, help="more corpus paths", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="index directory (created, or updated in place)"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip bad records and report counts instead of stopping"),
    as_json: bool = typer.Option(False, "--json", help="print the build report as JSON"),
) -> None:
    """Build or update an index: new and changed passages are embedded, unchanged ones reused."""
    from expertrag.data.readers import IngestReport
    from expertrag.retrieval.builder import build_index

    config = ExpertRAGConfig.load(config_path)
    corpora = list(corpus) + list(more or [])
    for c in corpora:
        if c != WIKI_OFFLINE and not Path(c).exists():
            raise InputError("corpus not found", path=c)
    report = IngestReport()
    result = build_index(
        out, _documents(corpora, config, skip_bad, report), retrieval=config.retrieval,
        chunking=config.chunking, sources=corpora, progress=None if not as_json else False,
    )
    summary = result.as_dict()
    summary["ingest"] = {"documents_read": report.documents_read, "skipped": report.skipped,
                         "problems": [list(p) for p in report.problems]}
    if as_json:
        print(json.dumps(summary))
        return
    c = result.counts
    print(f"index {out}: generation {result.generation}, {result.passages} passages from "
          f"{result.documents} documents")
    print(f"  this run: {c['added']} added, {c['changed']} changed, {c['unchanged']} unchanged, "
          f"{c['removed']} removed; {result.embedded} embedded; {result.seconds:.1f} s "
          f"({result.passages_per_s:.0f} passages/s)")
    if report.skipped or skip_bad:
        print(report.summary(), file=sys.stderr)


@app.command("delete")
def delete_cmd(
    ids: list[str] = typer.Argument(..., help="passage ids or document ids to delete"),
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
) -> None:
    """Delete passages (or whole documents) from an index by id."""
    from expertrag.retrieval.builder import build_index
    from expertrag.store.manifest import read_manifest

    read_manifest(index)  # a clear error if there is no index here
    config = ExpertRAGConfig.load(config_path)
    result = build_index(index, [], retrieval=config.retrieval, chunking=config.chunking, delete_ids=ids)
    print(f"deleted {result.deleted} of {len(ids)}; index now has {result.passages} passages")
    if result.missing_deletes:
        print(f"not found: {', '.join(result.missing_deletes)}", file=sys.stderr)
        raise typer.Exit(1)


@app.command("search")
def search_cmd(
    query: str | None = typer.Argument(None, help="the query (or use --queries)"),
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    k: int = typer.Option(5, "-k", help="hits to return"),
    mode: str = typer.Option("hybrid", "--mode", "-m", help="bm25 | dense | hybrid"),
    queries: Path | None = typer.Option(None, "--queries", help="question file ({id, question, ...} JSONL): "
                                           "one JSON line {id, hits} per question"),
    domain: list[str] | None = typer.Option(None, "--domain", help="only passages of this domain (repeatable)"),
    group: list[str] | None = typer.Option(None, "--group", help="caller's access group (repeatable); "
                                              "restricts to public passages and these groups"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    as_json: bool = typer.Option(False, "--json", help="print hits as JSON"),
) -> None:
    """Search an index (BM25, dense or hybrid), with optional domain and access-group filters."""
    from expertrag.retrieval.index import Index
    from expertrag.retrieval.types import Filters

    if (query is None) == (queries is None):
        raise InputError("give either a query or --queries FILE")
    config = ExpertRAGConfig.load(config_path)
    idx = Index(index, config.retrieval)
    filters = Filters(domains=tuple(domain) if domain else None, groups=tuple(group) if group else None)
    if queries is not None:
        from expertrag.data.questions import load_questions

        qs = load_questions(queries)
        batch = 64
        for i in range(0, len(qs), batch):
            part = qs[i:i + batch]
            for q, hits in zip(part, idx.search_many([q.question for q in part], k, mode, filters), strict=True):
                print(json.dumps({"id": q.id, "hits": [h.to_dict() for h in hits]}, ensure_ascii=False))
        return
    hits = idx.search(query, k, mode, filters)
    if as_json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False))
        return
    if not hits:
        print("no hits")
    for rank, h in enumerate(hits, 1):
        text = h.contents if len(h.contents) <= 240 else h.contents[:237] + "..."
        print(f"{rank}. [{h.id}] {h.title}  (score {h.score:.4f})\n   {text}")
