"""Labelling on Ray (`expertrag label --ray`, issue 17), and the ordered fan-out `eval --ray` shares.

Each worker is a Ray actor that loads the pipeline (index, embedder, model) once in its constructor and then
labels whole batches with `labeling.label_batch`, the function the single-process run calls. The driver cuts
the questions still to label into the same batches `label_questions` would (same composition, so batched
left-padded greedy decoding gives the same text), hands them to whichever actor is free, and appends the
records to the JSONL file itself, strictly in input order: a file written on Ray is the file written
without it, and a killed run resumes the same way (ids already in the file are skipped).

A worker process that dies (killed, out of memory, os._exit) is restarted by Ray (`max_restarts`: its
constructor runs again, so the model is loaded again) and the batch it held is sent again
(`max_task_retries`); batches are pure functions of their questions, so a retry cannot double-write: only
the driver writes, once per batch. Ray is imported only inside these functions, never at package import.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from expertrag.data.types import Question
from expertrag.errors import InputError
from expertrag.gate.labels import LabelRecord

# the ordered fan-out lives with the index build (the lowest layer that uses it); eval --ray imports it from here
from expertrag.retrieval.ray_build import (  # noqa: F401
    IN_FLIGHT_PER_WORKER,
    WORKER_RESTARTS,
    ordered_results,
    start_workers,
)


def check_workers(num_workers: int | None, threads_per_worker: int = 1) -> None:
    if num_workers is not None and num_workers < 1:
        raise InputError(f"--num-workers must be at least 1, got {num_workers}")
    if threads_per_worker < 1:
        raise InputError(f"threads per worker must be at least 1, got {threads_per_worker}")


class LabelWorker:
    """One pipeline per actor (policy `always`, as `expertrag label` loads it), torch on `threads` threads."""

    def __init__(self, index_dir: str, settings: Any, threads: int = 1):
        import torch

        from expertrag.pipeline.build import load_pipeline

        torch.set_num_threads(threads)  # a worker owns num_cpus=threads of the cluster, no more
        self.rag = load_pipeline(index_dir, settings, "always")

    def label(self, questions: list[Question]) -> list[LabelRecord]:
        from expertrag.pipeline.labeling import label_batch

        return label_batch(self.rag, questions)


def label_on_ray(index_dir: str | Path, settings: Any, questions: Sequence[Question], out: Path, *,
                 batch_size: int = 8, num_workers: int = 2, threads_per_worker: int = 1,
                 address: str | None = None, progress: bool | None = None,
                 worker: type = LabelWorker, on_batch: Callable[[int], None] | None = None) -> dict[str, int]:
    """`label_questions` with the batches labelled by `num_workers` actors; same file, same counts.
    `worker` is the actor class (a subclass may add behaviour, e.g. the fault test's crash)."""
    from tqdm.auto import tqdm

    from expertrag.pipeline.labeling import labelling_todo, open_for_append
    from expertrag.retrieval.ray_build import ray_session

    check_workers(num_workers, threads_per_worker)
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    todo = labelling_todo(questions, out)
    counts: dict[str, int] = {}
    if not todo:
        return counts
    batches = [list(todo[i:i + batch_size]) for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(todo), desc="label", unit="q", disable=None if progress is None else not progress)
    with ray_session(address, num_cpus=num_workers * threads_per_worker):
        # no more actors than batches: an idle actor would still load a model
        actors = start_workers(worker, min(num_workers, len(batches)), threads_per_worker,
                               str(Path(index_dir).resolve()), settings, threads_per_worker)
        with open_for_append(out) as f:
            for rows in ordered_results(actors, "label", batches):
                for record in rows:  # written exactly as label_questions writes them
                    counts[record.label] = counts.get(record.label, 0) + 1
                    f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
                f.flush()  # a batch is on disk before the next is waited for: resume loses at most the in-flight ones
                bar.update(len(rows))
                if on_batch is not None:
                    on_batch(len(rows))
    bar.close()
    return counts
