"""Sparse upcycling: a layer built from a dense SwiGLU starts equal to it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from expertrag.moe import MoEConfig, MoELayer, PassageMemory

H, INTER = 16, 40


class DenseMLP(nn.Module):  # the HF Llama naming the decoder uses
    def __init__(self, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(H, INTER, bias=bias)
        self.up_proj = nn.Linear(H, INTER, bias=bias)
        self.down_proj = nn.Linear(INTER, H, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.fixture
def dense():
    torch.manual_seed(0)
    return DenseMLP()


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("retrieval", [False, True])
def test_from_dense_equals_dense(dense, kind, shared, retrieval):
    cfg = MoEConfig(
        num_experts=4,
        top_k=2,
        expert_kind=kind,
        shared_expert=shared,
        retrieval_expert=retrieval,
        router_init_std=0.3,
        retrieval_heads=2,
        retrieval_rank=8,
    )
    layer = MoELayer.from_dense(dense, cfg)
    x = torch.randn(2, 9, H)
    passages = PassageMemory(torch.randn(2, 5, H), torch.ones(2, 5, dtype=torch.bool)) if retrieval else None
    y, aux = layer(x, passages)
    with torch.no_grad():
        torch.testing.assert_close(y, dense(x), atol=1e-5, rtol=1e-5)
    if retrieval:  # the retrieval expert did run for some tokens and is a no-op at init
        assert aux.tokens_per_expert[-1] > 0
    # the router starts near zero -> near uniform
    assert aux.router_logits.abs().max() < 5


def test_noise_breaks_symmetry_slightly(dense):
    cfg = MoEConfig(num_experts=4, top_k=2)
    layer = MoELayer.from_dense(dense, cfg, noise_std=0.01)
    assert not torch.equal(layer.experts.gate_up[0], layer.experts.gate_up[1])
    x = torch.randn(1, 6, H)
    with torch.no_grad():
        rel = (layer(x)[0] - dense(x)).norm() / dense(x).norm()
    assert 0 < rel < 0.1


def test_lora_shares_frozen_base(dense):
    layer = MoELayer.from_dense(dense, MoEConfig(expert_kind="lora", lora_rank=4))
    ex = layer.experts
    assert not ex.base_gate_up.requires_grad and not ex.base_down.requires_grad
    torch.testing.assert_close(ex.base_gate_up[:INTER], dense.gate_proj.weight)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {
        "router.weight",
        "experts.a_gate_up",
        "experts.b_gate",
        "experts.b_up",
        "experts.a_down",
        "experts.b_down",
    }
    with pytest.raises(ValueError, match="full-copy"):
        MoELayer.from_dense(dense, MoEConfig(expert_kind="lora"), noise_std=0.1)


def test_from_dense_rejects_bias_and_dtype_follows(dense):
    with pytest.raises(ValueError, match="bias"):
        MoELayer.from_dense(DenseMLP(bias=True), MoEConfig())
    layer = MoELayer.from_dense(dense.to(torch.bfloat16), MoEConfig())
    assert layer.experts.gate_up.dtype == torch.bfloat16
