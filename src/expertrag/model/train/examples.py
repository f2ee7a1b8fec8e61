"""Training examples: corpus blocks (loss on every token) and closed-/open-book QA examples (loss on the
answer), rendered with the chat template exactly as the pipeline prompts the model (`model.prompts`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from expertrag.answers import contains_answer
from expertrag.model.generation import encode_prompt
from expertrag.model.prompts import closed_book_messages, memory_text, open_book_messages

if TYPE_CHECKING:
    from expertrag.model.train.config import TrainConfig

Kind = Literal["corpus", "closed", "open"]
KINDS: tuple[Kind, ...] = ("corpus", "closed", "open")


@dataclass
class Example:
    """One training sequence. labels[t] = input_ids[t] where the loss applies, else -100 (no shift)."""

    input_ids: list[int]
    labels: list[int]
    kind: Kind
    passage_ids: list[int] = field(default_factory=list)  # what the retrieval expert reads (open-book)


def eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no EOS token")
    return int(eos)


def corpus_blocks(docs: Iterable[Any], tokenizer: Any, seq_len: int, limit: int | None = None) -> list[Example]:
    """Documents -> "title\\ncontents" + EOS, concatenated, cut into seq_len-token blocks (a last partial
    block is kept when it has at least seq_len / 4 tokens)."""
    eos = eos_id(tokenizer)
    blocks: list[Example] = []
    buf: list[int] = []
    for doc in docs:
        text = f"{doc.title}\n{doc.contents}" if doc.title else doc.contents
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buf.append(eos)
        while len(buf) >= seq_len:
            ids, buf = buf[:seq_len], buf[seq_len:]
            blocks.append(Example(ids, list(ids), "corpus"))
            if limit is not None and len(blocks) >= limit:
                return blocks
    if len(buf) >= max(seq_len // 4, 2):
        blocks.append(Example(buf, list(buf), "corpus"))
    return blocks


def qa_examples(question: Any, hits: Sequence[Any] | None, tokenizer: Any, cfg: TrainConfig) -> list[Example]:
    """The closed-book and (with hits) open-book examples of one question; [] without an answer."""
    if not question.golden_answers:
        return []
    eos = eos_id(tokenizer)
    answer = question.golden_answers[0].strip()

    def example(prompt: list[int], target: str, kind: Kind, passage_ids: list[int]) -> Example:
        tgt = [*tokenizer(target, add_special_tokens=False)["input_ids"], eos]
        room = max(cfg.seq_len - len(tgt), 1)
        prompt = prompt[-room:]  # left-truncate a prompt that still does not fit
        ids = prompt + tgt
        return Example(ids, [-100] * len(prompt) + tgt, kind, passage_ids)

    def memory_ids(hits: Sequence[Any]) -> list[int]:  # what the retrieval expert reads, as at answer time
        return tokenizer(memory_text(hits), add_special_tokens=False)["input_ids"][: cfg.max_passage_tokens]

    closed_prompt = encode_prompt(tokenizer, closed_book_messages(question.question))
    out = [example(closed_prompt, answer, "closed", [])]
    hits = list(hits or [])[: cfg.passages_k]
    if hits and cfg.fusion == "expert":
        # passages reach the model only through the retrieval expert's memory, as `pipeline.fusion: expert`
        # answers: the prompt is the closed-book one, so nothing to cite
        out.append(example(closed_prompt, answer, "open", memory_ids(hits)))
        return out
    while hits:
        prompt = encode_prompt(tokenizer, open_book_messages(question.question, hits, cfg.passage_max_chars))
        if len(prompt) + 8 <= cfg.seq_len or len(hits) == 1:
            break
        hits = hits[:-1]
    if hits:
        # Cite the first passage that holds an answer, judged as evaluation judges answers (word boundaries).
        cite = next((n for n, h in enumerate(hits, 1)
                     if contains_answer(f"{h.title} {h.contents[: cfg.passage_max_chars]}",
                                        question.golden_answers)), None)
        target = answer if cite is None else f"{answer} [{cite}]"
        out.append(example(prompt, target, "open", memory_ids(hits)))
    return out
