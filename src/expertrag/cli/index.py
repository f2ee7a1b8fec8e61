"""`expertrag index`, `expertrag delete` and `expertrag search`.

Access rule (search and ask): with no `--group`, only public passages (those without groups) are
searched; each `--group G` adds the passages of group G; `--all-groups` (administrators) searches every
passage and cannot be combined with `--group`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig
from expertrag.errors import InputError
from expertrag.text import escape_controls, json_safe, printable_body

WIKI_OFFLINE = "wiki-offline"


def dumps(obj) -> str:
    """Strict JSON for stdout: NaN/Infinity (not JSON) become null, never echoed."""
    return json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False)


def access_filters(group: list[str] | None, all_groups: bool, domain: list[str] | None = None):
    """The Filters for `--group`/`--all-groups`/`--domain`: fail closed (no group = public only)."""
    from expertrag.retrieval.types import Filters

    if all_groups and group:
        raise InputError("give --group or --all-groups, not both")
    if group and any(not g.strip() for g in group):
        raise InputError("--group: empty group name")
    return Filters(domains=tuple(domain) if domain else None, groups=tuple(group) if group else None,
                   all_groups=all_groups)


def _documents(corpora: list[str], config: ExpertRAGConfig, skip_bad: bool, report, strict: bool) -> Iterator:
    from expertrag.data.readers import iter_documents
    from expertrag.data.wiki_offline import iter_wiki_offline_documents

    files = []
    for c in corpora:
        if c == WIKI_OFFLINE and not Path(c).exists():
            yield from iter_wiki_offline_documents()
        else:
            files.append(Path(c))
    if files:
        yield from iter_documents(files, config=config.chunking, skip_bad=skip_bad, report=report, strict=strict)


@app.command("index")
def index_cmd(
    corpus: list[str] = typer.Option(..., "--corpus", "-c",
                                     help=f"JSONL/CSV/.txt/.md file or folder; '{WIKI_OFFLINE}' = the packaged "
                                          "Wikipedia vital-article summaries. Repeat, or list several after it."),
    more: list[str] | None = typer.Argument(None, help="more corpus paths", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="index directory (created, or updated in place)"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip bad records and report counts instead of stopping"),
    strict: bool = typer.Option(False, "--strict", help="refuse likely mistakes (a misspelt access key such as "
                                                        "'Groups') instead of warning"),
    as_json: bool = typer.Option(False, "--json", help="print the build report as JSON"),
    on_ray: bool = typer.Option(False, "--ray", help="chunk and embed on Ray Data actors (pip install -e "
                                                     "'.[ray]'); the index is the same as without it"),
    address: str | None = typer.Option(None, "--address", help="with --ray: a running cluster ('auto' or "
                                                                "HOST:PORT); default: a local one for this run"),
    num_workers: int | None = typer.Option(None, "--num-workers", help="with --ray: chunking/embedding actors "
                                                                       "(default 2)"),
) -> None:
    """Build or update an index: new and changed passages are embedded, unchanged ones reused."""
    from expertrag.data.readers import IngestReport, path_problem
    from expertrag.retrieval.builder import build_index

    if out.exists() and not out.is_dir():
        raise InputError("--out names an existing file; give a directory (new or an index)", path=out)
    if not on_ray and (address is not None or num_workers is not None):
        raise InputError("--address and --num-workers need --ray")
    if on_ray:
        from expertrag.retrieval.ray_build import require_ray

        require_ray()  # before anything is read or created: one clear error naming the extra
        if num_workers is not None and num_workers < 1:
            raise InputError(f"--num-workers must be at least 1, got {num_workers}")
    config = ExpertRAGConfig.load(config_path)
    corpora = list(corpus) + list(more or [])
    for c in corpora:
        if c != WIKI_OFFLINE or Path(c).exists() or Path(c).is_symlink():
            why = path_problem(Path(c))
            if why is not None:
                raise InputError("corpus not found" if why.startswith("no such") else why, path=c)
    report = IngestReport()
    documents = _documents(corpora, config, skip_bad, report, strict)
    progress = None if not as_json else False
    if on_ray:
        from expertrag.retrieval.ray_build import build_index_on_ray

        result = build_index_on_ray(out, documents, retrieval=config.retrieval, chunking=config.chunking,
                                    sources=corpora, progress=progress, address=address,
                                    num_workers=num_workers or 2)
    else:
        result = build_index(out, documents, retrieval=config.retrieval, chunking=config.chunking,
                             sources=corpora, progress=progress)
    summary = result.as_dict()
    summary["ingest"] = {"documents_read": report.documents_read, "skipped": report.skipped,
                         "problems": [list(p) for p in report.problems],
                         "warnings": [list(w) for w in report.warnings]}
    if as_json:
        print(dumps(summary))
        for path, line, reason in report.warnings[:10]:
            print(escape_controls(f"warning: {path}{f':{line}' if line is not None else ''}: {reason}"),
                  file=sys.stderr)
        return
    c = result.counts
    print(f"index {out}: generation {result.generation}, {result.passages} passages from "
          f"{result.documents} documents")
    print(f"  this run: {c['added']} added, {c['changed']} changed, {c['unchanged']} unchanged, "
          f"{c['removed']} removed; {result.embedded} embedded; {result.seconds:.1f} s "
          f"({result.passages_per_s:.0f} passages/s)")
    if result.reembedded:
        print(f"warning: {result.reembedded} cached embeddings failed verification (corrupt or unchecked) "
              "and were embedded again", file=sys.stderr)
    if report.skipped or skip_bad or report.warned:
        print(report.summary(), file=sys.stderr)


@app.command("delete")
def delete_cmd(
    ids: list[str] = typer.Argument(..., help="passage ids or document ids to delete"),
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
) -> None:
    """Delete passages (or whole documents) from an index by id. An id not in the index is an error
    (exit 2) and nothing is deleted."""
    from expertrag.retrieval.builder import build_index
    from expertrag.store.manifest import read_manifest

    read_manifest(index)  # a clear error if there is no index here
    config = ExpertRAGConfig.load(config_path)
    result = build_index(index, [], retrieval=config.retrieval, chunking=config.chunking, delete_ids=ids,
                         missing_ok=False)
    for i, removed in result.removed_by_id.items():
        if len(removed) == 1 and removed[0] == i:
            what = "passage"
        else:
            what = f"{len(removed)} passage{'s' if len(removed) != 1 else ''}"
            shown = ", ".join(escape_controls(r) for r in removed[:5]) + (", ..." if len(removed) > 5 else "")
            what += f" ({shown})"
        print(f"deleted {escape_controls(i)}: {what}")
    print(f"deleted {result.deleted_passages} passages for {result.deleted} ids; index now has "
          f"{result.passages} passages")


@app.command("search")
def search_cmd(
    query: str | None = typer.Argument(None, help="the query (or use --queries)"),
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    k: int = typer.Option(5, "-k", help="hits to return"),
    mode: str = typer.Option("hybrid", "--mode", "-m", help="bm25 | dense | hybrid"),
    queries: Path | None = typer.Option(None, "--queries", help="question file ({id, question, ...} JSONL): "
                                           "one JSON line {id, hits} per question"),
    domain: list[str] | None = typer.Option(None, "--domain", help="only passages of this domain (repeatable)"),
    group: list[str] | None = typer.Option(None, "--group", help="caller's access group (repeatable): public "
                                              "passages and these groups'. Without it: public passages only"),
    all_groups: bool = typer.Option(False, "--all-groups", help="administrators: search every passage, whatever "
                                                                "its groups"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    as_json: bool = typer.Option(False, "--json", help="print hits as JSON"),
) -> None:
    """Search an index (BM25, dense or hybrid), with optional domain and access-group filters."""
    from expertrag.retrieval.index import Index

    if (query is None) == (queries is None):
        raise InputError("give either a query or --queries FILE")
    filters = access_filters(group, all_groups, domain)
    config = ExpertRAGConfig.load(config_path)
    idx = Index(index, config.retrieval)
    if queries is not None:
        from expertrag.data.questions import load_questions

        qs = load_questions(queries)
        batch = 64
        for i in range(0, len(qs), batch):
            part = qs[i:i + batch]
            for q, hits in zip(part, idx.search_many([q.question for q in part], k, mode, filters), strict=True):
                print(dumps({"id": q.id, "hits": [h.to_dict() for h in hits]}))
        return
    hits = idx.search(query, k, mode, filters)
    if as_json:
        print(dumps([h.to_dict() for h in hits]))
        return
    if not hits:
        print("no hits")
    for rank, h in enumerate(hits, 1):
        text = printable_body(h.contents)
        text = text if len(text) <= 240 else text[:237] + "..."
        print(f"{rank}. [{escape_controls(h.id)}] {escape_controls(h.title)}  (score {h.score:.4f})\n   {text}")
