"""Gate models: a feature vector -> P(retrieval needed), with a decision threshold.

Where things are:
- base.py: `GateModel` (scoring, calibration hook, threshold tuning, save/load) and `load_gate`;
- threshold.py, router.py, logistic.py, mlp.py: one model each (`ThresholdGate`, `RouterGate`,
  `LogisticGate`, `MLPGate`);
- calibration.py: `Calibrator` (Platt / isotonic);
- scoring.py: sigmoid/logit, `best_threshold`, `standardisation`, label checks;
- artifacts.py: the files (JSON + safetensors, format/version checks, `GateArtifactError`);
- torch_nets.py, export.py: the torch nets the learned gates train and their export to numpy models.
"""

from __future__ import annotations

from expertrag.gate.models.artifacts import (
    FORMAT,
    VERSION,
    GateArtifactError,
    check_version,
    read_json_artifact,
    write_json_atomic,
)
from expertrag.gate.models.base import GATE_KINDS, GateModel, load_gate
from expertrag.gate.models.calibration import Calibrator
from expertrag.gate.models.export import gate_from_torch
from expertrag.gate.models.logistic import LogisticGate
from expertrag.gate.models.mlp import MLPGate
from expertrag.gate.models.router import RouterGate
from expertrag.gate.models.scoring import best_threshold, logit, sigmoid, standardisation
from expertrag.gate.models.threshold import ThresholdGate
from expertrag.gate.models.torch_nets import make_torch_net, torch_single_thread

GATE_KINDS.update({c.kind: c for c in (ThresholdGate, RouterGate, LogisticGate, MLPGate)})

__all__ = [
    "FORMAT", "GATE_KINDS", "VERSION", "Calibrator", "GateArtifactError", "GateModel", "LogisticGate", "MLPGate",
    "RouterGate", "ThresholdGate", "best_threshold", "check_version", "gate_from_torch", "load_gate", "logit",
    "make_torch_net", "read_json_artifact", "sigmoid", "standardisation", "torch_single_thread",
    "write_json_atomic",
]
