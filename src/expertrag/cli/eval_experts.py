"""`expertrag eval-experts`: routing accuracy, retrieval within the routed domain vs global, utilisation
(eval/expert_routing.py). Scores only questions the router was not trained on."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from expertrag.cli import eval_common as ec
from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig
from expertrag.errors import InputError


@app.command("eval-experts")
def eval_experts_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="index with experts (`expert add`) and a router "
                                                          "(`train router`)"),
    dataset: list[Path] = typer.Option(..., "--dataset", "-d", help="labelled question file (metadata.domain, "
                                                                    "metadata.gold_passage_ids); repeatable"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: experts.json, experts.md, confusion PNGs"),
    limit: int | None = typer.Option(None, "--limit", help="held-out questions scored (seeded sample)"),
    seed: int = typer.Option(0, "--seed", help="sampling seed of --limit"),
    llm_limit: int = typer.Option(0, "--llm-limit", help="questions for the prompted-LLM baseline (~1 s each; "
                                                         "0 = skip it)"),
    answers: int = typer.Option(0, "--answers", help="also answer this many held-out questions end to end, "
                                                     "routed and unrouted (slow)"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config"),
    backend: str | None = typer.Option(None, "--backend", help=ec.BACKEND_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the headline figures as JSON on the last line"),
) -> None:
    """Evaluate domain routing on held-out labelled questions: fast, two-layer, kNN and LLM routers."""
    from expertrag.data.questions import load_questions
    from expertrag.eval import expert_routing as er
    from expertrag.eval.results import write_json
    from expertrag.eval.sampling import select_questions
    from expertrag.experts.registry import ExpertRegistry
    from expertrag.experts.router import load_router, router_dir
    from expertrag.experts.router_train import held_out
    from expertrag.fileio import atomic_write_text
    from expertrag.retrieval.index import Index

    for name, v in (("--limit", limit), ("--llm-limit", llm_limit), ("--answers", answers)):
        if v is not None and v < (1 if name == "--limit" else 0):
            raise InputError("must be positive" if name == "--limit" else "must not be negative", field=name)
    if out.exists() and not out.is_dir():
        raise InputError("names an existing file; give a folder", path=out, field="--out")
    config = ec.with_backend(ExpertRAGConfig.load(config_path), backend)
    idx = Index(index, config.retrieval)
    snapshot = ExpertRegistry(index).snapshot()
    if not snapshot.domain_experts:
        raise InputError("no active domain expert; run `expertrag expert add --index ... --from-domains`",
                         path=index)
    model = load_router(router_dir(index))
    if model is None:
        raise InputError("no router; run `expertrag train router --index ... --dataset ...`", path=index)
    log = (lambda m: print(m, file=sys.stderr)) if as_json else print
    trained = set(model.info.get("trained_ids") or [])
    questions, train_pairs, excluded = [], [], 0
    for path in dataset:
        qs = load_questions(path)
        for q in qs:
            if not isinstance(q.metadata.get("domain"), str):
                raise InputError(f"question {q.id!r} has no domain label", path=path, field="metadata.domain")
        if model.info.get("source") == "questions":
            train_pairs += [(q.question, q.metadata["domain"]) for q in qs if q.id in trained]
            # never score a question the router trained on, nor one of its split's training side
            keep = [q for q in qs if q.id not in trained and held_out(q.id, int(model.info.get("seed", 0)),
                                                                       float(model.info.get("holdout", 1.0)))]
        else:
            keep = list(qs)
        excluded += len(qs) - len(keep)
        questions += keep
    if limit:
        questions = select_questions(questions, limit, seed, "eval-experts")
    if not questions:
        raise InputError("no held-out question left to score (all were used to train the router)")
    log(f"{len(questions)} held-out questions ({excluded} excluded: the router's training split)")
    test = er.labelled(questions)
    llm = None
    generator = None
    if llm_limit or answers:
        from expertrag.pipeline.build import load_generator

        generator = load_generator(config)
        llm = (lambda texts, domains: er.llm_predict(generator, texts, domains)) if llm_limit else None
    result = er.evaluate_experts(idx, snapshot, model, test, train_pairs, llm=llm, llm_limit=llm_limit, log=log)
    if answers:
        from expertrag.pipeline.build import load_pipeline

        # policy "always": the comparison is of evidence (routed vs global), so every question retrieves
        routed = load_pipeline(index, config, "always", generator=generator)
        plain = load_pipeline(index, config, "always", generator=generator)
        plain.experts = None  # the same pipeline without routing: one global index
        sample = select_questions(test, answers, seed, "answers")
        result["answers"] = er.answer_quality(routed, plain, sample)
    result["router_info"] = {k: v for k, v in model.info.items() if k != "trained_ids"}
    result["excluded_training_questions"] = excluded
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "experts.json")
    for s in result["routers"]:
        er.plot_confusion(s, out / f"confusion_{s['router']}.png")
    atomic_write_text(out / "experts.md", er.render_markdown(result))
    two = next(s for s in result["routers"] if s["router"] == "two-layer")
    headline = {
        "questions": len(test), "routing_accuracy": two["accuracy"], "routing_macro_accuracy": two["macro_accuracy"],
        "routing_macro_f1": two["macro_f1"], "fast_layer_share": two["fast_layer_share"],
        "recall_at_5_routed": result["retrieval"]["routed"]["recall_at_5"],
        "recall_at_5_global": result["retrieval"]["global"]["recall_at_5"],
        **{f"{s['router']}_accuracy": s["accuracy"] for s in result["routers"] if s["router"] != "two-layer"},
    }
    if "answers" in result:
        headline["refine_share_of_answer_time"] = result["answers"]["refine_share_of_answer_time"]
    if not as_json:
        print(er.render_markdown(result))
        print(f"wrote {out}/experts.json, experts.md and confusion_*.png")
        return
    from expertrag.cli.index import dumps

    print(dumps(headline))
