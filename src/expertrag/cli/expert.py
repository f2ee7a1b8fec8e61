"""`expertrag expert ...`: register, inspect, train and retire domain experts.

The registry lives beside the index (INDEX/experts.json, experts/registry.py); a running pipeline or
service picks changes up before its next question.
"""

from __future__ import annotations

from pathlib import Path

import typer

from expertrag.cli.app import app
from expertrag.errors import InputError

expert_app = typer.Typer(help="Domain experts: register, list, show, train and retire them.", no_args_is_help=True)
app.add_typer(expert_app, name="expert")

INDEX_HELP = "index directory (built by `expertrag index`); the registry is INDEX/experts.json"


def index_domains(index: Path) -> dict[str | None, int]:
    """Live passages per domain of an index (None = passages without a domain)."""
    from expertrag.retrieval.index import STORE_FILE
    from expertrag.store.docstore import DocStore
    from expertrag.store.manifest import read_manifest

    manifest = read_manifest(index)
    store = DocStore(index / STORE_FILE)
    try:
        return store.domain_counts(manifest.generation)
    finally:
        store.close()


def _registry(index: Path):
    from expertrag.experts.registry import ExpertRegistry

    if not index.is_dir():
        raise InputError("no such index directory", path=index)
    return ExpertRegistry(index)


def _row(rec, counts: dict | None = None) -> str:
    from expertrag.text import escape_controls as esc

    where = f"domain {rec.domain}" if rec.domain else "all domains"
    n = f", {counts.get(rec.domain, 0)} passages" if counts is not None and rec.domain else ""
    groups = f", groups {','.join(rec.groups)}" if rec.groups else ""
    flags = (" sensitive" if rec.sensitive else "") + (f" adapter={rec.adapter}" if rec.adapter else "") \
        + (f" gate={rec.gate}" if rec.gate else "")
    return esc(f"{rec.name:<16} v{rec.version} {rec.status:<7} {where}{n}{groups}{flags}")


@expert_app.command("add")
def add_cmd(
    index: Path = typer.Option(..., "--index", "-i", help=INDEX_HELP),
    name: str | None = typer.Option(None, "--name", "-n", help="expert name (letters, digits, _ - .)"),
    domain: str | None = typer.Option(None, "--domain", "-d", help="the metadata.domain of its passages"),
    from_domains: bool = typer.Option(False, "--from-domains",
                                      help="one expert per distinct metadata.domain in the index (named after it)"),
    description: str = typer.Option("", "--description", help="what it knows (shown in listings)"),
    prompt: str = typer.Option("", "--prompt", help="system prompt put before the pipeline's own"),
    k: int | None = typer.Option(None, "--k", help="passages to retrieve (default: pipeline.k)"),
    mode: str | None = typer.Option(None, "--mode", help="bm25 | dense | hybrid (default: pipeline.search_mode)"),
    groups: list[str] | None = typer.Option(None, "--groups", "--group",
                                            help="access groups allowed to use it (repeatable); none = everyone"),
    sensitive: bool = typer.Option(False, "--sensitive", help="route its questions through the policy expert"),
    gate: str | None = typer.Option(
        None, "--gate", help="its own retrieval gate: a policy name (always, never, adaptive, ...), a trained "
                             "gate folder relative to the index (adaptive on it) or POLICY:FOLDER; default: the "
                             "pipeline's policy"),
    adapter: str | None = typer.Option(
        None, "--adapter", help="its LoRA adapter folder (peft format), relative to the index; `expert train` "
                                "sets it for you"),
    replace: bool = typer.Option(False, "--replace", help="replace an active expert of that name (new version)"),
    as_json: bool = typer.Option(False, "--json", help="print the records added as JSON"),
) -> None:
    """Register an expert (or one per domain with --from-domains). Takes effect on the next question."""
    import json

    from pydantic import ValidationError

    from expertrag.experts.registry import GENERAL, ExpertRecord

    reg = _registry(index)
    counts = index_domains(index)
    if from_domains:
        if name or domain:
            raise InputError("--from-domains names its experts after the domains: leave out --name/--domain")
        if not any(d is not None for d in counts):
            raise InputError("no passage in the index has a metadata.domain", path=index)
        existing = reg.snapshot()
        wanted = [d for d in counts if d is not None and d != GENERAL]
        # already registered (active) domain experts are kept as they are, so the command can be re-run
        taken = {e.domain for e in existing.active}
        specs = [(d, d) for d in wanted if d not in taken or replace]
    else:
        if not domain:
            raise InputError("give --domain (or --from-domains)", field="--domain")
        if domain not in counts:
            known = ", ".join(sorted(d for d in counts if d is not None)) or "none"
            raise InputError(f"no passage of the index has domain {domain!r} (domains: {known})", field="--domain")
        specs = [(name or domain, domain)]
    try:
        records = [ExpertRecord(name=n, domain=d, description=description or f"passages of domain {d}",
                                system_prompt=prompt, k=k, mode=mode, groups=tuple(groups or ()),
                                sensitive=sensitive, gate=gate, adapter=adapter) for n, d in specs]
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(err["msg"], field="--" + str(err["loc"][0]).replace("_", "-")) from None
    if adapter is not None:
        from expertrag.experts.adapter import AdapterError, read_adapter

        try:  # a folder that could not be applied at answer time is never registered
            read_adapter(index / adapter)
        except AdapterError as e:
            raise InputError(str(e), field="--adapter") from None
    if gate is not None:
        from expertrag.experts.gates import build_gate
        from expertrag.pipeline.build import gate_dir

        try:  # the policy exists and its artifacts load: a record that cannot answer is never written
            build_gate(gate, index, None, gate_dir(index))
        except ValueError as e:
            raise InputError(str(e), field="--gate") from None
    snap = reg.add(records, replace=replace) if records else reg.snapshot()
    if as_json:
        print(json.dumps({"version": snap.version, "added": [snap.get(r.name).to_json() for r in records]}))
        return
    for r in records:
        print("added " + _row(snap.get(r.name), counts))
    if not records:
        print("nothing to add: every domain already has an active expert")
    print(f"registry {reg.path}: version {snap.version}, {len(snap.active)} active experts (general included)")


@expert_app.command("list")
def list_cmd(
    index: Path = typer.Option(..., "--index", "-i", help=INDEX_HELP),
    all_: bool = typer.Option(False, "--all", help="retired experts too"),
    as_json: bool = typer.Option(False, "--json", help="print the records as JSON"),
) -> None:
    """The registered experts (active ones, the general expert included)."""
    import json

    reg = _registry(index)
    snap = reg.snapshot()
    shown = list(snap.active) + ([e for e in snap.experts if not e.active] if all_ else [])
    if as_json:
        print(json.dumps({"version": snap.version, "experts": [e.to_json() for e in shown]}))
        return
    counts = index_domains(index)
    for e in shown:
        print(_row(e, counts))


@expert_app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="expert name"),
    index: Path = typer.Option(..., "--index", "-i", help=INDEX_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the record as JSON"),
) -> None:
    """One expert's record."""
    import json

    from expertrag.text import escape_controls as esc

    rec = _registry(index).snapshot().get(name)
    if rec is None:
        raise InputError(f"no expert named {name!r}", field="NAME")
    if as_json:
        print(json.dumps(rec.to_json()))
        return
    for key, value in rec.to_json().items():
        print(esc(f"{key:<14} {value if value not in (None, '', []) else '-'}"))


@expert_app.command("retire")
def retire_cmd(
    name: str = typer.Argument(..., help="expert name"),
    index: Path = typer.Option(..., "--index", "-i", help=INDEX_HELP),
) -> None:
    """Retire an expert: no new question is routed to it (questions in flight finish on it)."""
    reg = _registry(index)
    snap = reg.retire(name)
    print(f"retired {name}; registry version {snap.version}")
