"""`expertrag ask` and `expertrag label`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from expertrag.cli import eval_common as ec
from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig
from expertrag.errors import InputError


def _print_answer(a) -> None:
    from expertrag.text import escape_controls as esc
    from expertrag.text import printable_body

    decision = a.gate.get("decision")
    print(f"Q: {esc(a.question)}")
    print(f"A: {printable_body(a.text)}" + ("   (abstained)" if a.abstained else ""))
    print(f"   decision: {decision} by {a.gate.get('policy')} (score {a.gate.get('score', 0):.3f}, "
          f"stage {a.gate.get('stage')}); confidence {a.confidence:.2f}")
    if a.routing:
        chosen = ", ".join(f"{e['name']} {e['weight']:.2f}" for e in a.routing["experts"])
        print(f"   experts: {esc(chosen)} ({a.routing['layer']} layer: {esc(a.routing['reason'])})")
    for c in a.citations:
        print(f"   [{c.marker}] {esc(c.title)} ({esc(c.id)})" + (f" from {esc(c.expert)}" if c.expert else ""))
    if a.abstained and a.passages:
        print("   best passages:")
        for n, p in enumerate(a.passages[:3], 1):
            print(f"   [{n}] {esc(p['title'])}: {printable_body(p['contents'][:120])}...")
    t = a.timings
    print(f"   time: {t.total_ms:.0f} ms (gate {t.gate_ms:.0f}, probe {t.probe_ms:.0f}, retrieval "
          f"{t.retrieval_ms:.0f}, generation {t.generation_ms:.0f}; cache {t.cache}); tokens "
          f"{a.tokens['prompt']} in, {a.tokens['generated']} out")


@app.command("ask")
def ask_cmd(
    question: str = typer.Argument(..., help="the question"),
    index: Path = typer.Option(..., "--index", "-i", help="index directory (built by `expertrag index`)"),
    policy: str | None = typer.Option(None, "--policy", "-p",
                                      help="never | always | popularity | skr-knn | entropy | flare | adaptive | router"),
    gate: Path | None = typer.Option(None, "--gate", help="gate artifacts folder (default: INDEX/gate)"),
    group: list[str] | None = typer.Option(None, "--group", help="the asking user's access groups (repeatable); "
                                              "without it only public passages are used"),
    all_groups: bool = typer.Option(False, "--all-groups", help="administrators: retrieve from every passage, "
                                                                "whatever its groups"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    as_json: bool = typer.Option(False, "--json", help="print the Answer as JSON"),
    backend: str | None = typer.Option(None, "--backend", help=ec.BACKEND_HELP),
) -> None:
    """Answer a question: the gate decides whether to retrieve; the answer carries citations and timings."""
    from expertrag.cli.index import access_filters
    from expertrag.pipeline.answer import User
    from expertrag.pipeline.build import load_pipeline

    access_filters(group, all_groups)  # usage checks before the model loads
    config = ec.with_backend(ExpertRAGConfig.load(config_path), backend)
    rag = load_pipeline(index, config, policy, gate)
    user = User("cli", tuple(group or ()), all_groups=all_groups)
    answer = rag.answer(question, user=user)
    if as_json:
        from expertrag.cli.index import dumps

        print(dumps(answer.to_dict()))  # strict JSON: NaN/Infinity from passage metadata become null
    else:
        _print_answer(answer)


@app.command("label")
def label_cmd(
    dataset: Path = typer.Option(..., "--dataset", "-d", help="question file ({id, question, golden_answers})"),
    index: Path = typer.Option(..., "--index", "-i", help="index for the open-book answers"),
    out: Path = typer.Option(..., "--out", "-o", help="label file (JSONL); an existing one is resumed"),
    limit: int | None = typer.Option(None, "--limit", help="first N questions only"),
    from_metadata: bool = typer.Option(False, "--from-metadata",
                                       help="take labels already in the data (metadata.judgement / needs_retrieval) "
                                            "instead of running the model"),
    batch_size: int = typer.Option(8, "--batch-size", help="questions generated together"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    backend: str | None = typer.Option(None, "--backend", help=ec.BACKEND_HELP),
    on_ray: bool = typer.Option(False, "--ray", help=ec.RAY_HELP),
    address: str | None = typer.Option(None, "--address", help=ec.ADDRESS_HELP),
    num_workers: int | None = typer.Option(None, "--num-workers", help=ec.NUM_WORKERS_HELP),
) -> None:
    """Derive retrieval labels: retrieve / no_retrieve / both_wrong from closed- vs open-book correctness."""
    from expertrag.data.questions import load_questions
    from expertrag.gate.labels import records_from_metadata, write_labels

    ec.check_ray_options(on_ray, address, num_workers)
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    questions = load_questions(dataset)[:limit]
    if from_metadata:
        records = records_from_metadata(questions)
        n = write_labels(out, records)
        print(f"{n} labels taken from {dataset} metadata -> {out}")
        return
    from expertrag.pipeline.build import load_pipeline
    from expertrag.pipeline.labeling import label_questions

    config = ec.with_backend(ExpertRAGConfig.load(config_path), backend)
    if on_ray:
        from types import SimpleNamespace

        from expertrag.pipeline.ray_work import label_on_ray
        from expertrag.retrieval.index import Index

        ec.check_index(index)  # here, not as a traceback from every worker's constructor
        # the driver loads no model: provenance reads only the pipeline config and the index, which are
        # what load_pipeline gives the actors, so a file may be resumed with or without --ray
        record_provenance(out, SimpleNamespace(config=config.pipeline, index=Index(index, config.retrieval)),
                          config, dataset)
        counts = label_on_ray(index, config, questions, out, batch_size=batch_size, num_workers=num_workers or 2,
                              address=address)
    else:
        rag = load_pipeline(index, config, "always")
        record_provenance(out, rag, config, dataset)
        counts = label_questions(rag, questions, out, batch_size=batch_size)
    print(f"labelled {sum(counts.values())} questions -> {out}: " +
          ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def provenance_path(out: Path) -> Path:
    return out.with_suffix(".provenance.json")


def record_provenance(out: Path, rag, config: ExpertRAGConfig, dataset: Path) -> None:
    """Write (or, resuming, check) OUT.provenance.json: the settings every label in OUT was made with."""
    import hashlib
    from datetime import UTC, datetime

    from expertrag.errors import InputError
    from expertrag.eval.provenance import machine_info, package_versions
    from expertrag.fileio import atomic_write_text
    from expertrag.model.auto_backend import describe
    from expertrag.pipeline.labeling import already_labelled, label_settings

    settings = label_settings(rag, {"setup": describe(config.model), "config": config.model.model_dump(mode="json")})
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    path = provenance_path(out)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    prov = {"settings": settings, "settings_sha256": digest, "datasets": [str(dataset)], "started_at": now}
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"unreadable provenance of the existing labels: {e}", path=path) from None
        if old.get("settings_sha256") != digest:
            prev = old.get("settings", {})
            diff = sorted(k for k in set(prev) | set(settings) if prev.get(k) != settings.get(k))
            raise InputError(f"{out} was labelled with other settings ({', '.join(diff) or 'unknown'} differ); "
                             "label into a new --out file instead of mixing them", path=path, field="settings")
        prov = {**old, "datasets": sorted(set(old.get("datasets", [])) | {str(dataset)})}
    elif out.exists() and already_labelled(out):
        print(f"note: {out} has labels without provenance; recording the current settings for what follows")
        prov["note"] = "labels written before this file existed have unrecorded settings"
    prov.update(updated_at=now, packages=package_versions(), machine=machine_info())
    atomic_write_text(path, json.dumps(prov, indent=1, ensure_ascii=False) + "\n")


@app.command("split-labels")
def split_labels_cmd(
    labels: Path = typer.Option(..., "--labels", "-l", help="label file from `expertrag label`"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the splits (fold<i>/train<i>, or PREFIX_NAME.jsonl)"),
    folds: int | None = typer.Option(None, "--folds", help="number of folds (cross-fitting: train on train<i>, "
                                                           "test on fold<i>); the default mode, with 2 folds"),
    splits: str | None = typer.Option(None, "--splits", help="fixed named splits instead of folds, e.g. "
                                      "train=0.6,dev=0.2,test=0.2: each question's split is a seeded hash of its "
                                      "id, so a growing label file never moves a question"),
    prefix: str = typer.Option("labels", "--prefix", help="with --splits: files are OUT/PREFIX_NAME.jsonl"),
    seed: int = typer.Option(0, "--seed", help="hash seed of the assignment"),
    questions: Path | None = typer.Option(None, "--questions", "-q",
                                          help="question file the labels came from: also write the held-out "
                                               "questions with gold answers (fold<i>.questions.jsonl, or "
                                               "PREFIX_NAME.questions.jsonl) for `expertrag eval`"),
) -> None:
    """Split labels into stratified folds or fixed named splits, so gates are evaluated on unseen questions."""
    import re

    from expertrag.errors import InputError
    from expertrag.fileio import atomic_write_bytes
    from expertrag.gate.labels import parse_splits, read_labels, split_fixed, split_folds, write_labels

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", prefix):
        raise InputError(f"--prefix must be a plain file-name stem (letters, digits, . _ -), got {prefix!r}")
    if splits is not None and folds is not None:
        raise InputError("give --folds or --splits, not both")
    shares = parse_splits(splits) if splits is not None else None
    if shares is None and (folds if folds is not None else 2) < 2:
        raise InputError("--folds must be at least 2")
    records = read_labels(labels)
    by_id = {}
    if questions is not None:
        from expertrag.data.questions import load_questions

        by_id = {q.id: q for q in load_questions(questions)}
        missing = [r.id for r in records if r.id not in by_id]
        if missing:
            raise InputError(f"{len(missing)} labelled ids are not in the question file (first: {missing[0]!r})",
                             path=questions)
    out.mkdir(parents=True, exist_ok=True)

    def write_questions(path: Path, part) -> None:
        rows = [{"id": q.id, "question": q.question, "golden_answers": q.golden_answers, "metadata": q.metadata}
                for q in (by_id[r.id] for r in part)]
        atomic_write_bytes(path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows).encode())

    all_labels = sorted({r.label for r in records})
    source_prov = provenance_path(labels)
    prov = None
    if source_prov.is_file():
        try:
            prov = json.loads(source_prov.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"unreadable provenance of the labels: {e}", path=source_prov) from None

    def write_part(path: Path, part, what: str) -> None:
        write_labels(path, part)
        if prov is not None:  # a split's labels were made with its source's settings: `train gate` reads them
            atomic_write_bytes(provenance_path(path), (json.dumps(
                {**prov, "split_of": str(labels), "split": what, "split_seed": seed}, indent=1,
                ensure_ascii=False) + "\n").encode())

    def counts(part) -> str:
        return ", ".join(f"{lab} {sum(r.label == lab for r in part)}" for lab in all_labels)

    if shares is not None:
        parts = split_fixed(records, shares, seed)
        for name, part in parts.items():
            write_part(out / f"{prefix}_{name}.jsonl", part, name)
            if by_id:
                write_questions(out / f"{prefix}_{name}.questions.jsonl", part)
            share = len(part) / len(records) if records else 0.0
            print(f"{prefix}_{name}: {len(part)} ({share:.1%}; target {shares[name]:.0%}): {counts(part)}")
        return
    for i, part in enumerate(split_folds(records, folds or 2, seed)):
        held = {r.id for r in part}
        write_part(out / f"fold{i}.jsonl", part, f"fold{i}")
        write_part(out / f"train{i}.jsonl", [r for r in records if r.id not in held], f"train{i}")
        if by_id:
            write_questions(out / f"fold{i}.questions.jsonl", part)
        print(f"fold{i}: {len(part)} held out ({counts(part)}); train{i}: {len(records) - len(part)}")
