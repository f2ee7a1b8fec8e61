"""`expertrag expert train` (and `expertrag bench adapter`): fit a domain expert's LoRA adapter on its own passages (and QA pairs), base frozen.

The expert's domain comes from its record in the registry (INDEX/experts.json, `expert add`), or from
`--domain` for an expert not registered yet; a registered expert's record then names its adapter
(`adapter: experts/NAME/adapter`, relative to the index folder), as a new version of the record.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from expertrag.cli.bench import bench_app
from expertrag.cli.expert import expert_app
from expertrag.config import ExpertRAGConfig

EXPERTS_DIR = "experts"


def adapter_dir(index: Path, name: str) -> Path:
    """Where an expert's adapter lives: INDEX/experts/NAME/adapter/ (the registry records it relative)."""
    return Path(index) / EXPERTS_DIR / name / "adapter"


@expert_app.command("train")
def expert_train_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="index directory (built by `expertrag index`)"),
    name: str = typer.Option(..., "--name", "-n", help="the expert's name (its adapter goes to INDEX/experts/NAME/adapter)"),
    domain: str | None = typer.Option(None, "--domain", help="the expert's domain: passages whose metadata.domain "
                                      "is this (default: the registered expert's domain)"),
    steps: int = typer.Option(200, "--steps", min=1, help="optimizer steps"),
    rank: int = typer.Option(8, "--rank", min=1, help="LoRA rank"),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha (default 2 x rank)"),
    lr: float = typer.Option(2e-4, "--lr", help="learning rate (AdamW)"),
    targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--targets",
                                help="comma-separated projections the adapter wraps"),
    qa: Path | None = typer.Option(None, "--qa", help="question file of the expert's QA pairs (its first gold "
                                   "answer is the target; loss on the answer only)"),
    seq_len: int = typer.Option(128, "--seq-len", min=8, help="tokens per training block"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    heldout: float = typer.Option(0.1, "--heldout", min=0.0, max=0.9, help="share of the domain's documents "
                                  "held out for perplexity"),
    heldout_by: str | None = typer.Option(None, "--heldout-by", help="metadata field grouping passages into "
                                          "documents for the split (default: their doc_id)"),
    max_heldout_blocks: int = typer.Option(64, "--max-heldout-blocks", min=1, help="cap on held-out blocks scored"),
    include_restricted: bool = typer.Option(False, "--include-restricted", help="also train on passages with "
                                            "access groups (the adapter could then reveal them to anyone)"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch intra-op threads"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config (section model)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """Fit an expert's LoRA adapter on its domain's passages, base model frozen; report perplexity on
    held-out domain passages before and after."""
    import torch

    from expertrag.errors import InputError
    from expertrag.experts.adapter import (
        attach,
        document_group,
        lora_config,
        save_adapter,
        split_by_document,
        train_adapter,
    )
    from expertrag.experts.registry import ExpertRegistry
    from expertrag.model.loading import load_model
    from expertrag.model.train.config import TrainConfig
    from expertrag.model.train.examples import corpus_blocks, qa_examples
    from expertrag.retrieval.index import Index

    if not name.strip() or "/" in name or name.startswith("."):
        raise InputError(f"--name {name!r}: an expert name is one plain folder name")
    registry = ExpertRegistry(index)
    record = registry.snapshot().get(name)
    if record is not None and not record.active:
        raise InputError(f"expert {name!r} is retired; add it again before training its adapter", field="--name")
    if domain is None:
        if record is None or record.domain is None:
            raise InputError(f"expert {name!r} is not a registered domain expert of this index; register it with "
                             "`expertrag expert add` or give --domain", field="--name")
        domain = record.domain
    elif record is not None and record.domain != domain:
        raise InputError(f"--domain {domain!r}: expert {name!r} is registered for domain {record.domain!r}",
                         field="--domain")
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    config = ExpertRAGConfig.load(config_path)
    if config.model.backend != "native":
        raise InputError(f"adapters are trained on the native backend; the config says model.backend: "
                         f"{config.model.backend}", field="model.backend")
    if threads is not None:
        torch.set_num_threads(threads)
    idx = Index(index, config.retrieval, verify=False)
    try:
        store, gen = idx.store, idx.generation
        rowids = store.allowed_rowids(gen, domains=[domain], all_groups=True) if include_restricted else \
            store.allowed_rowids(gen, domains=[domain], groups=())
        passages = list(store.get(rowids.tolist()).values())
        if not passages:
            present = sorted(str(r[0]) for r in store.conn.execute("SELECT DISTINCT domain FROM passages"))
            raise InputError(f"no {'' if include_restricted else 'public '}passages of domain {domain!r} in "
                             f"this index (domains present: {', '.join(present) or 'none'})", path=index)
    finally:
        idx.close()
    passages.sort(key=lambda p: p.rowid)
    train_p, held_p = split_by_document(passages, heldout, seed, heldout_by)
    model, tok = load_model(config.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = corpus_blocks(train_p, tok, seq_len)
    held = corpus_blocks(held_p, tok, seq_len)[:max_heldout_blocks]
    n_qa = 0
    if qa is not None:
        from expertrag.data.questions import load_questions

        tcfg = TrainConfig(seq_len=seq_len)
        qa_ex = [e for q in load_questions(qa) for e in qa_examples(q, None, tok, tcfg)]
        if not qa_ex:
            raise InputError("no question with a gold answer (field golden_answers)", path=qa)
        n_qa = len(qa_ex)
        train += qa_ex
    attach(model, lora_config(rank, alpha, target_list, base=config.model.base), seed=seed)
    log = None if as_json else print
    report = train_adapter(model, train, held, pad, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                           log_every=max(1, steps // 10), log=log)
    out = adapter_dir(index, name)
    report.update(expert=name, domain=domain, adapter=str(out), rank=rank, targets=target_list, lr=lr,
                  seq_len=seq_len, batch_size=batch_size, threads=torch.get_num_threads(),
                  passages={"train": len(train_p), "heldout": len(held_p)},
                  # documents as the split grouped them (by --heldout-by when given)
                  documents={"train": len({document_group(p, heldout_by) for p in train_p}),
                             "heldout": len({document_group(p, heldout_by) for p in held_p}), "grouped_by": heldout_by or "doc_id"},
                  qa_examples=n_qa, index_version=f"{gen}")
    save_adapter(model, out, info=report)
    if record is not None:  # the record names its adapter: a new version of the expert
        rel = out.relative_to(Path(index)).as_posix()
        registry.add([record.model_copy(update={"adapter": rel})], replace=True)
        report["registry_adapter"] = rel
    if as_json:
        print(json.dumps(report))
        return
    print(f"expert {name!r} ({domain}): {report['steps']} steps in {report['seconds']:.0f} s on "
          f"{report['train_examples']} examples ({len(train_p)} passages, {n_qa} QA), "
          f"{report['trainable_parameters']:,} trainable parameters (base frozen)")
    print(f"held-out perplexity {report['perplexity_before']} -> {report['perplexity_after']} "
          f"({report['heldout_examples']} blocks of {len(held_p)} passages, {report['heldout_tokens']} tokens); "
          f"train loss {report['loss_start']} -> {report['loss_end']}")
    print(f"adapter -> {out}")


@bench_app.command("adapter")
def bench_adapter_cmd(
    adapter: Path = typer.Option(..., "--adapter", help="adapter folder (e.g. INDEX/experts/NAME/adapter)"),
    corpus: Path | None = typer.Option(None, "--corpus", help="corpus JSONL: perplexity of its first passages "
                                       "with and without the adapter"),
    passages: int = typer.Option(60, "--passages", min=1),
    threads: int = typer.Option(1, "--threads", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """An expert adapter at run time: attach/detach time, decoding speed with it vs without, off-domain perplexity."""
    from expertrag.bench.adapter import run

    result = run(adapter, corpus=corpus, passages=passages, threads=threads)
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


@bench_app.command("token-routing")
def bench_token_routing_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="index whose experts have adapters (INDEX/experts/NAME/adapter)"),
    expert: list[str] = typer.Option(..., "--expert", help="NAME=DOMAIN (repeatable, two or more)"),
    steps: int = typer.Option(50, "--steps", min=1, help="router training steps"),
    lr: float = typer.Option(5e-3, "--lr"),
    top_k: int = typer.Option(2, "--top-k", min=1),
    heldout_by: str | None = typer.Option(None, "--heldout-by", help="as in `expert train`"),
    threads: int = typer.Option(1, "--threads", min=1),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-input (oracle domain) vs per-token routing among domain adapters: held-out perplexity per domain."""
    from expertrag.bench.token_routing import run
    from expertrag.errors import InputError

    pairs = []
    for e in expert:
        name, sep, domain = e.partition("=")
        if not sep or not name or not domain:
            raise InputError(f"--expert {e!r}: expected NAME=DOMAIN")
        pairs.append((name, domain))
    result = run(index, pairs, steps=steps, lr=lr, top_k=top_k, heldout_by=heldout_by, threads=threads)
    print(json.dumps(result) if as_json else json.dumps(result, indent=2))
