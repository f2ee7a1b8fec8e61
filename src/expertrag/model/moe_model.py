"""The upcycled model of a trained checkpoint, ready to generate: base weights -> upcycle -> deltas."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertrag.model.checkpoint import apply_checkpoint, check_moe_config, read_checkpoint_config
from expertrag.model.config import ModelConfig
from expertrag.model.loading import load_model
from expertrag.model.upcycle import DEMO_MOE, upcycle
from expertrag.moe.config import MoEConfig

if TYPE_CHECKING:
    from expertrag.model.llama import LlamaLM


def load_moe_model(model_cfg: ModelConfig | None = None, moe_cfg: MoEConfig | None = None,
                   checkpoint: str | Path | None = None) -> tuple[LlamaLM, Any]:
    """(upcycled model, tokenizer): base weights of `model_cfg.base`, upcycled with `moe_cfg`, then the
    deltas of `checkpoint` (a folder written by `expertrag train lm` / `save_checkpoint`) applied.

    With a checkpoint, `moe_cfg` may be None (the checkpoint's own MoE config is used); if given, its
    architecture must match the checkpoint's. Without one, `moe_cfg` None means `DEMO_MOE`. The model
    is returned in eval mode with every parameter frozen.
    """
    model_cfg = model_cfg or ModelConfig()
    meta = None
    if checkpoint is not None:
        meta = read_checkpoint_config(checkpoint)  # fail fast, before loading any weights
        saved = MoEConfig.model_validate(meta["moe"])
        if moe_cfg is None:
            moe_cfg = saved
        else:
            check_moe_config(moe_cfg, saved, checkpoint)
    moe_cfg = moe_cfg or DEMO_MOE
    model, tokenizer = load_model(model_cfg)
    upcycle(model, moe_cfg)
    if checkpoint is not None:
        apply_checkpoint(model, checkpoint, base_model=model_cfg.base)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer
