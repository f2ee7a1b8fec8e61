"""End-to-end evaluation of retrieval policies: every policy answers the same questions, one JSON result.

`evaluate(rag_factory, questions, policies, ...)` asks `rag_factory(policy)` for one `ExpertRAG` per policy
(they should share the index and the generator) and answers each question with each of them. Answers are
never served from a cache (the runner switches the answer and retrieval caches of the pipelines it gets
off), so every policy pays for its own work. With `interleave` (the default) each question is answered by
every policy in turn, in an order rotated per question, so load from other jobs on a shared machine falls
on all policies alike; the first `warmup` questions are answered once untimed per policy beforehand.

Each answer becomes a record (eval.records); the aggregates (eval.aggregate: per policy, per dataset, per
group, gate quality and threshold sweep) are computed from the records, so `eval.merge` can pool runs.

Context dilution (`k_sweep`): `always` is answered again with pipeline.k = each k (the run at the
pipeline's own k is reused); its records are kept beside the policies' (policy `always@k=K`, field `k`).
Everything goes into one JSON-safe dict (NaN -> null) with the config, package versions, sha256 of each
dataset file, the seed and the machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tqdm.auto import tqdm

from expertrag.data.types import Question
from expertrag.errors import ExpertRAGError, InputError
from expertrag.eval.aggregate import aggregate, split_by, summarize, summary_options
from expertrag.eval.config import EvalConfig
from expertrag.eval.provenance import machine_info, package_versions
from expertrag.eval.records import error_record, group_of, question_record
from expertrag.eval.results import FORMAT, VERSION, json_safe
from expertrag.eval.sampling import as_datasets, select_questions
from expertrag.fileio import sha256_file
from expertrag.gate.labels import LabelRecord
from expertrag.gate.models import GateArtifactError
from expertrag.gate.requirements import BackendCapabilityError


def _quiet_caches(rag: Any) -> Any:
    for attr in ("answer_cache", "retrieval_cache"):
        if getattr(rag, attr, None) is not None:
            setattr(rag, attr, None)
    return rag


def _build(rag_factory: Callable[[str], Any], policy: str) -> tuple[Any, str | None]:
    """(pipeline, None), or (None, reason) when the policy's gate artifacts are missing or corrupt. Any
    other error building a policy is a bug and propagates: it must not become a "skipped" line."""
    try:
        return _quiet_caches(rag_factory(policy)), None
    except (GateArtifactError, BackendCapabilityError) as e:  # artifacts missing, or a backend lacking a signal
        return None, f"{type(e).__name__}: {e}"


def _k(rag: Any) -> int | None:
    """The passages per retrieval a pipeline is configured with (None for one without a config)."""
    k = getattr(getattr(rag, "config", None), "k", None)
    return int(k) if k is not None else None


def evaluate(rag_factory: Callable[[str], Any],
             questions: Mapping[str, Sequence[Question]] | Sequence[Question],
             policies: Sequence[str], *, labels: Mapping[str, LabelRecord] | None = None,
             limit: int | None = None, seed: int = 0, progress: bool | None = None,
             k_sweep: Sequence[int] = (), groups: Mapping[str, str] | None = None,
             settings: EvalConfig | None = None, files: Mapping[str, str | os.PathLike[str]] | None = None,
             config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Answer `questions` (one list per dataset name, or one list) with every policy; see the module doc.

    rag_factory(policy) -> ExpertRAG; a policy it cannot build for missing or corrupt gate artifacts
    (GateArtifactError) or that fails on a question with an ExpertRAGError other than InputError (a
    condition the user can act on, e.g. the router policy on a model without a retrieval expert) is
    reported under `skipped` with the reason, and the others go on. Any other exception is a bug and
    propagates. An InputError on one question is recorded as that question's
    error. `labels` maps question id -> LabelRecord; `groups` maps question id -> group name (default:
    from the labels, see `group_of`); `files` maps dataset name -> its file (hashed); `config` is stored.
    """
    plan = plan_eval(questions, policies, labels=labels, limit=limit, seed=seed, k_sweep=k_sweep, groups=groups,
                     settings=settings)
    runs, dilution_runs, skipped = build_runs(rag_factory, plan.policies, plan.ks)
    records = answer_items(runs, plan.items, plan.labels, plan.groups, plan.settings, skipped, progress=progress)
    return assemble(plan, records, dilution_runs, skipped, files=files, config=config)


@dataclass
class EvalPlan:
    """What `evaluate` answers, settled before any model is touched (the Ray run ships it to its workers)."""

    settings: EvalConfig
    started: float
    labels: dict[str, LabelRecord]
    given: dict[str, Sequence[Question]]
    datasets: dict[str, list[Question]]
    groups: dict[str, str]
    items: list[tuple[str, Question]]
    policies: list[str]
    ks: list[int]
    seed: int
    limit: int | None


def plan_eval(questions: Mapping[str, Sequence[Question]] | Sequence[Question], policies: Sequence[str], *,
              labels: Mapping[str, LabelRecord] | None = None, limit: int | None = None, seed: int = 0,
              k_sweep: Sequence[int] = (), groups: Mapping[str, str] | None = None,
              settings: EvalConfig | None = None) -> EvalPlan:
    settings = settings or EvalConfig()
    started = time.perf_counter()
    labels = dict(labels or {})
    given = as_datasets(questions)
    datasets = {name: select_questions(qs, limit, seed, name) for name, qs in given.items()}
    grp = dict(groups) if groups is not None else {i: g for i, r in labels.items() if (g := group_of(r))}
    items = [(ds, q) for ds, qs in datasets.items() for q in qs]
    policies = list(dict.fromkeys(policies))
    if not policies:
        raise ValueError("no policies to evaluate")
    ks = sorted({int(k) for k in k_sweep})
    if any(k <= 0 for k in ks):
        raise ValueError(f"k_sweep needs positive k, got {list(k_sweep)}")
    return EvalPlan(settings, started, labels, given, datasets, grp, items, policies, ks, seed, limit)


def build_runs(rag_factory: Callable[[str], Any], policies: Sequence[str],
               ks: Sequence[int]) -> tuple[dict[str, Any], dict[int, str], dict[str, str]]:
    """(run name -> pipeline, dilution k -> run name, skipped run -> reason)."""
    skipped: dict[str, str] = {}
    runs: dict[str, Any] = {}
    for p in policies:
        rag, why = _build(rag_factory, p)
        if rag is None:
            skipped[p] = why or "unknown error"
        else:
            runs[p] = rag
    dilution_runs: dict[int, str] = {}  # k -> run name
    for k in ks:
        if "always" in runs and runs["always"].config.k == k:
            dilution_runs[k] = "always"
            continue
        rag, why = _build(rag_factory, "always")
        if rag is None:
            skipped[f"always@k={k}"] = why or "unknown error"
            continue
        rag.config = rag.config.model_copy(update={"k": k})
        dilution_runs[k] = f"always@k={k}"
        runs[f"always@k={k}"] = rag
    return runs, dilution_runs, skipped


def answer_items(runs: dict[str, Any], items: Sequence[tuple[str, Question]], labels: Mapping[str, LabelRecord],
                 grp: Mapping[str, str], settings: EvalConfig, skipped: dict[str, str], *,
                 progress: bool | None = None, offset: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Every run answers every item (warm-up first); run name -> records in item order. A run failing with
    an ExpertRAGError is dropped from `runs` and its reason put in `skipped`. `offset` is the first item's
    position in the whole evaluation, so a shard of it (the Ray run) rotates the policies as one run would."""
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}

    def fail(name: str, err: Exception) -> None:
        skipped[name] = f"{type(err).__name__}: {err}"
        runs.pop(name, None)
        records.pop(name, None)

    for name in list(runs):  # untimed warm-up: lazy loads, first allocations
        for _ds, q in items[:settings.warmup]:
            try:
                runs[name].answer(q.question, metadata=dict(q.metadata))
            except InputError:
                continue
            except ExpertRAGError as e:
                fail(name, e)
                break

    def answer(name: str, ds: str, q: Question) -> None:
        rag = runs.get(name)
        if rag is None:
            return
        try:
            a = rag.answer(q.question, metadata=dict(q.metadata))
        except InputError as e:
            records[name].append(error_record(q, ds, name, e))
            return
        except ExpertRAGError as e:
            fail(name, e)
            return
        records[name].append(question_record(a, q, ds, name, labels.get(q.id), grp.get(q.id), _k(rag)))

    names = list(runs)
    bar = tqdm(total=len(items) * len(names), desc="eval", unit="answer",
               disable=None if progress is None else not progress)
    if settings.interleave:
        for i, (ds, q) in enumerate(items, offset):
            for j in range(len(names)):
                answer(names[(i + j) % len(names)], ds, q)
                bar.update(1)
    else:
        for name in names:
            for ds, q in items:
                answer(name, ds, q)
                bar.update(1)
    bar.close()
    return records


def assemble(plan: EvalPlan, records: dict[str, list[dict[str, Any]]], dilution_runs: Mapping[int, str],
             skipped: dict[str, str], *, files: Mapping[str, str | os.PathLike[str]] | None = None,
             config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The result dict from the records of every run (see the module doc)."""
    settings, policies, labels, given, datasets = plan.settings, plan.policies, plan.labels, plan.given, plan.datasets
    seed, limit, ks, started = plan.seed, plan.limit, plan.ks, plan.started
    results, summary = aggregate(records, policies, settings, skipped)
    agg = summary_options(settings)
    dilution = {}
    for k, name in dilution_runs.items():
        if name not in records:
            continue
        s = summarize(records[name], **agg)
        dilution[str(k)] = {
            "accuracy": s["accuracy"], "em": s["em"], "f1": s["f1"], "n": s["n"],
            "latency_ms_mean": s["latency_ms_mean"], "mean_prompt_tokens": s["mean_prompt_tokens"],
            "datasets": {ds: summarize(rs, **agg)["accuracy"] for ds, rs in split_by(records[name], "dataset").items()},
        }

    # every answer is kept: the policies' records, then each dilution run's (tagged with its k)
    extra = [name for _, name in sorted(dilution_runs.items()) if name not in policies and name in records]
    out_records = [r for p in [*policies, *extra] if p in records for r in records[p]]
    return json_safe({
        "format": FORMAT, "version": VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": seed, "limit": limit, "policies": policies, "k_sweep": ks,
        "settings": settings.model_dump(mode="json"), "config": dict(config or {}),
        "datasets": {ds: {"questions": len(given[ds]), "evaluated": len(qs),
                          "labelled": sum(q.id in labels for q in qs),
                          **({"path": str(files[ds]), "sha256": sha256_file(files[ds])}
                             if files and ds in files else {})}
                     for ds, qs in datasets.items()},
        "packages": package_versions(), "machine": machine_info(),
        "summary": summary, "results": results, "skipped": skipped, "context_dilution": dilution,
        "records": out_records, "duration_s": time.perf_counter() - started,
    })
