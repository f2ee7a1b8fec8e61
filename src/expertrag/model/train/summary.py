"""The summary of a training run: loss at the start and end, speed, expert balance, retrieval use."""

from __future__ import annotations

from typing import Any

from expertrag.model.train.config import TrainConfig
from expertrag.model.train.data import TrainingData
from expertrag.model.train.examples import KINDS
from expertrag.model.train.tally import RoutingTally
from expertrag.moe.config import MoEConfig


def summarize(history: list[dict[str, float]], stats: RoutingTally, end_stats: RoutingTally, cfg: TrainConfig,
              moe_cfg: MoEConfig, data: TrainingData, flag_events: list[str], num_tensors: int, num_params: int,
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

    def shares_of(st: RoutingTally) -> tuple[dict[str, list[float]], dict[str, float | None]]:
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
