"""`expertrag train lm`: continued training of the upcycled MoE model (see expertrag.model.train)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from expertrag.cli.train import train_app
from expertrag.config import ExpertRAGConfig

if TYPE_CHECKING:
    from expertrag.model.train.config import TrainConfig


@train_app.command("lm")
def train_lm_cmd(
    data: list[Path] = typer.Option(..., "--data", "-d", help="corpus JSONL or question file (repeatable); "
                                    "a file whose rows have `question` is a question file"),
    index: Path | None = typer.Option(None, "--index", "-i", help="index to retrieve open-book passages from "
                                      "(default: metadata.context_ids looked up in the corpus files)"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config (sections model, moe, train)"),
    steps: int | None = typer.Option(None, "--steps", min=1, help="optimizer steps (default: train.steps)"),
    out: Path = typer.Option(Path("runs/lm"), "--out", "-o", help="checkpoint folder"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint in --out"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON line"),
) -> None:
    """Upcycle the base model to MoE and train routers, experts and the retrieval expert.

    The MoE layout is the config's `moe` section when the YAML has one, else the demo layout
    (4 LoRA experts of rank 8, top-2, every other layer, retrieval expert on).
    """
    import logging

    from expertrag.model.train.config import TrainConfig
    from expertrag.model.train.run import run_train_lm
    from expertrag.model.upcycle import DEMO_MOE

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config, train_cfg = load_config(config_path)
    if steps is not None:
        train_cfg = TrainConfig.model_validate({**train_cfg.model_dump(), "steps": steps})
    moe_cfg = config.moe if "moe" in config.model_fields_set else DEMO_MOE
    summary = run_train_lm(data, model_cfg=config.model, train_cfg=train_cfg, moe_cfg=moe_cfg, index=index,
                           retrieval_cfg=config.retrieval, out_dir=out, resume=resume,
                           progress=None if not as_json else False)
    if as_json:
        print(json.dumps(summary, default=str))
        return
    _print_summary(summary)


def load_config(path: Path | None) -> tuple[ExpertRAGConfig, TrainConfig]:
    """The config and its `train` section."""
    from expertrag.model.train.config import TrainConfig

    if path is None:
        return ExpertRAGConfig(), TrainConfig()
    config = ExpertRAGConfig.load(path)
    return config, config.train


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _print_summary(s: dict) -> None:
    ex = s["examples"]
    print(f"trained {s['steps']} steps on {ex['corpus_blocks']} corpus blocks, {ex['closed_book']} closed-book "
          f"and {ex['open_book']} open-book examples ({s['trainable_parameters']:,} trainable parameters, "
          f"{s['device']})")
    print(f"loss {_fmt(s['loss_start'])} -> {_fmt(s['loss_end'])} (ce {_fmt(s['ce_start'])} -> "
          f"{_fmt(s['ce_end'])}; means of the first/last {s['loss_window_steps']} steps)")
    for kind, c in s.get("ce_by_kind", {}).items():
        print(f"  {kind:>6} ce {_fmt(c['start'])} -> {_fmt(c['end'])}")
    print(f"{_fmt(s['tokens_per_s'], '.0f')} tokens/s ({s['tokens']:,} tokens in {s['seconds']:.0f} s)")
    b, be = s["balance"], s["balance_end"]
    print(f"expert balance, token share x E (1.00 = uniform): whole run [{_fmt(b['min_share_x_E'], '.2f')}, "
          f"{_fmt(b['max_share_x_E'], '.2f')}], last {s['loss_window_steps']} steps "
          f"[{_fmt(be['min_share_x_E'], '.2f')}, {_fmt(be['max_share_x_E'], '.2f')}]; per layer (whole run):")
    for layer, share in s["token_share"].items():
        print(f"  layer {layer:>2}: " + " ".join(f"{x:.3f}" for x in share))
    for label, key in (("whole run", "retrieval"), ("last steps", "retrieval_end")):
        for kind, r in s[key].items():
            print(f"retrieval expert, {label}, {kind}: fires for {r['fire_rate']:.1%} of tokens, router wants "
                  f"it for {r['want_rate']:.1%}, mean affinity {r['mean_affinity']:.3f}")
    if s["collapse_flags"]:
        print(f"collapse flags ({len(s['collapse_flags'])}): " + "; ".join(s["collapse_flags"][:5]))
    else:
        print("no collapse flags")
    if "checkpoint" in s:
        print(f"checkpoint: {s['checkpoint']} ({s['checkpoint_bytes'] / 1e6:.1f} MB to ship)")
