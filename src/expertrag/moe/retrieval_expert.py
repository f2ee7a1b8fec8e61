"""The retrieval-augmented expert: light low-rank cross-attention from token states to passage states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertrag.moe.types import PassageMemory


def has_passages(passages: PassageMemory | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """[B] bool: which sequences have at least one real passage token."""
    if passages is None:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    if passages.mask.shape[0] != batch_size or passages.states.shape[0] != batch_size:
        raise ValueError(
            f"passage memory batch {tuple(passages.states.shape)} / mask {tuple(passages.mask.shape)} "
            f"does not match the token batch size {batch_size}"
        )
    return passages.mask.to(device=device, dtype=torch.bool).any(dim=-1)


class RetrievalExpert(nn.Module):
    """q = x Wq, k = M Wk, v = M Wv (all H -> rank, split in heads), out = attn Wo (rank -> H).

    Wo starts at zero (or small), so the expert is a no-op at init and an upcycled model is unchanged.
    """

    def __init__(self, hidden_size: int, rank: int = 64, heads: int = 4, out_init_std: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, rank // heads
        self.q = nn.Linear(hidden_size, rank, bias=False)
        self.k = nn.Linear(hidden_size, rank, bias=False)
        self.v = nn.Linear(hidden_size, rank, bias=False)
        self.o = nn.Linear(rank, hidden_size, bias=False)
        if out_init_std > 0:
            nn.init.normal_(self.o.weight, 0.0, out_init_std)
        else:
            nn.init.zeros_(self.o.weight)

    def forward(self, x: torch.Tensor, passages: PassageMemory) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]; zero for sequences without passages."""
        b, t, _ = x.shape
        mem = passages.states.to(x.dtype)
        mask = passages.mask.to(device=x.device, dtype=torch.bool)
        has = mask.any(dim=-1)
        # A fully masked row would give NaN; let those rows attend everywhere and zero them afterwards.
        mask = mask | ~has[:, None]
        hd, nh = self.head_dim, self.heads
        q = self.q(x).view(b, t, nh, hd).transpose(1, 2)
        k = self.k(mem).view(b, -1, nh, hd).transpose(1, 2)
        v = self.v(mem).view(b, -1, nh, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        out = self.o(a.transpose(1, 2).reshape(b, t, nh * hd))
        return out * has[:, None, None].to(out.dtype)
