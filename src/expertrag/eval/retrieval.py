"""Retrieval quality: answer-recall@k of each search mode over a question file."""

from __future__ import annotations

import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from expertrag.data.types import Question
from expertrag.eval.metrics import answer_recall_at_k
from expertrag.retrieval.index import Index


def answer_recall(index: Index, questions: Sequence[Question], ks: Sequence[int] = (1, 5, 20),
                  modes: Sequence[str] = ("bm25", "dense", "hybrid"), batch: int = 64,
                  progress: bool | None = None) -> dict:
    """For each mode: the share of questions with a gold answer in the top-k passages, for each k.

    Questions without gold answers are left out (and counted)."""
    usable = [q for q in questions if q.golden_answers]
    depth = max(ks)
    result: dict = {"questions": len(usable), "skipped_without_answers": len(questions) - len(usable),
                    "ks": list(ks), "modes": {}}
    for mode in modes:
        hits_per_k = dict.fromkeys(ks, 0.0)
        started = time.perf_counter()
        for i in tqdm(range(0, len(usable), batch), desc=mode, disable=None if progress is None else not progress):
            part = usable[i:i + batch]
            for q, hits in zip(part, index.search_many([q.question for q in part], depth, mode), strict=True):
                texts = [f"{h.title}. {h.contents}" for h in hits]
                for k in ks:
                    hits_per_k[k] += answer_recall_at_k(texts, q.golden_answers, k)
        n = max(len(usable), 1)
        result["modes"][mode] = {f"recall@{k}": hits_per_k[k] / n for k in ks}
        result["modes"][mode]["ms_per_query"] = (time.perf_counter() - started) * 1000 / n
    return result
