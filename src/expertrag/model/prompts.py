"""The prompts the generator sees: closed-book, and open-book with numbered passages.

Passages go into the user turn as [1] ... [k] so the answer can cite them by marker.
"""

from __future__ import annotations

from collections.abc import Sequence

from expertrag.retrieval.types import Hit

SYSTEM = "You are a helpful assistant. Answer the question with a short phrase, not a sentence."
SYSTEM_WITH_PASSAGES = (
    "You are a helpful assistant. Answer the question with a short phrase taken from the passages, "
    "then cite the passage you used as [n]."
)


def closed_book_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def format_passages(hits: Sequence[Hit], max_chars: int = 700) -> str:
    lines = []
    for n, h in enumerate(hits, 1):
        body = h.contents if len(h.contents) <= max_chars else h.contents[:max_chars].rsplit(" ", 1)[0] + " ..."
        lines.append(f"[{n}] {h.title}: {body}")
    return "\n".join(lines)


def open_book_messages(question: str, hits: Sequence[Hit], max_chars: int = 700) -> list[dict[str, str]]:
    user = f"Passages:\n{format_passages(hits, max_chars)}\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM_WITH_PASSAGES}, {"role": "user", "content": user}]


def memory_text(hits: Sequence[Hit]) -> str:
    """What the retrieval expert reads for these hits: every passage, titled, in one memory. Training
    (model/train/examples.py) and answering (pipeline/rag.py) both use this, so the expert reads at answer
    time exactly the text it was trained on."""
    return " ".join(f"{h.title}. {h.contents}" for h in hits)
