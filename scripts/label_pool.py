"""Write the labelling pool of issue 14: every shared question set, de-duplicated, in a seeded random order.

The order is a hash of each id (seed 0), so any prefix of the pool is a random sample across the sets: a
labelling run stopped part way still leaves a usable, unbiased sample, and resuming extends it.
Duplicates: the same id (RetrievalQA repeats PopQA ids; its copy, which carries `needs_retrieval`, is kept) or
the same normalised question text (first set in SETS order wins).

    python scripts/label_pool.py --data ../shared/data --out results/labels/shared_questions.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from expertrag.answers import normalize_answer

SETS = ("retrievalqa_popqa_triviaqa", "popqa_longtail", "skr_training", "nq_open_dev")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the shared data folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows, ids, texts, dropped = [], set(), set(), 0
    for name in SETS:
        with open(args.data / "questions" / f"{name}.jsonl", encoding="utf-8") as f:
            for line in f:
                q = json.loads(line)
                key = normalize_answer(q["question"])
                if q["id"] in ids or key in texts:
                    dropped += 1
                    continue
                ids.add(q["id"])
                texts.add(key)
                q.setdefault("metadata", {})["set"] = name
                rows.append(q)
    rows.sort(key=lambda q: hashlib.sha256(f"{args.seed}:{q['id']}".encode()).hexdigest())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for q in rows:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    print(f"{len(rows)} questions -> {args.out} ({dropped} duplicates dropped)")


if __name__ == "__main__":
    main()
