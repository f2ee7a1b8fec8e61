"""Export a trained torch net (from `make_torch_net`) as a numpy gate model that saves and loads."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from expertrag.gate.features import FeatureSpec
from expertrag.gate.models.logistic import LogisticGate
from expertrag.gate.models.mlp import MLPGate


def gate_from_torch(kind: Literal["logistic", "mlp"], net: Any, spec: FeatureSpec, mean: np.ndarray,
                    std: np.ndarray, **params: Any) -> LogisticGate | MLPGate:
    """Export a net from `make_torch_net` (fed standardised inputs) as a LogisticGate/MLPGate."""
    g: LogisticGate | MLPGate
    if kind == "logistic":
        g = LogisticGate(spec, **params)
    else:
        g = MLPGate(spec, hidden=net[0].out_features, **params)
    g.load_torch(net)
    g.mean, g.std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    return g
