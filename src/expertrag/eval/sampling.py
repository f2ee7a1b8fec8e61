"""Which questions a run answers: datasets by name, and a seeded per-dataset sample."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from expertrag.data.types import Question


def as_datasets(questions: Mapping[str, Sequence[Question]] | Sequence[Question]) -> dict[str, list[Question]]:
    if isinstance(questions, Mapping):
        return {str(k): list(v) for k, v in questions.items()}
    return {"all": list(questions)}


def select_questions(questions: Sequence[Question], limit: int | None, seed: int, dataset: str = "") -> list[Question]:
    """All questions in file order, or with `limit` a seeded sample of that many in shuffled order. The
    stream depends only on (seed, dataset name), so adding a dataset does not change another's sample."""
    qs = list(questions)
    if limit is None:
        return qs
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    rng = np.random.default_rng([seed, zlib.crc32(dataset.encode("utf-8"))])
    return [qs[i] for i in rng.permutation(len(qs))[:limit]]
