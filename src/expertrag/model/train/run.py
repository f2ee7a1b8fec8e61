"""run_train_lm: base model -> upcycle -> read the data -> train -> checkpoint (what `expertrag train lm` runs).

It takes the config sections it needs (model, moe, train) as arguments; the caller owns the root config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from expertrag.errors import ExpertRAGError
from expertrag.model.checkpoint import CONFIG_FILE
from expertrag.model.config import ModelConfig
from expertrag.model.loading import load_model
from expertrag.model.train.config import TrainConfig
from expertrag.model.train.data import data_file_kind, load_training_data
from expertrag.model.train.examples import eos_id
from expertrag.model.train.loop import train
from expertrag.model.upcycle import DEMO_MOE, upcycle
from expertrag.moe.config import MoEConfig


def run_train_lm(data_files: Sequence[str | Path], *, model_cfg: ModelConfig | None = None,
                 train_cfg: TrainConfig | None = None, moe_cfg: MoEConfig | None = None,
                 index: str | Path | None = None, out_dir: str | Path = "runs/lm", resume: bool = False,
                 progress: bool | None = None, retrieval_cfg: Any = None) -> dict[str, Any]:
    """Load the base model (model_cfg), upcycle it (moe_cfg, default `DEMO_MOE`), read the data, train
    (train_cfg), checkpoint to out_dir. Returns the training summary. retrieval_cfg: how `index` is searched
    (RetrievalConfig; its embed backend must be the index's)."""
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or TrainConfig()
    moe_cfg = moe_cfg or DEMO_MOE
    for p in data_files:  # fail on bad paths before spending seconds on the model
        data_file_kind(p)
    if resume and not (Path(out_dir) / CONFIG_FILE).is_file():
        raise ExpertRAGError(f"{out_dir}: nothing to resume (no checkpoint there)")
    if train_cfg.threads is not None:
        torch.set_num_threads(train_cfg.threads)
    model, tokenizer = load_model(model_cfg)
    torch.manual_seed(train_cfg.seed)
    upcycle(model, moe_cfg, trainable=train_cfg.trainable)
    data = load_training_data(data_files, tokenizer, train_cfg, index, retrieval_cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    return train(model, data, moe_cfg, train_cfg, base_model=model_cfg.base, out_dir=out_dir, resume=resume,
                 pad_id=pad, progress=progress)
