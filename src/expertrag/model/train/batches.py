"""Micro-batches: which examples form global micro-batch m (a pure function of seed and m, so a resumed
run sees what an uninterrupted one does), and their collation into left-padded tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertrag.model.train.config import TrainConfig
from expertrag.model.train.data import TrainingData
from expertrag.model.train.examples import Example, Kind


def stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items start .. start+count of an endless stream of per-epoch permutations of range(n)."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = perm[off: off + count - len(out)]
        out.extend(take)
        pos += len(take)
    return out


def micro_batch(data: TrainingData, cfg: TrainConfig, m: int) -> list[Example]:
    """The examples of global micro-batch m: a pure function of (data, seed, m)."""
    bs = cfg.batch_size
    if not data.qa:
        n_qa = 0
    elif not data.corpus:
        n_qa = bs
    else:  # both kinds: the configured share, but at least one of each when the share allows it
        n_qa = round(bs * cfg.qa_fraction)
        if bs > 1 and 0 < cfg.qa_fraction < 1:
            n_qa = min(max(n_qa, 1), bs - 1)
    out = [data.qa[i] for i in stream_indices(len(data.qa), cfg.seed + 1, m * n_qa, n_qa)] if n_qa else []
    n_c = bs - n_qa
    if n_c:
        out += [data.corpus[i] for i in stream_indices(len(data.corpus), cfg.seed, m * n_c, n_c)]
    return out


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] left-padded
    mask: torch.Tensor  # [B, T] bool
    labels: torch.Tensor  # [B, T] -100 where no loss
    kinds: list[Kind]
    passage_ids: list[list[int]]


def collate(examples: Sequence[Example], pad_id: int, device: Any) -> Batch:
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, T - n:] = torch.as_tensor(e.input_ids)
        labels[b, T - n:] = torch.as_tensor(e.labels)
        mask[b, T - n:] = True
    return Batch(ids.to(device), mask.to(device), labels.to(device), [e.kind for e in examples],
                 [e.passage_ids for e in examples])
