"""`Policy` (decide(ctx) -> Decision), the `POLICIES` registry and `make_policy`."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import ClassVar

from expertrag.errors import ExpertRAGError
from expertrag.gate.config import GateConfig
from expertrag.gate.types import Decision, GateContext


class Policy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def decide(self, ctx: GateContext) -> Decision:
        ...

    def requires(self) -> frozenset[str]:
        """The generator signals this policy reads (gate.requirements); checked when the pipeline is built."""
        return frozenset()

    @classmethod
    def from_config(cls, config: GateConfig, artifacts_dir: str | os.PathLike[str] | None) -> Policy:
        return cls()


# name -> class, in the order `--policies all` runs them; filled by the package __init__ (importing any
# module of the package runs it first).
POLICIES: dict[str, type[Policy]] = {}


def make_policy(name: str, config: GateConfig | None = None,
                artifacts_dir: str | os.PathLike[str] | None = None) -> Policy:
    """Build the policy `name`; learned ones load their artifacts from `artifacts_dir` (a missing or
    corrupt artifact raises GateArtifactError)."""
    if name not in POLICIES:
        raise ExpertRAGError(f"unknown gate policy '{name}'; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name].from_config(config or GateConfig(), artifacts_dir)
