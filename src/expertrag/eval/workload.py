"""The mixed workload of experiment 2: half questions the model answers closed-book, half that need retrieval.

Built from label files (`expertrag label`): the no-retrieval half is drawn from questions whose closed-book
answer was right (`closed_correct`; a metadata-derived `no_retrieve` label without measured correctness also
counts), the retrieval half from `retrieve` labels, topped up with `both_wrong` ones when too few are
labelled `retrieve` (configurable). Gold answers come from the question files, joined by id. Sampling is
seeded and independent of label-file order (pools are sorted by id first); the result says how many of
each kind were available and how many were used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from expertrag.data.types import Question
from expertrag.gate.labels import LabelRecord

NO_RETRIEVAL = "no_retrieval"
RETRIEVAL = "retrieval"


@dataclass
class Workload:
    questions: list[Question]  # shuffled: the two halves interleave
    groups: dict[str, str]  # question id -> "no_retrieval" | "retrieval"
    labels: dict[str, LabelRecord]  # question id -> its label record
    available: dict[str, int]  # per pool: closed_correct, retrieve, both_wrong, without_question
    used: dict[str, int] = field(default_factory=dict)  # closed_correct, retrieve, both_wrong
    requested: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"requested": self.requested, "size": len(self.questions), "available": dict(self.available),
                "used": dict(self.used), "notes": list(self.notes)}


def closed_correct_pool(r: LabelRecord) -> bool:
    return r.closed_correct is True or (r.closed_correct is None and r.label == "no_retrieve")


def mixed_workload(records: Iterable[LabelRecord], questions: Mapping[str, Question] | Sequence[Question],
                   size: int = 200, seed: int = 0, *, retrieve_fraction: float = 0.5,
                   fallback_both_wrong: bool = True, keep_balance: bool = True) -> Workload:
    """`size` labelled questions, `retrieve_fraction` of them needing retrieval; see the module doc.

    Labelled ids without a question (or without gold answers) in `questions` are not usable and are
    counted as `without_question`."""
    if size < 2:
        raise ValueError(f"workload size must be at least 2, got {size}")
    if not 0 < retrieve_fraction < 1:
        raise ValueError(f"retrieve_fraction must be in (0, 1), got {retrieve_fraction}")
    by_id = questions if isinstance(questions, Mapping) else {q.id: q for q in questions}
    pools: dict[str, list[LabelRecord]] = {"closed_correct": [], "retrieve": [], "both_wrong": []}
    missing = 0
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            continue
        seen.add(r.id)
        q = by_id.get(r.id)
        if q is None or not q.golden_answers:
            missing += 1
            continue
        if closed_correct_pool(r):
            pools["closed_correct"].append(r)
        elif r.label == "retrieve":
            pools["retrieve"].append(r)
        elif r.label == "both_wrong":
            pools["both_wrong"].append(r)
    available = {k: len(v) for k, v in pools.items()} | {"without_question": missing}

    rng = np.random.default_rng(seed)

    def draw(pool: list[LabelRecord], n: int) -> list[LabelRecord]:
        ordered = sorted(pool, key=lambda r: r.id)
        if n >= len(ordered):
            return ordered
        return [ordered[i] for i in sorted(rng.choice(len(ordered), size=n, replace=False))]

    want_r = int(round(size * retrieve_fraction))
    want_n = size - want_r
    have_n = len(pools["closed_correct"])
    have_r = len(pools["retrieve"]) + (len(pools["both_wrong"]) if fallback_both_wrong else 0)
    notes = []
    n_n, n_r = min(want_n, have_n), min(want_r, have_r)
    if keep_balance and (n_n < want_n or n_r < want_r):
        # the largest mix with the requested ratio that both pools can fill
        scale = min(n_n / want_n, n_r / want_r)
        n_n, n_r = math.floor(want_n * scale + 1e-9), math.floor(want_r * scale + 1e-9)
    if n_n < want_n:
        notes.append(f"only {have_n} closed-book-correct questions available, {want_n} requested")
    if n_r < want_r:
        src = "retrieve" + (" + both_wrong" if fallback_both_wrong else "")
        notes.append(f"only {have_r} {src} questions available, {want_r} requested")
    chosen_n = draw(pools["closed_correct"], n_n)
    chosen_r = draw(pools["retrieve"], n_r)
    n_bw = n_r - len(chosen_r)
    chosen_bw = draw(pools["both_wrong"], n_bw) if fallback_both_wrong and n_bw > 0 else []
    if chosen_bw:
        notes.append(f"{len(chosen_bw)} both_wrong questions fill the retrieval half "
                     f"(only {len(pools['retrieve'])} labelled retrieve)")
    groups = {r.id: NO_RETRIEVAL for r in chosen_n} | {r.id: RETRIEVAL for r in chosen_r + chosen_bw}
    chosen = chosen_n + chosen_r + chosen_bw
    order = rng.permutation(len(chosen))
    picked = [chosen[i] for i in order]
    return Workload(
        questions=[by_id[r.id] for r in picked], groups=groups, labels={r.id: r for r in picked},
        available=available, used={"closed_correct": len(chosen_n), "retrieve": len(chosen_r),
                                   "both_wrong": len(chosen_bw)},
        requested=size, notes=notes,
    )
