"""Records that flow from ingestion to the store. Plain dataclasses: cheap, hashable ids, no magic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Document:
    """One input document as read from a corpus file, before chunking.

    source: the file it came from; line: its 1-based line (JSONL/CSV rows) or None (whole-file inputs).
    metadata: anything the input carried; `domain` (str) and `groups` (list[str]) are understood by
    retrieval filters.
    """

    id: str
    title: str
    contents: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    source: str = ""
    line: int | None = None


@dataclass(frozen=True)
class Passage:
    """A retrievable chunk of a document.

    id: stable across re-runs (derived from the document id and chunk position, never from a counter).
    start/end: character offsets of `contents` inside the document's contents.
    content_hash: sha256 hex of title + contents; the store uses it to tell changed from unchanged.
    """

    id: str
    doc_id: str
    title: str
    contents: str
    start: int
    end: int
    content_hash: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Question:
    """One question of a question file: `{id, question, golden_answers, metadata}`."""

    id: str
    question: str
    golden_answers: list[str] = field(default_factory=list, hash=False, compare=False)
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
