"""Sparse upcycling of our decoder, and which parameters of the result train.

    upcycle(model, moe_cfg)            dense FFNs of the chosen layers -> MoE layers (in place), base frozen
    set_trainable(model, parts)        which MoE parameter groups train: routers / experts / retrieval
    delta_parameters(model)            the MoE parameters that are not the frozen pretrained FFN, by name

Loading a trained one (base + upcycle + checkpoint deltas) is `model.moe_model.load_moe_model`; the
checkpoint format (`model.checkpoint`) builds on this module, never the other way round.

At upcycling every expert equals the dense FFN, routers start near zero and the retrieval expert is an
exact no-op, so the upcycled model computes what the dense one does (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from expertrag.moe.config import MoEConfig, moe_layer_indices

if TYPE_CHECKING:
    import torch
    from torch import nn

    from expertrag.model.llama import LlamaLM

Part = Literal["routers", "experts", "retrieval"]
PARTS: tuple[Part, ...] = ("routers", "experts", "retrieval")

# The demo/default configuration for `expertrag train lm`: small enough to train on a CPU and to ship
# (LoRA rank 8 deltas, every other layer), with the retrieval expert on.
DEMO_MOE = MoEConfig(
    num_experts=4, top_k=2, layers="every:2", expert_kind="lora", lora_rank=8, retrieval_expert=True
)

# Parameters inside an MoE layer that are the (frozen) pretrained dense FFN: rebuilt by upcycling.
_BASE_SUFFIXES = ("experts.base_gate_up", "experts.base_down")


def upcycle(model: LlamaLM, moe_cfg: MoEConfig, *, noise_std: float = 0.0,
            trainable: Iterable[Part] = PARTS) -> LlamaLM:
    """Turn the dense FFNs of `moe_cfg.layers` into MoE layers initialised from them; returns `model`.

    Every base parameter (attention, norms, embeddings, the remaining dense FFNs and the LoRA experts'
    shared FFN) is frozen; `trainable` picks the MoE parameter groups that train (see `set_trainable`).
    noise_std > 0 perturbs full-copy experts (relative to each weight's std) to break their symmetry.
    """
    from expertrag.moe.layer import MoELayer

    layers = moe_layer_indices(moe_cfg.layers, model.args.num_layers)
    already = model.moe_layers
    if already:
        raise ValueError(f"model already has MoE layers {already}; upcycle a dense model")
    for i in layers:
        model.set_ffn(i, MoELayer.from_dense(model.layers[i].mlp, moe_cfg, noise_std=noise_std))
    set_trainable(model, trainable)
    return model


def param_part(name: str) -> Part | None:
    """The trainable group of a parameter name *inside* an MoE layer (None for the frozen base FFN)."""
    if name.endswith(_BASE_SUFFIXES):
        return None
    if name.startswith("router."):
        return "routers"
    if name.startswith("retrieval."):
        return "retrieval"
    if name.startswith(("experts.", "shared_expert.")):
        return "experts"
    raise ValueError(f"unknown MoE parameter {name!r}")


def parse_parts(parts: Iterable[str] | str) -> list[Part]:
    """'routers,experts' or ['routers', 'experts'] -> validated list in canonical order."""
    items = [p.strip() for p in parts.split(",")] if isinstance(parts, str) else [str(p).strip() for p in parts]
    items = [p for p in items if p]
    bad = [p for p in items if p not in PARTS]
    if bad:
        raise ValueError(f"unknown trainable part(s) {bad}; choose from {', '.join(PARTS)}")
    if not items:
        raise ValueError(f"no trainable parts given; choose from {', '.join(PARTS)}")
    return [p for p in PARTS if p in items]


def delta_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> parameter for every MoE-layer parameter that is not the frozen pretrained FFN, in a fixed
    order (by layer, then module order). Names are the model's own (`layers.3.mlp.router.weight`)."""
    from expertrag.moe.layer import MoELayer

    out: dict[str, torch.Tensor] = {}
    for li, layer in enumerate(model.layers):
        mlp = layer.mlp
        if not isinstance(mlp, MoELayer):
            continue
        for name, p in mlp.named_parameters():
            if param_part(name) is not None:
                out[f"layers.{li}.mlp.{name}"] = p
    return out


def set_trainable(model: nn.Module, parts: Iterable[Part] | str = PARTS) -> dict[str, torch.Tensor]:
    """Freeze everything, then unfreeze the MoE parameters of the chosen groups; returns them by name."""
    chosen = set(parse_parts(parts))
    for p in model.parameters():
        p.requires_grad_(False)
    out = {}
    for name, p in delta_parameters(model).items():
        if param_part(name.split(".mlp.", 1)[1]) in chosen:
            p.requires_grad_(True)
            out[name] = p
    return out


def parameter_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the model's distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total
