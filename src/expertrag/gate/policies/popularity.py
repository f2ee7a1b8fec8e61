"""`popularity` (Mallen et al. 2023): retrieve for long-tail entities, by a per-relation s_pop threshold."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from expertrag.gate.features import popularity_features, s_pop_of
from expertrag.gate.policies.artifacts import load_popularity, save_popularity
from expertrag.gate.policies.base import Policy
from expertrag.gate.policies.fitting import popularity_thresholds
from expertrag.gate.types import Decision, GateContext


class PopularityPolicy(Policy):
    """Retrieve when metadata.s_pop < the threshold of the question's metadata.relation (global threshold
    for relations unseen or rare in training). A question without s_pop gets `missing` ("retrieve" by
    default: unknown popularity is treated like the long tail), with stage "fixed".
    Score: sigmoid(log1p(threshold) - log1p(s_pop))."""

    name = "popularity"

    def __init__(self, global_threshold: float, thresholds: Mapping[str, float] | None = None,
                 missing: str = "retrieve"):
        self.global_threshold = float(global_threshold)
        self.thresholds = {str(k): float(v) for k, v in (thresholds or {}).items()}
        if missing not in ("retrieve", "no_retrieve"):
            raise ValueError(f"missing must be 'retrieve' or 'no_retrieve', got {missing!r}")
        self.missing = missing

    @classmethod
    def fit(cls, s_pop: Sequence[float], relations: Sequence[str | None], closed: Sequence[float],
            open_: Sequence[float], *, min_questions: int = 10, missing: str = "retrieve") -> PopularityPolicy:
        """Per-relation thresholds maximising adaptive accuracy on labelled training questions."""
        glob, thresholds = popularity_thresholds(s_pop, relations, closed, open_, min_questions=min_questions)
        return cls(glob, thresholds, missing)

    def threshold_for(self, relation: Any) -> float:
        return self.thresholds.get(relation, self.global_threshold) if isinstance(relation, str) else self.global_threshold

    def decide(self, ctx: GateContext) -> Decision:
        s = s_pop_of(ctx.metadata)
        if s is None:
            r = self.missing == "retrieve"
            return Decision(retrieve=r, score=float(r), stage="fixed", policy=self.name)
        t = self.threshold_for(ctx.metadata.get("relation"))
        feats = popularity_features(ctx.metadata)
        score = float(1 / (1 + math.exp(-(math.log1p(t) - feats["log_s_pop"]))))
        return Decision(retrieve=s < t, score=score, stage="metadata", policy=self.name, features=feats)

    def save(self, artifacts_dir: str | os.PathLike[str]) -> Path:
        return save_popularity(artifacts_dir, self.global_threshold, self.thresholds)

    @classmethod
    def load(cls, artifacts_dir: str | os.PathLike[str], missing: str = "retrieve") -> PopularityPolicy:
        glob, thresholds = load_popularity(artifacts_dir, cls.name)
        return cls(glob, thresholds, missing)

    @classmethod
    def from_config(cls, config, artifacts_dir):
        if config.popularity_threshold is not None:
            return cls(config.popularity_threshold, None, config.popularity_missing)
        return cls.load(artifacts_dir, config.popularity_missing)
