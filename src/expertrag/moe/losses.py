"""Router losses as pure functions (fp32)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from expertrag.moe.types import MoEAux


def _flat_mask(token_mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    if token_mask is None:
        return None
    m = token_mask.reshape(-1).to(device=device, dtype=torch.float32)
    if m.numel() != n:
        raise ValueError(f"token mask has {m.numel()} entries for {n} routed tokens")
    return m


def load_balancing_loss(
    router_probs: torch.Tensor,
    expert_idx: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/Mixtral load balancing: E * sum_i f_i * P_i.

    router_probs [N, E] softmax over the experts, expert_idx [N, k] the chosen experts,
    f_i = (token-slots routed to i) / N (sums to k, as in Mixtral), P_i = mean router probability of i.
    token_mask [N] (or [B, T]) excludes padding. Minimum k at perfectly uniform routing.
    """
    n, k = expert_idx.shape
    m = _flat_mask(token_mask, n, router_probs.device)
    probs = router_probs.float()
    if m is None:
        counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, expert_idx.reshape(-1), torch.ones(n * k, device=probs.device)
        )
        f, p = counts / n, probs.mean(dim=0)
    else:
        denom = m.sum().clamp(min=1.0)
        counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, expert_idx.reshape(-1), m.repeat_interleave(k)
        )
        f, p = counts / denom, (probs * m[:, None]).sum(dim=0) / denom
    return num_experts * torch.sum(f * p)


def load_balancing_loss_from_logits(
    logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Same loss recomputing plain softmax + top-k from FFN-expert logits [N, E]."""
    probs = torch.softmax(logits.float(), dim=-1)
    return load_balancing_loss(probs, probs.topk(top_k, dim=-1).indices, logits.shape[-1], token_mask)


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (keeps router logits small)."""
    z = torch.logsumexp(logits.float(), dim=-1).square()
    m = _flat_mask(token_mask, z.numel(), z.device)
    if m is None:
        return z.mean()
    return (z * m).sum() / m.sum().clamp(min=1.0)


def total_router_loss(auxes: Sequence[MoEAux], aux_loss_coef: float, z_loss_coef: float) -> torch.Tensor:
    """Training term to add to the LM loss: mean over MoE layers of coef_aux*aux + coef_z*z.

    Mean (not sum) so the coefficients do not need retuning when the number of MoE layers changes.
    """
    if not auxes:
        raise ValueError("no MoE layer outputs to combine")
    total = sum(aux_loss_coef * a.aux_loss + z_loss_coef * a.z_loss for a in auxes)
    return total / len(auxes)
