"""Router losses: equal to transformers' Mixtral loss, z-loss by hand, and the aux loss balances."""

import math

import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from expertrag.moe import (
    MoEConfig,
    MoELayer,
    layer_stats,
    load_balancing_loss,
    load_balancing_loss_from_logits,
    router_z_loss,
    total_router_loss,
)


def test_aux_loss_matches_transformers():
    torch.manual_seed(0)
    logits = torch.randn(2 * 7, 5) * 2
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    for k in (1, 2, 3):
        ref = load_balancing_loss_func((logits,), num_experts=5, top_k=k)
        torch.testing.assert_close(load_balancing_loss_from_logits(logits, k), ref)
        ref_m = load_balancing_loss_func((logits,), num_experts=5, top_k=k, attention_mask=mask)
        torch.testing.assert_close(load_balancing_loss_from_logits(logits, k, mask), ref_m)


def test_layer_aux_loss_is_mixtral_loss_on_its_logits():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, router_init_std=0.5), 16, 8)
    _, aux = layer(torch.randn(2, 6, 16))
    ref = load_balancing_loss_func((aux.router_logits,), num_experts=4, top_k=2)
    torch.testing.assert_close(aux.aux_loss, ref)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
    e = math.e
    lse = [math.log(2.0), math.log(e + e**2), math.log(e**3 + e**-1)]
    expected = sum(v**2 for v in lse) / 3
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))
    torch.testing.assert_close(router_z_loss(logits, torch.tensor([1, 0, 0])), torch.tensor(lse[0] ** 2))


def test_uniform_routing_gives_minimum_k():
    probs = torch.full((8, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3]] * 4)
    torch.testing.assert_close(load_balancing_loss(probs, idx, 4), torch.tensor(2.0))


def test_total_router_loss_is_mean_over_layers():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(router_init_std=0.5), 16, 8)
    a1, a2 = layer(torch.randn(1, 5, 16))[1], layer(torch.randn(1, 5, 16))[1]
    got = total_router_loss([a1, a2], aux_loss_coef=0.1, z_loss_coef=0.01)
    expected = (0.1 * (a1.aux_loss + a2.aux_loss) + 0.01 * (a1.z_loss + a2.z_loss)) / 2
    torch.testing.assert_close(got, expected)


def _train(aux_coef: float) -> float:
    """Tiny Switch-style layer (k=1, weights = probabilities) on skewed data; returns max token share."""
    torch.manual_seed(0)
    h, n = 8, 256
    cfg = MoEConfig(num_experts=4, top_k=1, renormalize=False, router_init_std=0.01)
    layer = MoELayer(cfg, h, 16)
    shift = torch.zeros(h)
    shift[0] = 3.0
    with torch.no_grad():  # skewed start: almost every token prefers expert 0
        layer.router.weight[0] += shift
    x = torch.randn(n, h) + shift
    target = torch.tanh(x @ torch.randn(h, h))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(300):
        y, aux = layer(x[None])
        loss = torch.nn.functional.mse_loss(y[0], target) + aux_coef * aux.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return max(layer_stats(layer(x[None])[1]).token_share)


def test_aux_loss_evens_out_expert_use():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: OpenMP sync costs more than it saves on a shared machine
    try:
        without, with_aux = _train(0.0), _train(0.1)
    finally:
        torch.set_num_threads(threads)
    assert without > 0.8  # stays collapsed on one expert
    assert with_aux < 0.4  # close to uniform 0.25
