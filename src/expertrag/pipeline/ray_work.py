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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from expertrag.data.types import Question
from expertrag.errors import ExpertRAGError, InputError
from expertrag.gate.labels import LabelRecord

WORKER_RESTARTS = 2  # a worker that dies is restarted (and its batch retried) this many times, then the run fails
IN_FLIGHT_PER_WORKER = 2  # one batch running, one queued: an actor never waits on the driver between batches


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


def _unwrap(e: Exception) -> Exception:
    """A user error raised inside a worker, as itself (Ray wraps it with the remote traceback)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, ExpertRAGError) else e


def ordered_results(actors: Sequence[Any], method: str, jobs: Sequence[Any]) -> Iterator[Any]:
    """Yield `getattr(actor, method).remote(job)` for every job, in job order, whichever actor did it:
    free actors take the next job (load balance across uneven batches), finished results wait in a buffer
    until all before them are out. A worker that died more often than its restarts allow ends the run."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    pending: dict[Any, tuple[int, Any]] = {}  # ref -> (job number, actor)
    done: dict[int, Any] = {}
    idle = [a for a in actors for _ in range(IN_FLIGHT_PER_WORKER)]
    next_job, next_out = 0, 0
    while next_out < len(jobs):
        while idle and next_job < len(jobs):
            actor = idle.pop(0)
            pending[getattr(actor, method).remote(jobs[next_job])] = (next_job, actor)
            next_job += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        number, actor = pending.pop(ref)
        try:
            done[number] = ray.get(ref)
        except RayTaskError as e:
            err = _unwrap(e)
            if err is not e:
                raise err from None
            raise
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            if getattr(e, "actor_init_failed", False):  # its constructor raised: not retried, Ray keeps the text only
                lines = [x.strip() for x in str(e).splitlines() if x.strip()]
                raise ExpertRAGError(f"a Ray worker could not start: {lines[-1] if lines else e}") from None
            raise ExpertRAGError(f"a Ray worker died more than {WORKER_RESTARTS} times (last on job {number}); "
                                 f"results before it are kept: {str(e).splitlines()[0]}") from None
        idle.append(actor)
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1


def start_workers(cls: type, n: int, threads: int, *args: Any) -> list[Any]:
    import ray

    remote = ray.remote(num_cpus=threads, max_restarts=WORKER_RESTARTS, max_task_retries=WORKER_RESTARTS)(cls)
    return [remote.remote(*args) for _ in range(n)]


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
