"""Retrieval quality: answer-recall@k and gold-passage recall@k of each search mode over a question file."""

from __future__ import annotations

import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from expertrag.data.types import Question
from expertrag.eval.metrics import answer_recall_at_k
from expertrag.retrieval.index import Index

GOLD_FIELD = "gold_passage_ids"


def gold_ids(q: Question) -> list[str]:
    """The question's gold passages (`metadata.gold_passage_ids`: ids of source records)."""
    return [str(g) for g in q.metadata.get(GOLD_FIELD) or []]


def gold_recall_at_k(ranked_doc_ids: Sequence[str], gold: Sequence[str], k: int) -> float:
    """Share of the gold records among the first k hits' records (a long record is split into passages
    `id#n`, so hits are matched by their doc_id). The same measure as eval-experts' retrieval table."""
    g = set(gold)
    return len(g & set(ranked_doc_ids[:k])) / len(g) if g else float("nan")


def answer_recall(index: Index, questions: Sequence[Question], ks: Sequence[int] = (1, 5, 20),
                  modes: Sequence[str] = ("bm25", "dense", "hybrid"), batch: int = 64,
                  progress: bool | None = None) -> dict:
    """For each mode: the share of questions with a gold answer in the top-k passages, for each k, and,
    over the questions that name gold passages, the mean share of them in the top k (`gold_recall@k`).

    Questions without gold answers are left out of answer recall (and counted)."""
    usable = [q for q in questions if q.golden_answers]
    with_gold = [q for q in questions if gold_ids(q)]
    depth = max(ks)
    result: dict = {"questions": len(usable), "skipped_without_answers": len(questions) - len(usable),
                    "questions_with_gold_passages": len(with_gold), "ks": list(ks), "modes": {}}
    scored = [q for q in questions if q.golden_answers or gold_ids(q)]
    for mode in modes:
        hits_per_k = dict.fromkeys(ks, 0.0)
        gold_per_k = dict.fromkeys(ks, 0.0)
        started = time.perf_counter()
        for i in tqdm(range(0, len(scored), batch), desc=mode, disable=None if progress is None else not progress):
            part = scored[i:i + batch]
            for q, hits in zip(part, index.search_many([q.question for q in part], depth, mode), strict=True):
                texts = [f"{h.title}. {h.contents}" for h in hits]
                docs = [h.metadata.get("doc_id", h.id) for h in hits]
                gold = gold_ids(q)
                for k in ks:
                    if q.golden_answers:
                        hits_per_k[k] += answer_recall_at_k(texts, q.golden_answers, k)
                    if gold:
                        gold_per_k[k] += gold_recall_at_k(docs, gold, k)
        row: dict = {f"recall@{k}": hits_per_k[k] / max(len(usable), 1) for k in ks}
        if with_gold:
            row.update({f"gold_recall@{k}": gold_per_k[k] / len(with_gold) for k in ks})
        row["ms_per_query"] = (time.perf_counter() - started) * 1000 / max(len(scored), 1)
        result["modes"][mode] = row
    return result
