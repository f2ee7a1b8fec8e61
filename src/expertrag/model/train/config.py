"""TrainConfig: the `train` section of the root config. Imports no torch (reading a config stays cheap)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from expertrag.model.upcycle import parse_parts


class TrainConfig(BaseModel):
    """Continued training of the upcycled MoE model (`expertrag train lm`). Owned by model/train/."""

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
    fusion: Literal["both", "expert"] = Field(
        "both", description="how open-book examples carry their passages: both = in the prompt and in the "
        "retrieval expert's memory; expert = in the memory only, under the closed-book prompt (so the "
        "expert has something to add; answer with `pipeline.fusion: expert`)")
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
        return parse_parts(v) if isinstance(v, str | list | tuple) else v
