"""The retriever's stage 1: inverse-cloze-task (ICT) fine-tuning of the sentence embedder on a corpus.

ICT (Lee et al., 2019, "Latent Retrieval for Weakly Supervised Open Domain QA") makes retrieval pairs from
unlabelled text: one sentence of a passage is the pseudo-question, the rest of that passage its positive,
and the other passages of the batch its negatives. sentence-transformers' MultipleNegativesRankingLoss is
exactly that in-batch softmax, so the loss and the training loop are the library's; this module builds the
pairs (a pure function, `ict_pairs`) and runs the library's training within a wall-clock budget.

Training on the corpus that will be searched is what ICT is for: it adapts the embedder to that corpus's
vocabulary without any question. It also means the passages an evaluation searches were seen in training
(never its questions); results say so.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from expertrag.errors import ExpertRAGError, InputError
from expertrag.retrieval.embedder import TRAINED_META, embedder_identity, embedder_path, passage_text

# A sentence ends at . ! or ? followed by space and an upper-case letter, digit or opening quote/bracket.
# Abbreviations ("e.g. the", "Dr. Smith") then split wrongly now and then; for pseudo-questions that is
# harmless noise, and it keeps the pair builder free of a language model.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])")
# Lee et al. keep the query sentence inside its context 10% of the time, so the encoder still learns that
# word overlap matters (otherwise it learns to avoid it)
KEEP_RATE = 0.1
# ~128 MiniLM tokens: the training sequence length below; the index's passages are at most 200 tokens
MAX_BLOCK_CHARS = 600
MIN_QUERY_WORDS = 5
MAX_QUERY_WORDS = 48


class TextRecord(Protocol):
    id: str
    title: str
    contents: str


@dataclass(frozen=True)
class IctPair:
    query: str  # the sentence
    positive: str  # title + the rest of its block (the whole block when the sentence was kept)
    doc_id: str
    kept: bool  # whether the sentence was left in the positive


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def sentence_blocks(sentences: Sequence[str], max_chars: int = MAX_BLOCK_CHARS) -> list[list[str]]:
    """Consecutive sentences grouped greedily into blocks of at most `max_chars` (a longer sentence is a
    block of its own): passage-sized contexts, like the index's chunks."""
    blocks: list[list[str]] = []
    size = 0
    for s in sentences:
        if blocks and size + 1 + len(s) <= max_chars:
            blocks[-1].append(s)
            size += 1 + len(s)
        else:
            blocks.append([s])
            size = len(s)
    return blocks


def pair_for(record: TextRecord, seed: int = 0, *, keep_rate: float = KEEP_RATE,
             max_block_chars: int = MAX_BLOCK_CHARS, min_query_words: int = MIN_QUERY_WORDS,
             max_query_words: int = MAX_QUERY_WORDS) -> IctPair | None:
    """One ICT pair from a record, or None when it has no block of two or more sentences with a usable one.

    The choices are seeded by (seed, record id), so a record's pair does not depend on which other records
    are read with it or in what order."""
    rng = random.Random(f"{seed}:{record.id}")
    blocks = [b for b in sentence_blocks(split_sentences(record.contents), max_block_chars) if len(b) >= 2]
    rng.shuffle(blocks)
    for block in blocks:
        usable = [i for i, s in enumerate(block) if min_query_words <= len(s.split()) <= max_query_words]
        if not usable:
            continue
        i = rng.choice(usable)
        kept = rng.random() < keep_rate
        rest = block if kept else block[:i] + block[i + 1:]
        return IctPair(query=block[i], positive=passage_text(record.title, " ".join(rest)), doc_id=record.id,
                       kept=kept)
    return None


def ict_pairs(records: Iterable[TextRecord], *, max_pairs: int | None = None, seed: int = 0,
              keep_rate: float = KEEP_RATE, max_block_chars: int = MAX_BLOCK_CHARS,
              min_query_words: int = MIN_QUERY_WORDS, max_query_words: int = MAX_QUERY_WORDS) -> list[IctPair]:
    """At most one pair per record (two pairs of one record in a batch would be each other's false
    negatives), shuffled with `seed`; the first `max_pairs` of that order. Records of several corpora are
    sampled in proportion to their number of usable records."""
    if max_pairs is not None and max_pairs <= 0:
        raise InputError(f"max_pairs must be positive, got {max_pairs}")
    if not 0.0 <= keep_rate <= 1.0:
        raise InputError(f"keep_rate must be within [0, 1], got {keep_rate}")
    pairs = [p for r in records if (p := pair_for(r, seed, keep_rate=keep_rate, max_block_chars=max_block_chars,
                                                  min_query_words=min_query_words,
                                                  max_query_words=max_query_words)) is not None]
    random.Random(seed).shuffle(pairs)
    return pairs if max_pairs is None else pairs[:max_pairs]


# ------------------------------------------------------------------------------------------ training

class _Deadline(Exception):
    """Raised by the budget check inside the library's training loop to stop it (weights stay as trained)."""


class _BudgetEvaluator:
    """An evaluator that sentence-transformers' loop calls after every step: it counts steps and stops the
    loop once the wall-clock budget is spent. It evaluates nothing (returns 0.0, so no 'best model' is saved)."""

    def __init__(self, deadline: float, on_step=None):
        self.deadline = deadline
        self.steps = 0
        self.on_step = on_step
        self.primary_metric = None  # read by the library's model card code

    def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> float:
        if steps < 0:  # the call at the end of an epoch: no step was taken (and after the last, none is left)
            return 0.0
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self.steps)
        if time.monotonic() >= self.deadline:
            raise _Deadline
        return 0.0


def train_ict(pairs: Sequence[IctPair], out: Path, *, base: str = "all-MiniLM-L6-v2", budget_s: float = 1500,
              batch_size: int = 32, lr: float = 2e-5, epochs: int = 1, max_seq_length: int = 128,
              warmup_ratio: float = 0.1, seed: int = 0, sources: Sequence[str] = (), on_step=None) -> dict:
    """Fine-tune `base` on `pairs` with MultipleNegativesRankingLoss (in-batch negatives) for at most
    `epochs` passes or `budget_s` seconds, whichever ends first, and save it to `out` with TRAINED_META.

    The library's loop here is `SentenceTransformer.old_fit` (DataLoader + loss): its current `fit` and
    `SentenceTransformerTrainer` need the `datasets` package, which the project does not depend on. The
    learning rate warms up over `warmup_ratio` of the planned steps and decays linearly to zero at the end
    of the plan; a budget that stops training early leaves it part-way down (the report says how far)."""
    import torch
    from sentence_transformers import InputExample, SentenceTransformer, losses
    from torch.utils.data import DataLoader

    if len(pairs) < 2 * batch_size:
        raise InputError(f"{len(pairs)} ICT pairs are too few for batches of {batch_size} "
                         "(in-batch negatives need full batches): give more data or a smaller --batch-size")
    if budget_s <= 0:
        raise InputError(f"the training budget must be positive, got {budget_s} s")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a directory", path=out)
    torch.manual_seed(seed)
    base_dir = embedder_path(base)
    model = SentenceTransformer(str(base_dir), device="cpu")
    saved_length = model.max_seq_length
    model.max_seq_length = max_seq_length
    examples = [InputExample(texts=[p.query, p.positive]) for p in pairs]
    generator = torch.Generator().manual_seed(seed)
    # drop_last: a short last batch would have fewer negatives than the rest
    loader = DataLoader(examples, shuffle=True, batch_size=batch_size, drop_last=True, generator=generator)
    loss = losses.MultipleNegativesRankingLoss(model)
    planned = len(loader) * epochs
    started = time.monotonic()
    budget = _BudgetEvaluator(started + budget_s, on_step)
    stopped_by_budget = False
    try:
        model.old_fit(train_objectives=[(loader, loss)], evaluator=budget, epochs=epochs, evaluation_steps=1,
                      warmup_steps=max(1, int(planned * warmup_ratio)), optimizer_params={"lr": lr},
                      show_progress_bar=False, save_best_model=False)
    except _Deadline:
        stopped_by_budget = True
    elapsed = time.monotonic() - started
    model.max_seq_length = saved_length  # indexing reads passages up to the base model's length
    meta = {"method": "ict", "base": base, "pairs": len(pairs), "batch_size": batch_size, "lr": lr,
            "epochs": epochs, "planned_steps": planned, "steps": budget.steps,
            "examples_seen": budget.steps * batch_size, "stopped_by_budget": stopped_by_budget,
            "budget_s": budget_s, "train_s": round(elapsed, 1), "train_max_seq_length": max_seq_length,
            "warmup_steps": max(1, int(planned * warmup_ratio)), "seed": seed, "sources": list(sources),
            "torch_threads": torch.get_num_threads(), "kept_query_share": sum(p.kept for p in pairs) / len(pairs)}
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_weights_like(base_dir, model, tmp)
    (tmp / TRAINED_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    identity = embedder_identity(str(out))
    if identity is None:  # a folder always has one; guards against a packaged name shadowing the path
        raise ExpertRAGError(f"{out}: saved, but not readable as a local embedder folder")
    return {**meta, "out": str(out), "fingerprint": identity["fingerprint"]}


def save_weights_like(base_dir: Path, model, folder: Path) -> None:
    """The base model's folder with the trained transformer weights in place of its own.

    ICT changes weights only (same architecture, tokenizer, pooling, sequence length), and the current
    sentence-transformers saves configs in a newer layout (pooling as `pooling_mode: mean`, no
    `max_seq_length`) that the ONNX export and the chunker do not read; keeping the base's files keeps every
    backend reading the trained model exactly as it reads the base."""
    from safetensors.torch import save_file

    shutil.copytree(base_dir, folder, ignore=shutil.ignore_patterns("model.safetensors", "pytorch_model.bin",
                                                                     "*.onnx", "onnx", "openvino", ".git*"))
    state = {k: v.detach().contiguous() for k, v in model[0].auto_model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
