"""Continued training of the upcycled MoE model (`expertrag train lm`).

Data
- Corpus files (JSONL `{id, title, contents}`, or anything `iter_documents` reads): each document as
  "title\\ncontents" + EOS, concatenated in file order and cut into fixed `seq_len`-token blocks; the loss
  is on every token.
- Question files (`{id, question, golden_answers, metadata}`): each question with an answer becomes a
  closed-book example (question only) and, when passages can be found, an open-book one (numbered
  passages + question), both rendered with the chat template exactly as the pipeline prompts them
  (`pipeline.prompts`). The target is the first golden answer (+ " [n]" citing the first passage that
  contains an answer, as the open-book system prompt asks) + EOS; the loss is on those tokens only.
  Passages come from `Index(dir).search` when an index is given, else from `metadata.context_ids` looked
  up in the corpus files given. Open-book examples also hand the passages to the retrieval expert
  (`model.encode_passages`), so the routers and the retrieval expert learn when passages help.
A data file is a question file when its first record has a `question` field, else a corpus.

Loop: AdamW over the chosen MoE parameter groups (the base stays frozen), gradient accumulation,
clipping, warm-up + constant/cosine learning rate. Loss = cross-entropy + mean over MoE layers of
(aux_loss_coef * load balancing + z_loss_coef * z-loss), padding excluded. The order of examples is a
pure function of (seed, step), so a run resumed from a checkpoint computes exactly what an uninterrupted
run does (optimizer state, RNG state and fp32 master weights are saved with every checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from expertrag.errors import ExpertRAGError, InputError

if TYPE_CHECKING:
    import torch

    from expertrag.config import ExpertRAGConfig
    from expertrag.model.llama import LlamaLM
    from expertrag.moe.config import MoEConfig

log = logging.getLogger("expertrag.train")

Kind = Literal["corpus", "closed", "open"]
KINDS: tuple[Kind, ...] = ("corpus", "closed", "open")
SUMMARY_FILE = "train_summary.json"


class TrainConfig(BaseModel):
    """Continued training of the upcycled MoE model (`expertrag train lm`). Owned by model/train_lm.py."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(200, gt=0, description="optimizer steps")
    batch_size: int = Field(4, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    seq_len: int = Field(256, ge=16, description="tokens per corpus block and at most per QA example")
    qa_fraction: float = Field(
        0.5, ge=0, le=1, description="share of each micro-batch drawn from QA examples when both QA and corpus "
        "data are given (the rest are corpus blocks)")
    trainable: list[Literal["routers", "experts", "retrieval"]] = Field(
        default_factory=lambda: ["routers", "experts", "retrieval"],
        description="MoE parameter groups that train (a list or 'routers,experts,retrieval'); the base "
        "model's weights always stay frozen")
    lr: float = Field(5e-4, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(10, ge=0, description="linear learning-rate warm-up steps")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="after warm-up: constant, or cosine decay to min_lr_ratio * lr at the last step")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate / lr for the cosine schedule")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 = off)")
    seed: int = Field(0, description="seed for the expert initialisation, the data order and router jitter")
    passages_k: int = Field(3, gt=0, description="passages per open-book example (dropped from the end if "
                            "the prompt does not fit seq_len)")
    passage_max_chars: int = Field(400, gt=0, description="characters of each passage shown in the prompt")
    max_passage_tokens: int = Field(512, gt=0, description="passage tokens the retrieval expert reads per example")
    search_mode: Literal["bm25", "dense", "hybrid"] = Field("hybrid", description="index search mode (--index)")
    max_corpus_blocks: int | None = Field(None, gt=0, description="use at most this many corpus blocks")
    max_questions: int | None = Field(None, gt=0, description="use at most this many questions per file")
    checkpoint_every: int = Field(50, ge=0, description="write a checkpoint every N steps (0 = only at the end)")
    save_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="dtype of the shipped delta tensors (resuming stays exact: fp32 master copies "
        "go into the training state)")
    log_every: int = Field(10, gt=0, description="steps between balance/collapse checks and log lines")
    device: str | None = Field(None, description="torch device; None = cuda if available, else the model's")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (None = torch's default; 1 is often "
                                "fastest on a small shared machine)")

    @field_validator("trainable", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        from expertrag.model.upcycle import parse_parts

        return parse_parts(v) if isinstance(v, str | list | tuple) else v


# --------------------------------------------------------------------------------------------- data


@dataclass
class Example:
    """One training sequence. labels[t] = input_ids[t] where the loss applies, else -100 (no shift)."""

    input_ids: list[int]
    labels: list[int]
    kind: Kind
    passage_ids: list[int] = field(default_factory=list)  # what the retrieval expert reads (open-book)


@dataclass
class TrainingData:
    corpus: list[Example]
    qa: list[Example]
    files: dict[str, str]  # path -> "questions" | "corpus"
    skipped_questions: int = 0  # no golden answer
    no_passages: int = 0  # questions with no passages found (closed-book only)

    def counts(self) -> dict[str, int]:
        return {
            "corpus_blocks": len(self.corpus),
            "closed_book": sum(e.kind == "closed" for e in self.qa),
            "open_book": sum(e.kind == "open" for e in self.qa),
            "questions_without_answer": self.skipped_questions,
            "questions_without_passages": self.no_passages,
        }


def data_file_kind(path: str | Path) -> Literal["questions", "corpus"]:
    """'questions' if the file's first JSONL record has a `question` field, else 'corpus'."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or directory", path=p)
    if p.is_dir() or p.suffix.lower() != ".jsonl":
        return "corpus"
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"not a JSONL data file (first record does not parse: {e})", path=p,
                                 line=lineno) from None
            if not isinstance(obj, dict):
                raise InputError("not a JSONL data file (first record is not a JSON object)", path=p, line=lineno)
            return "questions" if "question" in obj else "corpus"
    raise InputError("empty file: no records", path=p)


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no EOS token")
    return int(eos)


def corpus_blocks(docs: Any, tokenizer: Any, seq_len: int, limit: int | None = None) -> list[Example]:
    """Documents -> "title\\ncontents" + EOS, concatenated, cut into seq_len-token blocks (a last partial
    block is kept when it has at least seq_len / 4 tokens)."""
    eos = _eos_id(tokenizer)
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


def _contains_answer(text: str, answers: Sequence[str]) -> bool:
    low = text.lower()
    return any(a.strip().lower() in low for a in answers if a.strip())


def qa_examples(question: Any, hits: Sequence[Any] | None, tokenizer: Any, cfg: TrainConfig) -> list[Example]:
    """The closed-book and (with hits) open-book examples of one question; [] without an answer."""
    from expertrag.model.generation import encode_prompt
    from expertrag.pipeline.prompts import closed_book_messages, open_book_messages

    if not question.golden_answers:
        return []
    eos = _eos_id(tokenizer)
    answer = question.golden_answers[0].strip()

    def example(prompt: list[int], target: str, kind: Kind, passage_ids: list[int]) -> Example:
        tgt = [*tokenizer(target, add_special_tokens=False)["input_ids"], eos]
        room = max(cfg.seq_len - len(tgt), 1)
        prompt = prompt[-room:]  # left-truncate a prompt that still does not fit
        ids = prompt + tgt
        return Example(ids, [-100] * len(prompt) + tgt, kind, passage_ids)

    out = [example(encode_prompt(tokenizer, closed_book_messages(question.question)), answer, "closed", [])]
    hits = list(hits or [])[: cfg.passages_k]
    while hits:
        prompt = encode_prompt(tokenizer, open_book_messages(question.question, hits, cfg.passage_max_chars))
        if len(prompt) + 8 <= cfg.seq_len or len(hits) == 1:
            break
        hits = hits[:-1]
    if hits:
        cite = next((n for n, h in enumerate(hits, 1)
                     if _contains_answer(f"{h.title} {h.contents[: cfg.passage_max_chars]}",
                                         question.golden_answers)), None)
        target = answer if cite is None else f"{answer} [{cite}]"
        pids: list[int] = []
        for h in hits:
            pids.extend(tokenizer(f"{h.title}: {h.contents}", add_special_tokens=False)["input_ids"])
        out.append(example(prompt, target, "open", pids[: cfg.max_passage_tokens]))
    return out


def load_training_data(files: Sequence[str | Path], tokenizer: Any, cfg: TrainConfig,
                       index: str | Path | None = None) -> TrainingData:
    """Read every data file (see the module doc) into tokenized examples, in a deterministic order."""
    from expertrag.data.questions import load_questions
    from expertrag.data.readers import iter_documents
    from expertrag.retrieval.types import Hit

    if not files:
        raise InputError("no data files given (--data FILE)")
    kinds = {str(p): data_file_kind(p) for p in files}
    corpora = [Path(p) for p, k in kinds.items() if k == "corpus"]
    question_files = [Path(p) for p, k in kinds.items() if k == "questions"]

    docs = list(iter_documents(corpora)) if corpora else []
    corpus = corpus_blocks(docs, tokenizer, cfg.seq_len, cfg.max_corpus_blocks)
    questions = []
    for qf in question_files:
        questions.extend(load_questions(qf)[: cfg.max_questions])

    hits_for: list[list[Any] | None] = [None] * len(questions)
    if questions and index is not None:
        from expertrag.retrieval import Index

        idx = Index(index)
        texts = [q.question for q in questions]
        for start in range(0, len(texts), 64):
            found = idx.search_many(texts[start:start + 64], cfg.passages_k, cfg.search_mode)
            hits_for[start:start + 64] = found
    elif questions and docs:
        by_id = {d.id: d for d in docs}
        for i, q in enumerate(questions):
            ids = q.metadata.get("context_ids") or []
            found = [by_id[c] for c in ids if isinstance(c, str) and c in by_id][: cfg.passages_k]
            hits_for[i] = [Hit(d.id, d.title, d.contents, 0.0) for d in found] or None

    data = TrainingData(corpus=corpus, qa=[], files=kinds)
    for q, hits in zip(questions, hits_for, strict=True):
        exs = qa_examples(q, hits, tokenizer, cfg)
        if not exs:
            data.skipped_questions += 1
            continue
        data.no_passages += len(exs) == 1
        data.qa.extend(exs)
    if not data.corpus and not data.qa:
        raise InputError(f"no training examples in {', '.join(kinds)} (corpora too short for one block of "
                         f"{cfg.seq_len} tokens, or no question with a golden answer)")
    return data


# --------------------------------------------------------------------------------------------- loop


def _stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items start .. start+count of an endless stream of per-epoch permutations of range(n)."""
    import torch

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
    out = [data.qa[i] for i in _stream_indices(len(data.qa), cfg.seed + 1, m * n_qa, n_qa)] if n_qa else []
    n_c = bs - n_qa
    if n_c:
        out += [data.corpus[i] for i in _stream_indices(len(data.corpus), cfg.seed, m * n_c, n_c)]
    return out


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] left-padded
    mask: torch.Tensor  # [B, T] bool
    labels: torch.Tensor  # [B, T] -100 where no loss
    kinds: list[Kind]
    passage_ids: list[list[int]]


def collate(examples: Sequence[Example], pad_id: int, device: Any) -> Batch:
    import torch

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


class _Stats:
    """Routing counts per MoE layer and retrieval counts per example kind, accumulated."""

    def __init__(self, layers: list[int], num_experts: int):
        import torch

        self.layers, self.e = layers, num_experts
        self.counts = torch.zeros(len(layers), num_experts, dtype=torch.float64)
        # per kind: [tokens, fire, want, affinity sum] summed over MoE layers
        self.retr = {k: [0.0, 0.0, 0.0, 0.0] for k in KINDS}

    def reset_counts(self) -> None:
        self.counts.zero_()

    def state(self) -> dict[str, Any]:
        return {"counts": self.counts.clone(), "retr": {k: list(v) for k, v in self.retr.items()}}

    def load(self, s: dict[str, Any]) -> None:
        self.counts.copy_(s["counts"])
        self.retr = {k: list(v) for k, v in s["retr"].items()}

    def shares(self) -> list[list[float]]:
        return (self.counts / self.counts.sum(1, keepdim=True).clamp(min=1)).tolist()

    def retrieval(self) -> dict[str, dict[str, float]]:
        out = {}
        for k, (tok, fire, want, aff) in self.retr.items():
            if tok:
                out[k] = {"tokens": int(tok / max(len(self.layers), 1)), "fire_rate": fire / tok,
                          "want_rate": want / tok, "mean_affinity": aff / tok}
        return out


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps - 1, 1)
    t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _micro_step(model: LlamaLM, batch: Batch, moe_cfg: MoEConfig, sinks: Sequence[_Stats]
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward one micro-batch: (total loss, {ce, aux, z, tokens, targets, ce_sum/n per kind}); the routing
    stats are added to every sink."""
    import torch
    import torch.nn.functional as F

    from expertrag.moe.losses import load_balancing_loss_from_logits, router_z_loss

    passages = None
    has = torch.tensor([bool(p) for p in batch.passage_ids], device=batch.ids.device)
    if bool(has.any()):
        passages = model.encode_passages(batch.passage_ids)
    out = model(batch.ids, attention_mask=batch.mask, passages=passages, output_hidden_states=True,
                logits_to_keep=1)
    h = out.hidden_states[-1][:, :-1]  # final-normed states predicting positions 1..T-1
    targets = batch.labels[:, 1:]
    sel = targets != -100
    logits = model.lm_head(h[sel])
    token_ce = F.cross_entropy(logits.float(), targets[sel], reduction="none")
    ce = token_ce.mean()

    e, k = moe_cfg.num_experts, moe_cfg.top_k
    flat_mask = batch.mask.reshape(-1)
    auxes, zs = [], []
    B, T = batch.ids.shape
    with torch.no_grad():
        kind_rows = {kd: torch.tensor([x == kd for x in batch.kinds], device=batch.ids.device) for kd in KINDS}
    li = 0
    for a in out.aux:
        if a is None:
            continue
        rl = a.router_logits
        auxes.append(load_balancing_loss_from_logits(rl[:, :e], k, flat_mask))
        zs.append(router_z_loss(rl, flat_mask))
        with torch.no_grad():
            top = rl[:, :e].topk(k, dim=-1)
            counts = torch.bincount(top.indices[flat_mask].reshape(-1), minlength=e).double().cpu()
            for st in sinks:
                st.counts[li] += counts
            if rl.shape[1] > e:
                want = (rl[:, e] > top.values[:, -1]).view(B, T)
                fire = want & has[:, None]
                aff = torch.softmax(rl.float(), -1)[:, e].view(B, T)
                for kd, rows in kind_rows.items():
                    m = batch.mask & rows[:, None]
                    if bool(m.any()):
                        add = (float(m.sum()), float((fire & m).sum()), float((want & m).sum()),
                               float((aff * m).sum()))
                        for st in sinks:
                            st.retr[kd] = [x + y for x, y in zip(st.retr[kd], add, strict=True)]
        li += 1
    aux = torch.stack(auxes).mean() if auxes else ce.new_zeros(())
    z = torch.stack(zs).mean() if zs else ce.new_zeros(())
    total = ce + moe_cfg.aux_loss_coef * aux + moe_cfg.z_loss_coef * z
    info = {"ce": float(ce.detach()), "aux": float(aux.detach()), "z": float(z.detach()),
            "tokens": float(batch.mask.sum()), "targets": float(sel.sum())}
    with torch.no_grad():
        row_of = torch.arange(B, device=sel.device)[:, None].expand(B, T - 1)[sel]
        for kd, rows in kind_rows.items():
            tm = rows[row_of]
            info[f"ce_sum_{kd}"] = float(token_ce.detach()[tm].sum())
            info[f"n_{kd}"] = float(tm.sum())
    return total, info


def resolve_device(requested: str | None, model: Any) -> Any:
    import torch

    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return next(model.parameters()).device


def train(model: LlamaLM, data: TrainingData, moe_cfg: MoEConfig, cfg: TrainConfig, *,
          base_model: str, out_dir: str | Path | None = None, resume: bool = False,
          pad_id: int | None = None, progress: bool | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """Train the upcycled `model`'s MoE parameters on `data`; checkpoints go to `out_dir` (if given).

    resume: continue from the checkpoint in out_dir (exactly: same result as an uninterrupted run).
    stop_at: stop (and checkpoint) after this step as if interrupted; the schedule still spans cfg.steps.
    progress: tqdm bar (None = only on a terminal). Returns the summary (see `summarize`).
    """
    import torch
    from tqdm import tqdm

    from expertrag.model.checkpoint import (
        apply_checkpoint,
        check_moe_config,
        is_checkpoint,
        load_training_state,
        read_checkpoint_config,
        save_checkpoint,
    )
    from expertrag.model.upcycle import set_trainable
    from expertrag.moe.stats import LayerStats, collapse_flags

    if not model.moe_layers:
        raise ValueError("model has no MoE layers: upcycle it first")
    device = resolve_device(cfg.device, model)
    model.to(device)
    params = set_trainable(model, cfg.trainable)
    names = list(params)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    pad = pad_id if pad_id is not None else (model.args.pad_token_id or 0)
    stats = _Stats(model.moe_layers, moe_cfg.num_experts)
    window = _Stats(model.moe_layers, moe_cfg.num_experts)  # since the last log line
    end_stats = _Stats(model.moe_layers, moe_cfg.num_experts)  # over the last 10% of cfg.steps
    end_from = cfg.steps - max(1, round(0.1 * cfg.steps))
    history: list[dict[str, float]] = []
    flag_events: list[str] = []
    start = 0
    out = Path(out_dir) if out_dir is not None else None

    if resume:
        if out is None or not is_checkpoint(out):
            raise ExpertRAGError(f"{out}: nothing to resume (no checkpoint there)")
        meta = read_checkpoint_config(out)
        check_moe_config(moe_cfg, meta["moe"], out, model.args.num_layers)
        state = load_training_state(out)
        master = state.get("master")
        apply_checkpoint(model, out, base_model=base_model, tensors=master)
        if state.get("trainable") != list(cfg.trainable):
            raise ExpertRAGError(f"{out}: checkpoint trained {state.get('trainable')}, the config asks for "
                                 f"{list(cfg.trainable)}; resume with the same `trainable`")
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"])
        if torch.cuda.is_available() and state.get("rng_cuda"):
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        history = list(state.get("history", []))
        stats.load(state["stats"])
        end_stats.load(state["end_stats"])
        flag_events = list(state.get("flag_events", []))
        start = int(state["step"])

    def checkpoint(step: int) -> None:
        if out is None:
            return
        ts = {
            "optimizer": opt.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": history,
            "stats": stats.state(),
            "end_stats": end_stats.state(),
            "flag_events": flag_events,
            "trainable": list(cfg.trainable),
        }
        save_checkpoint(model, out, moe_cfg, base_model=base_model, dtype=cfg.save_dtype, step=step,
                        training_state=ts, extra={"train": cfg.model_dump(mode="json"), "data": data.counts()})

    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, disable=(not progress) if progress is not None else None,
               file=sys.stderr, dynamic_ncols=True, desc="train lm")
    e = moe_cfg.num_experts
    win_tokens, win_time = 0.0, 0.0
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = _lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            rec = dict.fromkeys(("ce", "aux", "z", "loss", "tokens", "targets"), 0.0)
            sinks = [stats, window] + ([end_stats] if step >= end_from else [])
            for a in range(cfg.grad_accum):
                batch = collate(micro_batch(data, cfg, step * cfg.grad_accum + a), pad, device)
                total, info = _micro_step(model, batch, moe_cfg, sinks)
                (total / cfg.grad_accum).backward()
                rec["loss"] += float(total.detach()) / cfg.grad_accum
                for key in ("ce", "aux", "z"):
                    rec[key] += info[key] / cfg.grad_accum
                for key, v in info.items():
                    if key in ("tokens", "targets") or key.startswith(("ce_sum_", "n_")):
                        rec[key] = rec.get(key, 0.0) + v
            gnorm = 0.0
            if cfg.max_grad_norm > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], cfg.max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            rec.update(step=step + 1, lr=lr, grad_norm=gnorm, seconds=dt)
            history.append(rec)
            win_tokens += rec["tokens"]
            win_time += dt
            shares = window.counts / window.counts.sum(1, keepdim=True).clamp(min=1)
            bal = float(shares.min() * e)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{win_tokens / max(win_time, 1e-9):.0f}",
                            bal=f"{bal:.2f}", refresh=False)
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                ls = [LayerStats(layer, s, [], 0.0, None, 0) for layer, s in zip(window.layers, shares.tolist(),
                                                                                   strict=True)]
                flags = collapse_flags(ls)
                for f in flags:
                    log.warning("step %d: %s", step + 1, f.message())
                    flag_events.append(f"step {step + 1}: {f.message()}")
                log.info("step %d loss %.4f ce %.4f aux %.4f tok/s %.0f balance(min share x E) %.2f",
                         step + 1, rec["loss"], rec["ce"], rec["aux"], win_tokens / max(win_time, 1e-9), bal)
                window.reset_counts()
                win_tokens, win_time = 0.0, 0.0
            if out is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 \
                    and step + 1 < end:
                checkpoint(step + 1)
    finally:
        bar.close()
        model.eval()
    if out is not None and (start < end or not is_checkpoint(out)):
        checkpoint(max(end, start))
    summary = summarize(history, stats, end_stats, cfg, moe_cfg, data, flag_events, len(names),
                        sum(p.numel() for p in params.values()), str(device))
    if out is not None:
        from expertrag.model.checkpoint import checkpoint_size

        summary["checkpoint"] = str(out)
        summary["checkpoint_bytes"] = checkpoint_size(out)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def summarize(history: list[dict[str, float]], stats: _Stats, end_stats: _Stats, cfg: TrainConfig,
              moe_cfg: MoEConfig,
              data: TrainingData, flag_events: list[str], num_tensors: int, num_params: int,
              device: str) -> dict[str, Any]:
    """Loss at the start and end (means over the first / last 10% of steps), speed, balance, retrieval."""
    n = len(history)
    w = max(1, round(0.1 * n))

    def mean(key: str, part: list[dict[str, float]]) -> float | None:
        return sum(r[key] for r in part) / len(part) if part else None

    first, last = history[:w], history[-w:]
    secs = sum(r["seconds"] for r in history)
    toks = sum(r["tokens"] for r in history)
    e = moe_cfg.num_experts

    def kind_ce(part: list[dict[str, float]], kd: str) -> float | None:
        n_tok = sum(r.get(f"n_{kd}", 0.0) for r in part)
        return sum(r.get(f"ce_sum_{kd}", 0.0) for r in part) / n_tok if n_tok else None

    def shares_of(st: _Stats) -> tuple[dict[str, list[float]], dict[str, float | None]]:
        if not float(st.counts.sum()):
            return {}, {"min_share_x_E": None, "max_share_x_E": None}
        rows = st.shares()
        flat = [x for row in rows for x in row]
        return ({str(layer): [round(x, 4) for x in row] for layer, row in zip(st.layers, rows, strict=True)},
                {"min_share_x_E": min(flat) * e if flat else None, "max_share_x_E": max(flat) * e if flat else None})

    share_all, bal_all = shares_of(stats)
    share_end, bal_end = shares_of(end_stats)
    return {
        "steps": n,
        "loss_start": mean("loss", first),
        "loss_end": mean("loss", last),
        "ce_start": mean("ce", first),
        "ce_end": mean("ce", last),
        "aux_end": mean("aux", last),
        "loss_window_steps": w,
        "tokens": int(toks),
        "seconds": secs,
        "tokens_per_s": toks / secs if secs else None,
        "ce_by_kind": {kd: {"start": kind_ce(first, kd), "end": kind_ce(last, kd)} for kd in KINDS
                       if kind_ce(history, kd) is not None},
        "token_share": share_all,
        "balance": bal_all,
        "token_share_end": share_end,
        "balance_end": bal_end,
        "retrieval": stats.retrieval(),
        "retrieval_end": end_stats.retrieval(),
        "collapse_flags": flag_events,
        "examples": data.counts(),
        "trainable_tensors": num_tensors,
        "trainable_parameters": num_params,
        "device": device,
        "moe": moe_cfg.model_dump(mode="json"),
        "train": cfg.model_dump(mode="json"),
    }


def run_train_lm(data_files: Sequence[str | Path], *, config: ExpertRAGConfig | None = None,
                 train_cfg: TrainConfig | None = None, moe_cfg: MoEConfig | None = None,
                 index: str | Path | None = None, out_dir: str | Path = "runs/lm", resume: bool = False,
                 progress: bool | None = None) -> dict[str, Any]:
    """Load the base model, upcycle it (moe_cfg, default `DEMO_MOE`), read the data, train, checkpoint."""
    import torch

    from expertrag.config import ExpertRAGConfig
    from expertrag.model.loading import load_model
    from expertrag.model.upcycle import DEMO_MOE, upcycle

    config = config or ExpertRAGConfig()
    train_cfg = train_cfg or getattr(config, "train", None) or TrainConfig()
    moe_cfg = moe_cfg or DEMO_MOE
    for p in data_files:  # fail on bad paths before spending seconds on the model
        data_file_kind(p)
    if resume and not (Path(out_dir) / "moe.json").is_file():
        raise ExpertRAGError(f"{out_dir}: nothing to resume (no checkpoint there)")
    if train_cfg.threads is not None:
        torch.set_num_threads(train_cfg.threads)
    model, tokenizer = load_model(config.model)
    torch.manual_seed(train_cfg.seed)
    upcycle(model, moe_cfg, trainable=train_cfg.trainable)
    data = load_training_data(data_files, tokenizer, train_cfg, index)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    return train(model, data, moe_cfg, train_cfg, base_model=config.model.base, out_dir=out_dir, resume=resume,
                 pad_id=pad, progress=progress)
