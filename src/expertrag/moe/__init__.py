"""Mixture-of-Experts layer: router, SwiGLU experts (full or LoRA), retrieval expert, losses, stats.

Exports resolve lazily so that `expertrag.config` (which imports moe.config) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "config": ["MoEConfig", "moe_layer_indices"],
    "experts": ["FullExperts", "LoRAExperts", "SwiGLU", "dense_swiglu_weights", "grouped_linear"],
    "layer": ["MoELayer"],
    "losses": [
        "load_balancing_loss",
        "load_balancing_loss_from_logits",
        "router_z_loss",
        "total_router_loss",
    ],
    "retrieval_expert": ["RetrievalExpert", "has_passages"],
    "router": ["Dispatch", "Router", "Routing", "dispatch", "expert_capacity", "route"],
    "stats": ["CollapseFlag", "LayerStats", "collapse_flags", "layer_stats"],
    "types": ["MoEAux", "PassageMemory"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = [
    "CollapseFlag",
    "Dispatch",
    "FullExperts",
    "LayerStats",
    "LoRAExperts",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "PassageMemory",
    "RetrievalExpert",
    "Router",
    "Routing",
    "SwiGLU",
    "collapse_flags",
    "dense_swiglu_weights",
    "dispatch",
    "expert_capacity",
    "grouped_linear",
    "has_passages",
    "layer_stats",
    "load_balancing_loss",
    "load_balancing_loss_from_logits",
    "moe_layer_indices",
    "route",
    "router_z_loss",
    "total_router_loss",
]

if TYPE_CHECKING:
    from expertrag.moe.config import MoEConfig, moe_layer_indices
    from expertrag.moe.experts import FullExperts, LoRAExperts, SwiGLU, dense_swiglu_weights, grouped_linear
    from expertrag.moe.layer import MoELayer
    from expertrag.moe.losses import (
        load_balancing_loss,
        load_balancing_loss_from_logits,
        router_z_loss,
        total_router_loss,
    )
    from expertrag.moe.retrieval_expert import RetrievalExpert, has_passages
    from expertrag.moe.router import Dispatch, Router, Routing, dispatch, expert_capacity, route
    from expertrag.moe.stats import CollapseFlag, LayerStats, collapse_flags, layer_stats
    from expertrag.moe.types import MoEAux, PassageMemory


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'expertrag.moe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"expertrag.moe.{mod}"), name)
    globals()[name] = value
    return value
