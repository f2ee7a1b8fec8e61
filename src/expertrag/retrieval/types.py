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
    """Metadata filters applied inside retrieval. Access control fails closed.

    domains: allowed domains (None = any).
    groups: the caller's access groups. A passage without groups is public; a passage with groups is
      visible only to a caller who shares one of them. No groups (None or ()) = public passages only.
    all_groups: the explicit administrator switch: access control off, every passage visible. It cannot
      be combined with `groups` (that would be ambiguous).

    `Index.search(..., filters=None)` is the same as `Filters()`: public passages only.
    """

    domains: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None
    all_groups: bool = False

    def __post_init__(self) -> None:
        if self.all_groups and self.groups:
            raise ValueError("Filters: give groups or all_groups=True, not both")
        for name in ("domains", "groups"):
            value = getattr(self, name)
            if isinstance(value, str):  # a bare string would be read as a tuple of letters
                raise TypeError(f"Filters.{name} must be a tuple of strings, not a string")

    @property
    def restricted(self) -> bool:
        """The caller is not an administrator: restricted passages need a shared group."""
        return not self.all_groups

    def access_key(self) -> list[str] | str:
        """What a cache key must include so callers with different access never share an entry."""
        return "*all-groups*" if self.all_groups else sorted(set(self.groups or ()))


PUBLIC = Filters()
ALL_GROUPS = Filters(all_groups=True)
