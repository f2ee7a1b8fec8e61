"""`expertrag eval-policy`: the policy expert's catch rate on sensitive questions and its false-trigger
rate on ordinary ones (RESULTS.md, "Policy expert")."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig


@app.command("eval-policy")
def eval_policy_cmd(
    dataset: list[Path] = typer.Option(..., "--dataset", "-d", help="question file (repeatable); rows with "
                                       "metadata.sensitive: true count towards the catch rate, the others "
                                       "towards the false-trigger rate"),
    config_path: Path = typer.Option(..., "--config", help="YAML config with the `policy:` rules"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="first N questions of each file"),
    sample: int | None = typer.Option(None, "--sample", min=1, help="N questions of each file drawn at random "
                                      "(seeded; files sorted by domain need this rather than --limit)"),
    seed: int = typer.Option(0, "--seed", help="seed of --sample"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write the report as JSON here"),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """Screen question files with the policy expert (no model, no audit entries) and report both rates."""
    from expertrag.data.questions import load_questions
    from expertrag.errors import InputError
    from expertrag.experts.policy import PolicyExpert, screening_report
    from expertrag.fileio import atomic_write_json
    from expertrag.retrieval.embedder import Embedder

    config = ExpertRAGConfig.load(config_path)
    if not config.policy.active:
        raise InputError("no policy rules in this config (section `policy:` is empty)", path=config_path)
    embedder = Embedder(config.retrieval.embedder, config.retrieval.embed_batch_size, config.retrieval.embed_backend)
    expert = PolicyExpert(config.policy, embedder)
    report = {"config": str(config_path), "datasets": {}}
    for path in dataset:
        questions = load_questions(path)[:limit]
        if sample is not None and sample < len(questions):
            import random

            questions = random.Random(seed).sample(questions, sample)
        report["datasets"][str(path)] = screening_report(expert, questions)
    if out is not None:
        atomic_write_json(out, report)
    if as_json:
        print(json.dumps(report, ensure_ascii=False))
        return
    for path, r in report["datasets"].items():
        print(f"{path}: {r['questions']} questions ({r['sensitive']} sensitive, {r['ordinary']} ordinary), "
              f"{r['ms_per_question']:.1f} ms each")
        if r["sensitive"]:
            print(f"  catch rate {r['catch_rate']:.3f} (right rule {r['right_rule_rate']:.3f}, right action "
                  f"{r['right_action_rate']:.3f}; topic questions the classifier alone flags: "
                  f"{r['topic_classifier_catch_rate']})")
            for m in r["missed"]:
                print(f"    missed {m['id']} ({m['expected_rule']}): {m['text']}")
        if r["ordinary"]:
            print(f"  false-trigger rate {r['false_trigger_rate']:.3f} {r['false_triggers_by_rule']}")
            for e in r["false_trigger_examples"]:
                print(f"    {e['id']} -> {e['action']} {e['rules']}: {e['text']}")
