"""Where ExpertRAG keeps things outside the repository (converted models, default indexes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$EXPERTRAG_CACHE`, else `~/.cache/expertrag`. Created on first use."""
    root = Path(os.environ.get("EXPERTRAG_CACHE", Path.home() / ".cache" / "expertrag"))
    root.mkdir(parents=True, exist_ok=True)
    return root
