"""Per-token routing among domain experts: their LoRA adapters become the LoRA experts of MoE layers.

`moe.experts.LoRAExperts` computes expert e as the dense SwiGLU with W + (alpha/r) B_e A_e on gate, up and
down: exactly what a peft LoRA adapter on gate_proj/up_proj/down_proj adds to the dense FFN. So the decoder
is upcycled (model.upcycle) with one LoRA expert per domain adapter, each slot's A/B loaded from its
adapter's MLP tensors, the experts frozen and only the token routers trained (`train_router`): the
token-level router then picks among the domain experts, as the upcycled layers do among theirs.

What does not carry over: an adapter's attention deltas (q/k/v/o) are per-layer, not per-token, and are
left out here (train adapters with MLP targets only for this mode). All adapters must share rank and alpha.
Status: unit-tested and compared with per-input routing on two real domains (`expertrag bench
token-routing`, RESULTS.md); not wired into the pipeline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from expertrag.experts.adapter import HF_PREFIX, AdapterError, read_adapter

MLP = ("gate_proj", "up_proj", "down_proj")


def _lora(tensors: dict[str, torch.Tensor], layer: int, proj: str, ab: str, folder: Any) -> torch.Tensor:
    key = f"{HF_PREFIX}layers.{layer}.mlp.{proj}.lora_{ab}.weight"
    if key not in tensors:
        raise AdapterError(f"{folder}: no {key!r}; per-token routing needs adapters on gate_proj, up_proj "
                           "and down_proj of every routed layer")
    return tensors[key]


def token_routed(model: nn.Module, adapters: Sequence[str | os.PathLike[str]], *, top_k: int = 2,
                 layers: str = "all") -> nn.Module:
    """Upcycle the dense `model` (in place) into MoE layers whose experts are these domain adapters (expert
    e = adapters[e]); only the routers are trainable. Returns the model.

    top_k=1 routes hard, but then the (renormalised) combine weight is always 1 and the LM loss gives the
    router no gradient (only the balance loss moves it): train with top_k >= 2."""
    from expertrag.model.upcycle import upcycle
    from expertrag.moe.config import MoEConfig, moe_layer_indices

    if not adapters:
        raise AdapterError("per-token routing needs at least one domain adapter")
    read = [(folder, *read_adapter(folder)) for folder in adapters]
    ranks = {(c.r, float(c.lora_alpha)) for _, c, _ in read}
    if len(ranks) != 1:
        raise AdapterError(f"adapters differ in rank/alpha {sorted(ranks)}; per-token routing needs one (r, alpha)")
    (rank, alpha), = ranks
    cfg = MoEConfig(num_experts=len(read), top_k=min(top_k, len(read)), layers=layers, expert_kind="lora",
                    lora_rank=rank, lora_alpha=alpha, retrieval_expert=False)
    upcycle(model, cfg, trainable=("routers",))
    with torch.no_grad():
        for i in moe_layer_indices(layers, model.args.num_layers):
            ex = model.layers[i].mlp.experts
            for e, (folder, _, t) in enumerate(read):
                ex.a_gate_up[e].copy_(torch.cat([_lora(t, i, "gate_proj", "A", folder),
                                                 _lora(t, i, "up_proj", "A", folder)]))
                ex.b_gate[e].copy_(_lora(t, i, "gate_proj", "B", folder))
                ex.b_up[e].copy_(_lora(t, i, "up_proj", "B", folder))
                ex.a_down[e].copy_(_lora(t, i, "down_proj", "A", folder))
                ex.b_down[e].copy_(_lora(t, i, "down_proj", "B", folder))
    return model.eval()


def train_router(model: nn.Module, examples: Sequence[Any], pad_id: int, *, steps: int, lr: float = 1e-3,
                 batch_size: int = 4, seed: int = 0, aux_coef: float = 0.01) -> dict[str, Any]:
    """Fit the token routers of a `token_routed` model on (mixed-domain) examples by the LM loss plus the
    load-balancing loss; experts and base stay frozen."""
    from expertrag.model.train.batches import collate, stream_indices

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AdapterError("no trainable router: build the model with token_routed first")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = stream_indices(len(examples), seed, step * batch_size, batch_size)
        b = collate([examples[i] for i in idx], pad_id, model.embed_tokens.weight.device)
        out = model(b.ids, attention_mask=b.mask)
        logits = out.logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
        aux = sum((a.aux_loss for a in out.aux if a is not None), torch.zeros(()))
        loss = ce + aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(ce.detach()))
    model.eval()
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 2),
            "trainable_parameters": sum(p.numel() for p in params),
            "ce_start": round(sum(losses[:5]) / min(5, len(losses)), 4) if losses else None,
            "ce_end": round(sum(losses[-5:]) / min(5, len(losses)), 4) if losses else None}
