"""The retrieval gate: features, gate models, policies, labels and training.

The names below are the public API. torch and scikit-learn are imported only when a gate is fitted,
calibrated or trained, so building policies and deciding stays light.
"""

from __future__ import annotations

from expertrag.gate.config import GateConfig
from expertrag.gate.features import (
    FeatureError,
    FeatureSpec,
    popularity_features,
    probe_features,
    query_features,
)
from expertrag.gate.labels import (
    LabelRecord,
    derive_label,
    label_from_metadata,
    read_labels,
    target,
    write_labels,
)
from expertrag.gate.models import (
    GateArtifactError,
    GateModel,
    LogisticGate,
    MLPGate,
    RouterGate,
    ThresholdGate,
    load_gate,
)
from expertrag.gate.policies import ARTIFACTS, POLICIES, Policy, make_policy
from expertrag.gate.types import Decision, GateContext, Probe

__all__ = [
    "ARTIFACTS", "POLICIES", "Decision", "FeatureError", "FeatureSpec", "GateArtifactError", "GateConfig",
    "GateContext", "GateModel", "LabelRecord", "LogisticGate", "MLPGate", "Policy", "Probe", "RouterGate",
    "ThresholdGate", "derive_label", "label_from_metadata", "load_gate", "make_policy", "popularity_features",
    "probe_features", "query_features", "read_labels", "target", "write_labels",
]
