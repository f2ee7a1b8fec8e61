"""MoELayer: router + experts (+ shared expert, + retrieval expert), dropless or capacity-limited."""

from __future__ import annotations

import torch
from torch import nn

from expertrag.moe.config import MoEConfig
from expertrag.moe.experts import FullExperts, LoRAExperts, SwiGLU, dense_swiglu_weights
from expertrag.moe.losses import load_balancing_loss, router_z_loss
from expertrag.moe.retrieval_expert import RetrievalExpert, has_passages
from expertrag.moe.router import Router, Routing, dispatch, expert_capacity, route
from expertrag.moe.types import MoEAux, PassageMemory


class MoELayer(nn.Module):
    """Drop-in replacement for a decoder's dense SwiGLU FFN: forward(x [B,T,H]) -> (y [B,T,H], MoEAux)."""

    def __init__(self, cfg: MoEConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.cfg = cfg
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = Router(hidden_size, cfg.num_slots, cfg.router_init_std, cfg.router_jitter)
        if cfg.expert_kind == "full":
            self.experts: FullExperts | LoRAExperts = FullExperts(
                cfg.num_experts, hidden_size, intermediate_size, cfg.expert_init_std
            )
        else:
            self.experts = LoRAExperts(
                cfg.num_experts,
                hidden_size,
                intermediate_size,
                cfg.lora_rank,
                cfg.lora_alpha,
                cfg.expert_init_std,
            )
        self.shared_expert = (
            SwiGLU(hidden_size, cfg.shared_expert_intermediate_size or intermediate_size, cfg.expert_init_std)
            if cfg.shared_expert
            else None
        )
        self.retrieval = (
            RetrievalExpert(hidden_size, cfg.retrieval_rank, cfg.retrieval_heads, cfg.retrieval_out_init_std)
            if cfg.retrieval_expert
            else None
        )

    @classmethod
    def from_dense(cls, dense_ffn: nn.Module, cfg: MoEConfig, noise_std: float = 0.0) -> MoELayer:
        """Sparse upcycling of an HF-Llama-style MLP (gate_proj/up_proj/down_proj, no bias).

        Full experts become copies of the dense FFN (+ Gaussian noise of noise_std x each weight's std);
        LoRA experts share its weights as their frozen base (noise_std must be 0: their random A already
        breaks the symmetry). With a shared expert, both the shared expert and the routed experts get the
        dense down projection halved, so shared + routed still sums to the dense output. The router starts
        near zero (cfg.router_init_std) and the retrieval expert as a no-op: the layer's output equals the
        dense FFN's (exactly, up to float rounding, when renormalize=True).
        """
        gu, _ = dense_swiglu_weights(dense_ffn)
        inter, hidden = gu.shape[0] // 2, gu.shape[1]
        if cfg.shared_expert and cfg.shared_expert_intermediate_size not in (None, inter):
            raise ValueError(
                "from_dense needs shared_expert_intermediate_size None or equal to the dense FFN's"
            )
        if cfg.expert_kind == "lora" and noise_std > 0:
            raise ValueError(
                "noise_std applies to full-copy experts only; LoRA experts start equal by design"
            )
        layer = cls(cfg, hidden, inter).to(device=gu.device, dtype=gu.dtype)
        down_scale = 0.5 if cfg.shared_expert else 1.0
        if isinstance(layer.experts, FullExperts):
            layer.experts.load_dense(dense_ffn, noise_std=noise_std, down_scale=down_scale)
        else:
            layer.experts.load_dense(dense_ffn, down_scale=down_scale)
        if layer.shared_expert is not None:
            layer.shared_expert.load_dense(dense_ffn, down_scale=down_scale)
        return layer

    def route(
        self, x2: torch.Tensor, retrieval_available: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Routing]:
        """Router logits [N, S] fp32 (unmasked) and the routing decision for flat tokens x2 [N, H]."""
        logits = self.router(x2)
        return logits, route(logits, self.num_experts, self.top_k, self.cfg.renormalize, retrieval_available)

    def forward(
        self,
        x: torch.Tensor,
        passages: PassageMemory | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEAux]:
        """x [B, T, H]; passages for the retrieval expert; attention_mask [B, T] (1 = real token) only
        keeps padding out of the aux / z losses (padding tokens are still computed)."""
        b, t, h = x.shape
        n, e = b * t, self.num_experts
        x2 = x.reshape(n, h)
        avail = None
        if self.retrieval is not None:
            avail = has_passages(passages, b, x.device).repeat_interleave(t)
        logits, r = self.route(x2, avail)
        cap = None
        if self.cfg.capacity_factor is not None:
            cap = expert_capacity(self.cfg.capacity_factor, n, self.top_k, e)
        d = dispatch(r.expert_idx, r.expert_weights, e, cap)
        out = self.experts(x2, d)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x2)
        tokens_per_expert = d.counts_tensor
        affinity = None
        if self.retrieval is not None:
            assert r.retrieval_fire is not None and r.retrieval_weight is not None
            fired = r.retrieval_fire.sum()
            if passages is not None and bool(fired):
                ra = self.retrieval(x, passages).reshape(n, h)
                out = out + ra * r.retrieval_weight.to(ra.dtype)[:, None]
            tokens_per_expert = torch.cat([tokens_per_expert, fired.reshape(1)])
            affinity = torch.softmax(logits, dim=-1)[:, e].reshape(b, t)
            # Balance the FFN experts among themselves; retrieval use is left to usefulness (and the gate).
            ffn_probs = torch.softmax(logits[:, :e], dim=-1)
        else:
            ffn_probs = r.probs
        aux = MoEAux(
            router_logits=logits,
            aux_loss=load_balancing_loss(ffn_probs, r.expert_idx, e, attention_mask),
            z_loss=router_z_loss(logits, attention_mask),
            tokens_per_expert=tokens_per_expert,
            retrieval_affinity=affinity,
            dropped_tokens=d.dropped,
        )
        return out.reshape(b, t, h), aux

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"experts={c.num_experts} ({c.expert_kind}), top_k={c.top_k}, shared={c.shared_expert}, "
            f"retrieval={c.retrieval_expert}, capacity_factor={c.capacity_factor}"
        )
