from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

SearchMode = Literal["bm25", "dense", "hybrid"]
MODES: tuple[str, ...] = ("bm25", "dense", "hybrid")


@dataclass(frozen=True)
class Hit:
    """One retrieved passage. `score` is the retriever's own (BM25, cosine, or fused RRF)."""

    id: str
    title: str
    contents: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Filters:
    """Metadata filters applied inside retrieval.

    domains: allowed domains (None = any). groups: the caller's access groups; passages without groups
    are public, others need a shared group (None = no access control, e.g. an administrator).
    """

    domains: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None

    @property
    def active(self) -> bool:
        return self.domains is not None or self.groups is not None
