"""The experts of an index as a running pipeline sees them: registry + router, re-read when they change.

`LiveExperts.current()` costs three `stat` calls when nothing changed. It returns an immutable
`ExpertState`; a question keeps the state it started with, so an expert added or retired mid-question
affects the next question, never the one in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expertrag.experts.registry import ExpertRegistry, RegistrySnapshot
from expertrag.experts.router import RouterFile, RouterModel
from expertrag.retrieval.index import Index


@dataclass(frozen=True)
class ExpertState:
    snapshot: RegistrySnapshot
    router: RouterModel | None

    @property
    def routing(self) -> bool:
        """Route at all? Only when some active expert owns a domain (else everything is general)."""
        return bool(self.snapshot.domain_experts)

    @property
    def key(self) -> str:
        """For cache keys: a changed registry or router never serves an answer routed the old way."""
        return f"{self.snapshot.version}-{self.router.digest[:12] if self.router else 'none'}"


class LiveExperts:
    def __init__(self, index_dir: str | Path):
        self.registry = ExpertRegistry(index_dir)
        self.router_file = RouterFile(index_dir)
        self._lock = threading.Lock()  # the service answers from threads; loads happen once
        self._state: ExpertState | None = None

    def current(self) -> ExpertState:
        with self._lock:
            snap = self.registry.snapshot()
            model = self.router_file.current()
            if self._state is None or self._state.snapshot is not snap or self._state.router is not model:
                self._state = ExpertState(snap, model)
            return self._state


class DomainMap:
    """rowid -> domain of one index generation, so the refining layer maps hits to domains without a
    store lookup per hit (one query at build: 18k rows in a few ms)."""

    def __init__(self, index: Index):
        rowids, domains = index.store.live_domains(index.generation)
        self.generation = index.generation
        self.rowids = rowids
        self.names: list[str | None] = [None, *sorted({d for d in domains if d is not None})]
        code = {d: i for i, d in enumerate(self.names)}
        self.codes = np.fromiter((code[d] for d in domains), dtype=np.int32, count=len(domains))

    def domains(self, rowids: Sequence[int]) -> list[str | None]:
        if not len(rowids) or not len(self.rowids):
            return [None] * len(rowids)
        r = np.asarray(rowids, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.rowids, r), 0, len(self.rowids) - 1)
        ok = self.rowids[pos] == r
        return [self.names[self.codes[p]] if k else None for p, k in zip(pos.tolist(), ok.tolist(), strict=True)]
