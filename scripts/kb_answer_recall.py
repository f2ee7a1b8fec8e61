"""Issue 15 part 2: does retrieval find each question's own fact in the knowledge slice's KB index?

    python scripts/kb_answer_recall.py INDEX TEST.jsonl [--k 2] [--mode hybrid]

For every question of TEST.jsonl (the mixed workload's test file, `knowledge_slice.py mixed`), split by
metadata.part: is a passage naming the subject and containing a gold answer (`expertrag.answers.contains_answer`,
the check every other layer uses) the top hit, or among the top k? This separates "retrieval missed" from "the model did not read what it got".
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from expertrag.answers import contains_answer
    from expertrag.data.questions import load_questions
    from expertrag.retrieval.index import Index

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("index")
    ap.add_argument("test")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--mode", default="hybrid", choices=["bm25", "dense", "hybrid"])
    args = ap.parse_args()
    idx = Index(args.index)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for q in load_questions(args.test):
        hits = idx.search(q.question, args.k, args.mode)
        subject = str(q.metadata.get("subject", "")).lower()
        found = [subject in (h.title + " " + h.contents).lower()
                 and contains_answer(h.contents, q.golden_answers) for h in hits]
        c = counts[str(q.metadata.get("part", "all"))]
        c[0] += 1
        c[1] += bool(found and found[0])
        c[2] += any(found)
    print(json.dumps({part: {"n": n, "recall@1": round(r1 / n, 3), f"recall@{args.k}": round(rk / n, 3)}
                      for part, (n, r1, rk) in sorted(counts.items())} | {"mode": args.mode, "k": args.k}))


if __name__ == "__main__":
    main()
