"""Retrieval policies: `decide(ctx: GateContext) -> Decision`, one per name in `POLICIES`, one a module.

Baselines: never, always, popularity (Mallen et al. 2023), skr-knn (SKR, Wang et al. 2023), entropy, flare
(FLARE's low-probability-token trigger, Jiang et al. 2023), router. The learned `adaptive` policy is two-stage.

Decision.score is P(retrieval needed) for the learned policies; for the baselines it is the policy's own
statistic, monotone in "retrieve" (each class's doc names it).

base.py holds `Policy`, `POLICIES`, `make_policy`; fitting.py the baselines' fitting; artifacts.py the files
in the gate folder (`ARTIFACTS`). This module fills `POLICIES`, in the order `--policies all` runs them.
"""

from __future__ import annotations

from expertrag.gate.policies.adaptive import AdaptivePolicy
from expertrag.gate.policies.always import AlwaysPolicy
from expertrag.gate.policies.artifacts import ARTIFACTS, TRAIN_HINT
from expertrag.gate.policies.base import POLICIES, Policy, make_policy
from expertrag.gate.policies.entropy import EntropyPolicy
from expertrag.gate.policies.fitting import best_popularity_threshold
from expertrag.gate.policies.flare import FlarePolicy
from expertrag.gate.policies.never import NeverPolicy
from expertrag.gate.policies.popularity import PopularityPolicy
from expertrag.gate.policies.router import RouterPolicy
from expertrag.gate.policies.skr_knn import SkrKnnPolicy

POLICIES.update({p.name: p for p in (NeverPolicy, AlwaysPolicy, PopularityPolicy, SkrKnnPolicy, EntropyPolicy,
                                       FlarePolicy, RouterPolicy, AdaptivePolicy)})

__all__ = [
    "ARTIFACTS", "POLICIES", "TRAIN_HINT", "AdaptivePolicy", "AlwaysPolicy", "EntropyPolicy", "FlarePolicy",
    "NeverPolicy", "Policy", "PopularityPolicy", "RouterPolicy", "SkrKnnPolicy", "best_popularity_threshold",
    "make_policy",
]
