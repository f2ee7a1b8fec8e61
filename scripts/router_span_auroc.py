"""Router statistics over the whole closed-book prompt vs the question's own tokens, as gate signals (issue 14).

For each labelled question the MoE model drafts a closed-book probe (pipeline.probe_tokens) and reports its
router statistics twice: over every prompt token (template included: `retrieval_affinity`, `router_entropy`,
`router_agreement`, what the router policy was tuned on) and over the question's tokens only (`q_*`). Each
statistic's AUROC as a score for "retrieve" is reported with a bootstrap 95% interval against two targets:
- the labels' need (`label`; both_wrong counts as retrieve, as in eval-gates), made by the dense model;
- the MoE model's own knowledge: its probe draft contains a gold answer (`moe_knows`; AUROC for not knowing).
AUROC < 0.5 means the statistic ranks the other way (a learned gate can use either direction).

    python scripts/router_span_auroc.py LABELS QUESTIONS INDEX CONFIG OUT [N] [THREADS]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STATS = ("retrieval_affinity", "router_entropy", "router_agreement")


def main(labels: str, questions: str, index: str, config_path: str, out: str, n: int = 0, threads: int = 1
         ) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from expertrag.answers import contains_answer
    from expertrag.classification import auroc
    from expertrag.config import ExpertRAGConfig
    from expertrag.data.questions import load_questions
    from expertrag.eval.gate_quality import auroc_interval
    from expertrag.gate.features import probe_features
    from expertrag.gate.labels import read_labels, target
    from expertrag.pipeline.build import load_pipeline

    config = ExpertRAGConfig.load(Path(config_path))
    golds = {q.id: q.golden_answers for q in load_questions(questions)}
    records = list(read_labels(labels))
    records = records[:n] if n else records
    rag = load_pipeline(index, config, "never")
    rows, t = [], time.perf_counter()
    for i, r in enumerate(records):
        p = rag.probe(r.question)
        f = probe_features(p)
        rows.append({"id": r.id, "label": r.label, "need": target(r.label, "retrieve"),
                     "moe_knows": bool(contains_answer(p.text, golds[r.id])), "draft": p.text,
                     **{k: f.get(k) for k in STATS}, **{f"q_{k}": f.get(f"q_{k}") for k in STATS}})
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{len(records)} probed, {(time.perf_counter() - t) / (i + 1):.2f} s/question",
                  file=sys.stderr, flush=True)
    seconds = (time.perf_counter() - t) / max(len(rows), 1)

    def auc(y: np.ndarray, s: np.ndarray) -> dict:
        # y = 1: should retrieve; auroc_interval reads the same as records of label and score
        ci = auroc_interval([{"label": "retrieve" if a else "no_retrieve", "score": b} for a, b in zip(y, s, strict=True)])
        return {"auroc": round(float(auroc(y, s)), 3), "ci95": [round(v, 3) for v in ci] if ci else None}

    summary = {"labels": labels, "config": config_path, "checkpoint": config.model.checkpoint,
               "questions": len(rows), "threads": threads, "s_per_question": round(seconds, 3),
               "label_retrieve_rate": float(np.mean([x["need"] for x in rows])),
               "moe_knows_rate": float(np.mean([x["moe_knows"] for x in rows])), "auroc": {}}
    for name in (*STATS, *(f"q_{k}" for k in STATS)):
        ok = [x for x in rows if x[name] is not None]
        if not ok:
            continue
        s = np.asarray([x[name] for x in ok], dtype=float)
        summary["auroc"][name] = {
            "mean": round(float(s.mean()), 4),
            "label_need": auc(np.asarray([x["need"] for x in ok], dtype=int), s),
            "moe_does_not_know": auc(np.asarray([not x["moe_knows"] for x in ok], dtype=int), s)}
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    with open(o / "questions.jsonl", "w", encoding="utf-8") as f:
        for x in rows:
            f.write(json.dumps(x) + "\n")
    (o / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) < 5:
        sys.exit(__doc__)
    main(*a[:5], *(int(v) for v in a[5:7]))
