"""The training loop: one micro-step (forward, loss, routing tally) and `train` (AdamW, accumulation,
clipping, schedule, checkpoints, exact resume)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from expertrag.errors import ExpertRAGError
from expertrag.fileio import atomic_write_text
from expertrag.model.checkpoint import (
    apply_checkpoint,
    check_moe_config,
    checkpoint_size,
    is_checkpoint,
    load_training_state,
    read_checkpoint_config,
    save_checkpoint,
)
from expertrag.model.llama import LlamaLM
from expertrag.model.train.batches import Batch, collate, micro_batch
from expertrag.model.train.config import TrainConfig
from expertrag.model.train.data import TrainingData
from expertrag.model.train.examples import KINDS
from expertrag.model.train.schedule import lr_at
from expertrag.model.train.summary import summarize
from expertrag.model.train.tally import RoutingTally, tally_routing
from expertrag.model.upcycle import set_trainable
from expertrag.moe.config import MoEConfig
from expertrag.moe.losses import total_router_loss
from expertrag.moe.stats import LayerStats, collapse_flags

log = logging.getLogger("expertrag.train")

SUMMARY_FILE = "train_summary.json"


def micro_step(model: LlamaLM, batch: Batch, moe_cfg: MoEConfig, sinks: Sequence[RoutingTally]
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward one micro-batch: (total loss, {ce, aux, z, tokens, targets, ce_sum/n per kind}); the routing
    counts are added to every sink (see `tally_routing`)."""
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

    # The MoE layers computed their router losses over the real tokens (the model passes them the mask).
    auxes = [a for a in out.aux if a is not None]
    aux = torch.stack([a.aux_loss for a in auxes]).mean() if auxes else ce.new_zeros(())
    z = torch.stack([a.z_loss for a in auxes]).mean() if auxes else ce.new_zeros(())
    router = total_router_loss(auxes, moe_cfg.aux_loss_coef, moe_cfg.z_loss_coef) if auxes else ce.new_zeros(())
    total = ce + router

    kind_rows = {kd: torch.tensor([x == kd for x in batch.kinds], device=batch.ids.device) for kd in KINDS}
    tally_routing(sinks, auxes, batch.mask, kind_rows, has, moe_cfg.num_experts, moe_cfg.top_k)
    info = {"ce": float(ce.detach()), "aux": float(aux.detach()), "z": float(z.detach()),
            "tokens": float(batch.mask.sum()), "targets": float(sel.sum())}
    B, T = batch.ids.shape
    with torch.no_grad():
        row_of = torch.arange(B, device=sel.device)[:, None].expand(B, T - 1)[sel]
        for kd, rows in kind_rows.items():
            tm = rows[row_of]
            info[f"ce_sum_{kd}"] = float(token_ce.detach()[tm].sum())
            info[f"n_{kd}"] = float(tm.sum())
    return total, info


def resolve_device(requested: str | None, model: Any) -> torch.device:
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
    if not model.moe_layers:
        raise ValueError("model has no MoE layers: upcycle it first")
    device = resolve_device(cfg.device, model)
    model.to(device)
    params = set_trainable(model, cfg.trainable)
    names = list(params)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    pad = pad_id if pad_id is not None else (model.args.pad_token_id or 0)
    stats = RoutingTally(model.moe_layers, moe_cfg.num_experts)
    window = RoutingTally(model.moe_layers, moe_cfg.num_experts)  # since the last log line
    end_stats = RoutingTally(model.moe_layers, moe_cfg.num_experts)  # over the last 10% of cfg.steps
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
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            rec = dict.fromkeys(("ce", "aux", "z", "loss", "tokens", "targets"), 0.0)
            sinks = [stats, window] + ([end_stats] if step >= end_from else [])
            for a in range(cfg.grad_accum):
                batch = collate(micro_batch(data, cfg, step * cfg.grad_accum + a), pad, device)
                total, info = micro_step(model, batch, moe_cfg, sinks)
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
        summary["checkpoint"] = str(out)
        summary["checkpoint_bytes"] = checkpoint_size(out)
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary
