"""BM25 query time: our sparse scoring (`BM25Index.search`) against bm25s's N-long score array, in one run.

    python scripts/bm25_query_bench.py DATA N [QUERIES]   # DATA: ../shared/data; N passages of bench scale's
                                                          # derived corpus (sentences, then copies)
The reference is what `search` did before: `get_scores_from_ids` (one float per passage, postings added with
np.add.at) and bm25s's `topk`. Both run on the same in-memory index, alternating, twice. Reported: ms per
query, the ratio, and the share of queries whose score list (by rank) is the reference's; rowids can differ
only among exactly tied passages (ours orders ties by index position, bm25s's argpartition leaves them in
any order), so the rowid agreement is reported separately. Run with OMP_NUM_THREADS=1.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bm25s.selection import topk

from expertrag.bench.scale import write_derived_corpus
from expertrag.retrieval.bm25 import BM25Index


def main(data: Path, n: int, n_queries: int = 300) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        made = write_derived_corpus(data, n, corpus)
        with open(corpus, encoding="utf-8") as f:
            rows = [(i, f"{r['title']}. {r['contents']}") for i, r in enumerate(map(json.loads, f))]
    index = BM25Index.build([rows], k1=1.5, b=0.75, stem=True)
    questions = [json.loads(line)["question"] for line in open(data / "questions/retrievalqa_popqa_triviaqa.jsonl",
                                                                 encoding="utf-8")]
    rng = np.random.default_rng(0)
    queries = [questions[i] for i in rng.choice(len(questions), size=min(n_queries, len(questions)), replace=False)]

    def reference(q: str, k: int = 10):
        ids = index.term_ids(q)
        if not ids:
            return []
        scores, docs = topk(index.model.get_scores_from_ids(ids), k, sorted=True)
        keep = scores > 0
        return list(zip(index.rowids[docs[keep]].tolist(), scores[keep].tolist(), strict=True))

    def ours(q: str, k: int = 10):
        return index.search(q, k)

    times: dict[str, list[float]] = {"ours": [], "reference": []}
    results: dict[str, list] = {}
    for _ in range(2):
        for name, fn in (("reference", reference), ("ours", ours)):
            t = time.perf_counter()
            results[name] = [fn(q) for q in queries]
            times[name].append((time.perf_counter() - t) / len(queries) * 1000)
    ref_ms, ours_ms = min(times["reference"]), min(times["ours"])
    pairs = list(zip(results["ours"], results["reference"], strict=True))
    return {
        "passages": made["passages"], "distinct_sentences": made["distinct_sentences"], "queries": len(queries),
        "k": 10, "ref_ms_per_query": round(ref_ms, 2), "ours_ms_per_query": round(ours_ms, 2),
        "speedup": round(ref_ms / ours_ms, 1),
        "same_scores_by_rank": float(np.mean([len(a) == len(b) and np.allclose([s for _, s in a], [s for _, s in b],
                                                                                rtol=1e-6) for a, b in pairs])),
        "same_rowids": float(np.mean([[r for r, _ in a] == [r for r, _ in b] for a, b in pairs])),
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (2, 3):
        sys.exit(__doc__)
    print(json.dumps(main(Path(args[0]), int(args[1]), *(int(a) for a in args[2:])), indent=1))
