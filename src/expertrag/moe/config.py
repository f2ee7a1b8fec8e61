from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_EVERY = re.compile(r"^every:(\d+)$")


def moe_layer_indices(spec: str, num_layers: int) -> list[int]:
    """Decoder layer indices (0-based, sorted) that become MoE layers.

    "all" -> every layer; "every:N" -> every N-th layer counting from 1, i.e. 0-based N-1, 2N-1, ...
    ("every:2" on 30 layers -> 1, 3, ..., 29; "every:1" == "all"); "0,2,5" -> exactly those layers.
    """
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    s = spec.strip().replace(" ", "")
    if s == "all":
        return list(range(num_layers))
    m = _EVERY.match(s)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"moe layers spec {spec!r}: every:N needs N >= 1")
        if n > num_layers:
            raise ValueError(
                f"moe layers spec {spec!r}: N={n} exceeds the {num_layers} decoder layers (no MoE layer)"
            )
        return list(range(n - 1, num_layers, n))
    if not s or not re.fullmatch(r"\d+(,\d+)*", s):
        raise ValueError(
            f"moe layers spec {spec!r} not understood: use 'all', 'every:N' or a comma list of "
            f"0-based layer indices like '0,2,5'"
        )
    idx = [int(p) for p in s.split(",")]
    bad = [i for i in idx if i >= num_layers]
    if bad:
        raise ValueError(
            f"moe layers spec {spec!r}: indices {bad} out of range for {num_layers} layers (0-based)"
        )
    if len(set(idx)) != len(idx):
        raise ValueError(f"moe layers spec {spec!r}: duplicate layer indices")
    return sorted(idx)


class MoEConfig(BaseModel):
    """The sparse expert layer (router, experts, losses). Owned by the moe/ package."""

    model_config = ConfigDict(extra="forbid")
    num_experts: int = Field(
        4, gt=0, description="routed FFN experts per MoE layer (the retrieval expert is extra)"
    )
    top_k: int = Field(2, gt=0, description="FFN experts each token is sent to")
    layers: str = Field(
        "all",
        description="which decoder layers become MoE: 'all', 'every:N' (0-based N-1, 2N-1, ...) or '0,2,5'",
    )

    # experts
    expert_kind: Literal["full", "lora"] = Field(
        "full",
        description="'full': independent SwiGLU copies [E, ...]; 'lora': one shared frozen SwiGLU + per-expert "
        "low-rank deltas on gate/up/down",
    )
    lora_rank: int = Field(16, gt=0, description="rank r of the LoRA expert deltas")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scale numerator: delta = (alpha / r) * B @ A")
    expert_init_std: float = Field(
        0.02,
        ge=0,
        description="normal std for expert weights when not upcycled from a dense FFN (LoRA A uses 1/sqrt(fan_in))",
    )
    shared_expert: bool = Field(
        False, description="add an always-on shared SwiGLU expert (DeepSeekMoE style)"
    )
    shared_expert_intermediate_size: int | None = Field(
        None, gt=0, description="intermediate size of the shared expert; None = the layer's intermediate size"
    )

    # router
    router_init_std: float = Field(
        1e-3, ge=0, description="normal std of the router weight; near zero so upcycled layers start ~uniform"
    )
    router_jitter: float = Field(
        0.0, ge=0, lt=1, description="training only: router input multiplied by U(1-eps, 1+eps) (0 = off)"
    )
    renormalize: bool = Field(
        True,
        description="top-k weights renormalised to sum to 1 (True) or kept as full-softmax probabilities",
    )

    # dispatch
    capacity_factor: float | None = Field(
        None,
        gt=0,
        description="None = dropless; else each expert takes at most ceil(cf * N * k / E) token-slots, the rest "
        "are dropped (first choices are served before second choices)",
    )

    # losses
    aux_loss_coef: float = Field(
        0.01, ge=0, description="weight of the load-balancing loss in the training loss"
    )
    z_loss_coef: float = Field(1e-3, ge=0, description="weight of the router z-loss in the training loss")

    # retrieval expert
    retrieval_expert: bool = Field(
        False, description="add the retrieval-augmented expert: an extra router slot (last logit column)"
    )
    retrieval_rank: int = Field(
        64, gt=0, description="width of the retrieval expert's low-rank q/k/v projections"
    )
    retrieval_heads: int = Field(
        4, gt=0, description="attention heads of the retrieval expert (must divide rank)"
    )
    retrieval_out_init_std: float = Field(
        0.0, ge=0, description="normal std of the retrieval output projection; 0 = starts as an exact no-op"
    )

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v: str) -> str:
        # Syntax only: the range check needs the model's layer count (moe_layer_indices does it).
        moe_layer_indices(v, 10**6)
        return v

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.retrieval_rank % self.retrieval_heads:
            raise ValueError(
                f"retrieval_rank={self.retrieval_rank} is not divisible by retrieval_heads={self.retrieval_heads}"
            )
        return self

    @property
    def num_slots(self) -> int:
        """Router columns: the FFN experts plus the retrieval slot if any."""
        return self.num_experts + int(self.retrieval_expert)
