"""Reconciling the answers of several experts to one question.

Each chosen expert answered from its own evidence (its domain's passages). Fusion scores each answer by
routing weight x confidence x (1 + support), where support is the share of that expert's passages that
back the answer (the pipeline's `supports` test), and picks the best answer that did not abstain. When
other experts gave the same answer (same normalised text, or one contains the other), their citations are
merged in: agreement is evidence, and each citation keeps the name of the expert whose passage it is.
All abstained: the answer abstains (the top-weighted expert's abstention is kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from expertrag.answers import normalize_answer


@dataclass
class ExpertCandidate:
    """One expert's answer before fusion."""

    expert: str
    weight: float
    text: str
    confidence: float
    abstained: bool
    supported: int  # passages of this expert that back the answer
    passages: int  # passages this expert retrieved
    citations: list[Any] = field(default_factory=list)  # pipeline Citations, already this expert's

    @property
    def support(self) -> float:
        return self.supported / self.passages if self.passages else 0.0

    @property
    def score(self) -> float:
        return 0.0 if self.abstained else self.weight * self.confidence * (1.0 + self.support)


@dataclass
class Fused:
    chosen: int  # index of the candidate whose answer is given
    agreeing: list[int]  # candidates (chosen included) whose answer matches it
    mode: str  # "pick" | "merge" | "abstain"

    def describe(self, cands: Sequence[ExpertCandidate]) -> list[dict[str, Any]]:
        return [{"expert": c.expert, "weight": round(c.weight, 4), "answer": c.text,
                 "confidence": round(c.confidence, 4), "abstained": c.abstained, "supported": c.supported,
                 "passages": c.passages, "score": round(c.score, 4), "chosen": i == self.chosen,
                 "agrees": i in self.agreeing} for i, c in enumerate(cands)]


def same_answer(a: str, b: str) -> bool:
    na, nb = normalize_answer(a), normalize_answer(b)
    return bool(na and nb) and (na == nb or f" {na} " in f" {nb} " or f" {nb} " in f" {na} ")


def fuse(cands: Sequence[ExpertCandidate]) -> Fused:
    if not cands:
        raise ValueError("fuse: no candidate answers")
    live = [i for i, c in enumerate(cands) if not c.abstained]
    if not live:
        top = max(range(len(cands)), key=lambda i: cands[i].weight)
        return Fused(top, [top], "abstain")
    best = max(live, key=lambda i: (cands[i].score, cands[i].weight))
    agreeing = [i for i in live if i == best or same_answer(cands[i].text, cands[best].text)]
    return Fused(best, agreeing, "merge" if len(agreeing) > 1 else "pick")
