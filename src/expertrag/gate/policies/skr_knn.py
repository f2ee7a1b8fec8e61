"""`skr-knn` (SKR, Wang et al. 2023): the nearest training questions vote on whether to retrieve."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from expertrag.errors import ExpertRAGError
from expertrag.gate.policies.artifacts import load_skr_knn, save_skr_knn
from expertrag.gate.policies.base import Policy
from expertrag.gate.types import Decision, GateContext


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


class SkrKnnPolicy(Policy):
    """SKR: the k training questions nearest by cosine of their embeddings vote; retrieve when a strict
    majority of them needed retrieval (a tie does not retrieve). Score: the share voting "retrieve"."""

    name = "skr-knn"

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray, k: int = 5):
        e = np.asarray(embeddings, dtype=np.float32)
        lab = np.asarray(labels).astype(np.int8).ravel()
        if e.ndim != 2 or e.shape[0] != lab.size or lab.size == 0:
            raise ValueError(f"need one label per embedding row, got {e.shape} and {lab.size}")
        if not np.isin(lab, (0, 1)).all():
            raise ValueError("skr-knn labels must be 0/1")
        if k < 1:
            raise ValueError("k must be >= 1")
        self.embeddings, self.labels, self.k = _unit(e), lab, int(k)

    @classmethod
    def fit(cls, embeddings: np.ndarray, targets: Sequence[int], k: int = 5) -> SkrKnnPolicy:
        return cls(embeddings, np.asarray(targets), k)

    def neighbours(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float32).ravel()
        if q.size != self.embeddings.shape[1]:
            raise ExpertRAGError(f"skr-knn was fitted on {self.embeddings.shape[1]}-dim embeddings, the query "
                                 f"embedding has {q.size}: use the same embedder, or retrain the gate")
        sims = self.embeddings @ _unit(q)
        return np.argsort(-sims, kind="stable")[: min(self.k, sims.size)]

    def decide(self, ctx: GateContext) -> Decision:
        votes = self.labels[self.neighbours(ctx.query_embedding())]
        frac = float(votes.mean())
        return Decision(retrieve=bool(votes.sum() * 2 > votes.size), score=frac, stage="fast", policy=self.name,
                        features={"knn_retrieve_fraction": frac})

    def save(self, artifacts_dir: str | os.PathLike[str]) -> Path:
        return save_skr_knn(artifacts_dir, self.embeddings, self.labels, self.k)

    @classmethod
    def load(cls, artifacts_dir: str | os.PathLike[str], k: int | None = None) -> SkrKnnPolicy:
        return load_skr_knn(artifacts_dir, cls.name, cls, k)

    @classmethod
    def from_config(cls, config, artifacts_dir):
        return cls.load(artifacts_dir, config.skr_k)
