"""Each expert's own retrieval gate: an expert whose adapter knows its domain may skip retrieval.

An expert record's `gate` (registry.py) is one of
- a policy name (`always`, `never`, `adaptive`, ...): that policy, its learned artifacts (if any) read
  from the index's gate folder, as the pipeline's own policy reads them;
- a folder relative to the registry's directory holding a trained gate (`expertrag train gate` output):
  the learned `adaptive` policy on those artifacts (a gate trained on the expert's own questions);
- `POLICY:FOLDER`: that policy on that folder's artifacts.
No `gate`: the pipeline's policy decides for the expert, exactly as before experts had gates.

Policies are built once per (expert, version, gate) and kept: building a learned one reads its artifacts,
which a question should not pay for. The record's form is checked when the registry is read; whether the
name is a policy, the folder exists and the artifacts load is checked here, and every failure names the
registry file and the record's field (`experts[2].gate`), or the command-line option when adding one.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from expertrag.errors import ExpertRAGError, InputError
from expertrag.experts.registry import ExpertRecord, RegistrySnapshot
from expertrag.gate.config import GateConfig

DEFAULT_LEARNED = "adaptive"  # what a bare gate folder runs: the learned gate is what a folder holds


def parse_gate(spec: str, registry_dir: Path) -> tuple[str, Path | None]:
    """(policy name, artifacts folder or None for the index's gate folder) of a record's `gate`.
    Raises ValueError with a message fit to follow the field's name."""
    from expertrag.gate.policies import POLICIES

    names = ", ".join(POLICIES)
    if ":" in spec:
        name, rel = spec.split(":", 1)
        if name not in POLICIES:
            raise ValueError(f"unknown gate policy {name!r} in {spec!r}; choose one of: {names}")
        folder = registry_dir / rel
        if not folder.is_dir():
            raise ValueError(f"gate folder {folder} does not exist")
        return name, folder
    if spec in POLICIES:
        return spec, None
    folder = registry_dir / spec
    if folder.is_dir():
        return DEFAULT_LEARNED, folder
    raise ValueError(f"{spec!r} is neither a gate policy ({names}) nor a gate folder under {registry_dir}")


def build_gate(spec: str, registry_dir: Path, config: GateConfig | None, default_artifacts: Path | None,
               capabilities: Any = None) -> Any:
    """The Policy a record's `gate` names, checked against the generator's capabilities when given.
    Raises ValueError (bad name or folder, missing or corrupt artifacts, a signal the backend lacks)."""
    from expertrag.gate.policies import make_policy
    from expertrag.gate.requirements import check_policy

    name, folder = parse_gate(spec, registry_dir)
    try:
        policy = make_policy(name, config or GateConfig(), artifacts_dir=folder or default_artifacts)
        if capabilities is not None:
            check_policy(policy, capabilities, name)
    except ExpertRAGError as e:  # GateArtifactError names the file; BackendCapabilityError the signal
        raise ValueError(str(e)) from None
    return policy


class ExpertGates:
    """The policies of a registry's experts, built on first use and kept (thread-safe)."""

    def __init__(self, registry_dir: str | Path, config: GateConfig | None = None,
                 default_artifacts: str | Path | None = None, capabilities: Any = None):
        self.registry_dir = Path(registry_dir)
        self.config = config
        self.default_artifacts = Path(default_artifacts) if default_artifacts is not None else None
        self.capabilities = capabilities
        self._policies: dict[tuple[str, int, str], Any] = {}
        self._lock = threading.Lock()

    def policy(self, rec: ExpertRecord, snapshot: RegistrySnapshot | None = None) -> Any | None:
        """The expert's own policy, or None when it has no `gate` (the pipeline's policy decides)."""
        if rec.gate is None:
            return None
        key = (rec.name, rec.version, rec.gate)
        with self._lock:
            if key not in self._policies:
                try:
                    self._policies[key] = build_gate(rec.gate, self.registry_dir, self.config,
                                                     self.default_artifacts, self.capabilities)
                except ValueError as e:
                    raise record_error(rec, snapshot, "gate", str(e)) from None
            return self._policies[key]

    def check(self, snapshot: RegistrySnapshot) -> None:
        """Build every active expert's gate now (start-up): a bad record fails here, not mid-question."""
        for rec in snapshot.active:
            self.policy(rec, snapshot)


def record_error(rec: ExpertRecord, snapshot: RegistrySnapshot | None, field: str, message: str) -> InputError:
    """An InputError naming the registry file and the record's field (`experts[i].gate`)."""
    index = next((i for i, e in enumerate(snapshot.experts) if e.name == rec.name), None) if snapshot else None
    where = f"experts[{index}].{field}" if index is not None else field
    return InputError(f"expert {rec.name!r}: {message}", path=snapshot.path if snapshot else None, field=where)
