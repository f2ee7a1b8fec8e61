"""Time per question of gate-training feature extraction, before and after issue 14, on the first N labels.

before: one context and one unbatched probe per question (what `train gate` did: search, embedding and a
        probe with its hidden state, one question at a time);
traces: batched contexts, probe features read off the labels' closed-book traces (`trace_reuse`);
batched: batched contexts and batched probes with hidden states (a gate with gate.use_hidden).
samples: 5 sampled drafts per question (gate.sample_consistency: 5) on 20 questions, alone (answer time,
one batch of 5) and packed for training, against one greedy probe alone. Also checks that the trace-read probe features equal the recomputed ones.

    python scripts/gate_feature_timing.py LABELS INDEX CONFIG [N] [THREADS]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(labels: str, index: str, config_path: str, n: int = 50, threads: int = 1) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from expertrag.cli.train import label_provenance, model_description
    from expertrag.config import ExpertRAGConfig
    from expertrag.gate.features import probe_features
    from expertrag.gate.labels import read_labels
    from expertrag.pipeline.build import load_pipeline
    from expertrag.pipeline.labeling import gate_examples, trace_reuse
    from expertrag.pipeline.rag import PipelineGateContext

    config = ExpertRAGConfig.load(Path(config_path))
    records = [r for r in read_labels(labels) if r.closed_trace is not None][:n]
    rag = load_pipeline(index, config, "never")
    rag.probe(records[0].question)  # warm-up (lazy loads) outside the timings
    PipelineGateContext(rag, records[0].question, {}, None).query_features()

    t = time.perf_counter()
    before = []
    for r in records:
        ctx = PipelineGateContext(rag, r.question, dict(r.metadata), None)
        before.append((ctx.query_features(), probe_features(ctx.probe())))
    t_before = time.perf_counter() - t

    mnt, why = trace_reuse(rag, model_description(config), label_provenance(Path(labels)))
    st_traces: dict = {}
    ex = gate_examples(rag, records, gate=config.gate, trace_max_new_tokens=mnt, stats=st_traces, progress=False)
    st_batched: dict = {}
    gate_examples(rag, records, gate=config.gate.model_copy(update={"use_hidden": True}), stats=st_batched,
                  progress=False)
    qs = [r.question for r in records[:20]]
    t = time.perf_counter()
    for q in qs:
        rag.sample_drafts([q], 5, 0.7, 0)  # answer time: one question's 5 samples, one batch of 5
    t_samples_alone = (time.perf_counter() - t) / len(qs)
    t = time.perf_counter()
    probes_alone = [rag.probe(q) for q in qs]
    t_probe_alone = (time.perf_counter() - t) / len(qs)
    st_samples: dict = {}
    gate_examples(rag, records[:20], gate=config.gate.model_copy(update={"sample_consistency": 5}),
                  trace_max_new_tokens=mnt, stats=st_samples, progress=False)
    del probes_alone
    diffs = [max(abs(e.probe_features[k] - b[1][k]) for k in b[1]) for e, b in zip(ex, before, strict=True)]
    same_tokens = sum(e.probe_features["draft_tokens"] == b[1]["draft_tokens"] for e, b in zip(ex, before, strict=True))
    print(json.dumps({
        "questions": len(records), "threads": threads, "trace_reuse": why or "yes",
        "before_s_per_question": t_before / len(records),
        "traces_s_per_question": st_traces["s_per_question"], "traces_stats": st_traces,
        "batched_hidden_s_per_question": st_batched["s_per_question"], "batched_stats": st_batched,
        "answer_time_probe_s": t_probe_alone, "answer_time_5_samples_s": t_samples_alone,
        "training_5_samples_s_per_question": st_samples["samples_s"] / 20,
        "probe_feature_max_abs_diff": float(np.max(diffs)), "probe_feature_median_abs_diff": float(np.median(diffs)),
        "same_draft_length": same_tokens,
    }, indent=1))


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(x) for x in sys.argv[4:6]))
