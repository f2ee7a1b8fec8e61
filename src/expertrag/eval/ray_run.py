"""`expertrag eval --ray` (issue 17): the questions fanned out to model actors, one evaluation result.

The driver settles everything that does not need a model (`runner.plan_eval`: sampling, groups, k sweep),
cuts the items into contiguous shards and sends them to actors. Each actor loads the index and the
generator once, builds every policy's pipeline around them (`pipeline.build.policy_factory`, as the
single-process `eval` does) and answers its shards with `runner.answer_items`, the single-process loop
(warm-up included, so each actor's own lazy loads stay out of the timings). The driver puts the records back
in item order and aggregates them with `runner.assemble`: the result has the same records and answers as
one process (greedy decoding; latencies are the actors' own). A policy that fails in any shard is skipped as
a whole, as one process would skip it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from expertrag.data.types import Question
from expertrag.eval.config import EvalConfig
from expertrag.gate.labels import LabelRecord

SHARDS_PER_WORKER = 4  # several shards per actor, so a slow shard does not leave the others idle


class EvalWorker:
    """One index + generator per actor; every policy's pipeline built once around them."""

    def __init__(self, index_dir: str, settings: Any, gate: str | None, plan: Any, threads: int = 1):
        import torch

        from expertrag.eval.runner import build_runs
        from expertrag.pipeline.build import policy_factory

        torch.set_num_threads(threads)
        self.plan = plan
        factory = policy_factory(index_dir, settings, gate)
        self.runs, self.dilution_runs, self.skipped = build_runs(factory, plan.policies, plan.ks)

    def answer(self, shard: tuple[int, list[tuple[str, Question]]]) -> tuple[dict, dict, dict]:
        from expertrag.eval.runner import answer_items

        offset, items = shard
        skipped = dict(self.skipped)
        records = answer_items(dict(self.runs), items, self.plan.labels, self.plan.groups, self.plan.settings,
                               skipped, progress=False, offset=offset)
        return records, skipped, self.dilution_runs


def evaluate_on_ray(index_dir: str | Path, settings: Any, gate: str | Path | None,
                    questions: Mapping[str, Sequence[Question]] | Sequence[Question], policies: Sequence[str], *,
                    labels: Mapping[str, LabelRecord] | None = None, limit: int | None = None, seed: int = 0,
                    progress: bool | None = None, k_sweep: Sequence[int] = (),
                    eval_settings: EvalConfig | None = None,
                    files: Mapping[str, str | os.PathLike[str]] | None = None, config: Mapping[str, Any] | None = None,
                    num_workers: int = 2, threads_per_worker: int = 1, address: str | None = None) -> dict[str, Any]:
    """`runner.evaluate` with the answering on `num_workers` actors; `settings` are the pipeline sections
    (the root config), `eval_settings` the eval section."""
    from tqdm.auto import tqdm

    from expertrag.eval.runner import assemble, plan_eval
    from expertrag.pipeline.ray_work import check_workers, ordered_results, start_workers
    from expertrag.retrieval.ray_build import ray_session

    check_workers(num_workers, threads_per_worker)
    plan = plan_eval(questions, policies, labels=labels, limit=limit, seed=seed, k_sweep=k_sweep,
                     settings=eval_settings)
    n = len(plan.items)
    size = max(1, -(-n // (num_workers * SHARDS_PER_WORKER)))
    shards = [(i, plan.items[i:i + size]) for i in range(0, n, size)] or [(0, [])]
    records: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    dilution_runs: dict[int, str] = {}
    failed: set[str] = set()
    bar = tqdm(total=n, desc="eval", unit="q", disable=None if progress is None else not progress)
    with ray_session(address, num_cpus=num_workers * threads_per_worker):
        # absolute paths: on a cluster joined with --address a worker does not start in the driver's directory
        actors = start_workers(EvalWorker, min(num_workers, len(shards)), threads_per_worker,
                               str(Path(index_dir).resolve()), settings,
                               str(Path(gate).resolve()) if gate is not None else None, plan, threads_per_worker)
        for (_, items), (part, part_skipped, part_dilution) in zip(shards, ordered_results(actors, "answer", shards),
                                                                   strict=True):
            for name, why in part_skipped.items():
                skipped.setdefault(name, why)  # the first shard's reason, as one process reports its first
                failed.add(name)
            for name, rs in part.items():
                records.setdefault(name, []).extend(rs)
            dilution_runs = dilution_runs or dict(part_dilution)
            bar.update(len(items))
    bar.close()
    for name in failed:
        records.pop(name, None)
    # the runs in the order one process builds them (policies, then the dilution runs by k)
    order = [*plan.policies, *(f"always@k={k}" for k in plan.ks)]
    records = {name: records[name] for name in order if name in records}
    return assemble(plan, records, dilution_runs, skipped, files=files, config=config)
