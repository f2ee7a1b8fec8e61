"""`expertrag train router`: fit the domain-expert router of an index (experts/router_train.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from expertrag.cli.train import train_app
from expertrag.config import ExpertRAGConfig


@train_app.command("router")
def train_router_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="index directory; the router goes to INDEX/router/"),
    dataset: list[Path] | None = typer.Option(
        None, "--dataset", "-d", help="labelled question file (label: metadata.domain); repeatable. Without "
                                      "one, the router learns from a sample of each domain's passages"),
    holdout: float = typer.Option(0.3, "--holdout", help="share of the questions held out for eval-experts "
                                                         "(never trained on; seeded hash split by id)"),
    seed: int = typer.Option(0, "--seed", help="seed of the split, the folds and the passage sample"),
    folds: int = typer.Option(5, "--folds", help="cross-validation folds for C, threshold and mix"),
    per_domain: int = typer.Option(400, "--per-domain", help="passages sampled per domain (without --dataset)"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    as_json: bool = typer.Option(False, "--json", help="print the training report as JSON"),
) -> None:
    """Train the router: labelled questions (preferred) or the experts' own passages."""


    from expertrag.errors import InputError
    from expertrag.experts.router import router_dir, save_router
    from expertrag.experts.router_train import (
        DomainMap,
        RecallOracle,
        fit_router,
        global_hit_domains,
        held_out,
        labelled_questions,
        passage_training_set,
    )
    from expertrag.retrieval.index import Index

    if not 0.0 <= holdout < 1.0:
        raise InputError("must be in [0, 1)", field="--holdout")
    if folds < 2:
        raise InputError("must be at least 2", field="--folds")
    config = ExpertRAGConfig.load(config_path)
    idx = Index(index, config.retrieval)
    log = (lambda m: print(m, file=sys.stderr)) if as_json else print
    t0 = time.perf_counter()
    if dataset:
        rows = labelled_questions(dataset)
        train = [r for r in rows if not held_out(r[0], seed, holdout)]
        log(f"{len(rows)} labelled questions, {len(train)} for training ({len(rows) - len(train)} held out, "
            f"seed {seed})")
        texts = [r[1] for r in train]
        X = idx.embedder.encode(texts)
        t_embed = time.perf_counter() - t0
        dm = DomainMap(idx)
        ranked: list = []
        signals = global_hit_domains(idx, dm, texts, X, depth=20, ranked_out=ranked)
        gold = [r[3] for r in train]
        # with gold passages, the retrieval scope (filter or boost) is chosen for recall on this split
        recall = RecallOracle(idx, texts, X, gold, ranked) if any(gold) else None
        model = fit_router(X, [r[2] for r in train], signals, embedder=idx.manifest.embedder, seed=seed,
                           folds=folds, source="questions", log=log, recall=recall)
        model.info.update(datasets=[str(p) for p in dataset], holdout=holdout,
                          trained_ids=sorted(r[0] for r in train), embed_s=round(t_embed, 2))
    else:
        X, labels = passage_training_set(idx, per_domain, seed)
        log(f"no --dataset: learning from {len(X)} passages ({len(set(labels))} domains, seed {seed})")
        model = fit_router(X, labels, None, embedder=idx.manifest.embedder, seed=seed, folds=folds,
                           source="passages", log=log)
    model.info["seconds"] = round(time.perf_counter() - t0, 2)
    out = save_router(router_dir(index), model)
    report = {"router": str(out), "classes": model.classes, "threshold": model.threshold, "mix": model.mix,
              "domain_boost": model.domain_boost,
              **{k: v for k, v in model.info.items() if k != "trained_ids"}}
    if as_json:
        print(json.dumps(report))
        return
    print(json.dumps(report, indent=2))

