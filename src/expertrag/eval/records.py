"""The per-question record: one row per (policy, question) in a result's `records`.

Fields: the gate's decision, score and stage; correctness of the model's own words (`Answer.generated`,
before abstention replaced them) PopQA-style (a normalised gold answer contained in the prediction), exact
match and token F1; latency and its parts; tokens; the pipeline's k; and, where a label exists, the label,
both branches' correctness and the group (`group_of`). Every aggregate is recomputed from these rows, so
results over disjoint questions can be merged (eval.merge).
"""

from __future__ import annotations

from typing import Any

from expertrag.data.types import Question
from expertrag.eval.metrics import contains_answer, exact_match, token_f1
from expertrag.gate.labels import LabelRecord

NO_RETRIEVAL, RETRIEVAL, BOTH_WRONG = "no_retrieval", "retrieval", "both_wrong"


def group_of(label: LabelRecord | None) -> str | None:
    """no_retrieval (closed-book right), retrieval (only open-book right), both_wrong; None if unlabelled."""
    if label is None:
        return None
    if label.closed_correct is True or label.label == "no_retrieve":
        return NO_RETRIEVAL
    return RETRIEVAL if label.label == "retrieve" else BOTH_WRONG


def question_record(answer: Any, question: Question, dataset: str, policy: str,
                    label: LabelRecord | None = None, group: str | None = None,
                    k: int | None = None) -> dict[str, Any]:
    """One question's row; `_experts` (the answer's per-layer expert shares) is dropped from the JSON.
    `k`: the passages per retrieval the answering pipeline was configured with (context dilution runs
    differ only in it)."""
    golds = question.golden_answers
    t = answer.timings
    gate = answer.gate or {}
    score = gate.get("score")
    return {
        "id": question.id, "dataset": dataset, "policy": policy, "k": k,
        "decision": gate.get("decision", "retrieve" if answer.retrieved else "no_retrieve"),
        "retrieved": bool(answer.retrieved), "score": None if score is None else float(score),
        "stage": gate.get("stage"),
        "correct": bool(contains_answer(answer.generated, golds)) if golds else None,
        "em": exact_match(answer.generated, golds) if golds else None,
        "f1": token_f1(answer.generated, golds) if golds else None,
        "abstained": bool(answer.abstained), "confidence": float(answer.confidence),
        "latency_ms": float(t.total_ms), "gate_ms": float(t.gate_ms), "probe_ms": float(t.probe_ms),
        "retrieval_ms": float(t.retrieval_ms), "generation_ms": float(t.generation_ms),
        "other_ms": float(t.other_ms),
        "prompt_tokens": int(answer.tokens.get("prompt", 0)),
        "generated_tokens": int(answer.tokens.get("generated", 0)),
        "retrievals": int(bool(answer.retrieved)),
        "retrieval_expert_share": (answer.experts or {}).get("retrieval_expert_share"),
        "label": label.label if label else None,
        "closed_correct": label.closed_correct if label else None,
        "open_correct": label.open_correct if label else None,
        "group": group, "answer": answer.generated,
        "_experts": answer.experts or {},
    }


def error_record(question: Question, dataset: str, policy: str, error: Exception) -> dict[str, Any]:
    return {"id": question.id, "dataset": dataset, "policy": policy, "error": str(error)}
