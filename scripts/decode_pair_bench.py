"""Two decoding processes side by side against one alone, without Ray: the control for `bench serve
--ray-replicas 1,2`, where two pipeline replicas on a 2-core box each ran at well under half the speed of one.

    OMP_NUM_THREADS=1 python scripts/decode_pair_bench.py INDEX QUESTIONS [BATCHES] [BATCH_SIZE]

Each worker is a fresh process (1 torch thread) that loads the pipeline (policy never: closed-book, as the
serve bench), warms up, waits for a shared start time, then answers BATCHES batches of BATCH_SIZE questions
with `ExpertRAG.answer_many`, the call a replica's engine makes. Runs: one worker alone, then two at once,
then one alone again (against drift). Reported: seconds per batch, and the pair's per-batch time over the
single's (1.0: two cores, no interference; 2.0: the pair shares one core's worth).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean


def worker(index: str, questions: str, batches: int, size: int, start_at: float) -> None:
    import torch

    from expertrag.bench.serve import uncached_pipeline
    from expertrag.data.questions import load_questions
    from expertrag.pipeline.rag import AnswerRequest

    torch.set_num_threads(1)
    rag = uncached_pipeline(Path(index), "never", max_tokens=16)
    qs = [q.question for q in load_questions(Path(questions))]
    rag.answer_many([AnswerRequest(q) for q in qs[:size]])  # warm-up
    time.sleep(max(0.0, start_at - time.time()))
    times = []
    for b in range(batches):
        batch = [AnswerRequest(qs[(b * size + i) % len(qs)]) for i in range(size)]
        t = time.perf_counter()
        for a in rag.answer_many(batch):
            if isinstance(a, Exception):
                raise a
        times.append(time.perf_counter() - t)
    print(json.dumps({"pid": os.getpid(), "batch_s": times}))


def run(n_workers: int, args: list[str]) -> list[float]:
    start_at = time.time() + 60  # every worker loaded and warmed up by then (a load is ~10 s here)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", *args, str(start_at)], stdout=subprocess.PIPE,
                              text=True) for _ in range(n_workers)]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
        out.extend(json.loads(stdout.strip().splitlines()[-1])["batch_s"])
    return out


def main() -> None:
    if sys.argv[1] == "--worker":
        index, questions, batches, size, start_at = sys.argv[2:7]
        worker(index, questions, int(batches), int(size), float(start_at))
        return
    index, questions = sys.argv[1], sys.argv[2]
    batches = sys.argv[3] if len(sys.argv) > 3 else "6"
    size = sys.argv[4] if len(sys.argv) > 4 else "2"
    args = [index, questions, batches, size]
    single1 = run(1, args)
    pair = run(2, args)
    single2 = run(1, args)
    single = fmean(single1 + single2)
    print(json.dumps({"batches": int(batches), "batch_size": int(size), "threads": 1, "cpus": os.cpu_count(),
                      "load_average_1m": os.getloadavg()[0],
                      "single_batch_s": single, "pair_batch_s": fmean(pair),
                      "pair_over_single": fmean(pair) / single,
                      "single_runs_s": [single1, single2], "pair_s": pair}, indent=1))


if __name__ == "__main__":
    main()
