"""Answer normalisation and the one "does this text contain the answer" check, shared by every layer.

Normalisation follows the SQuAD v1.1 evaluation script: lower case, drop punctuation, drop the articles
a/an/the, collapse whitespace. A leaf module (standard library only) so that the pipeline's cache, labelling,
LM training data selection and evaluation all judge answers the same way.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def contains_answer(text: str, golds: Sequence[str]) -> float:
    """PopQA-style accuracy: a normalised gold answer occurs in the normalised text (on word boundaries)."""
    t = f" {normalize_answer(text)} "
    return float(any(n and f" {n} " in t for n in (normalize_answer(g) for g in golds)))
