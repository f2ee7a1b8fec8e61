"""Stop strings while streaming, shared by the backends that run their own decoding loop (torch-free)."""

from __future__ import annotations

from collections.abc import Sequence


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become a stop string (or are an incomplete character),
    so a stream must not emit them yet."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
