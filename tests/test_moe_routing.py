"""Routing invariants and grouped computation vs a naive per-token reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from expertrag.moe import MoEConfig, MoELayer, dispatch, route
from expertrag.moe.experts import _SwiGLUAct, grouped_linear
from expertrag.moe.router import combine_slots, gather_tokens

H, INTER = 16, 24


def _layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "router_init_std": 0.5, **kw})
    layer = MoELayer(cfg, H, INTER)
    if cfg.expert_kind == "lora":  # make the experts differ (B starts at zero)
        with torch.no_grad():
            for p in (layer.experts.b_gate, layer.experts.b_up, layer.experts.b_down):
                p.normal_(0, 0.1)
    return layer


def _reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert, from the effective dense weights."""
    x2 = x.reshape(-1, H)
    logits, r = layer.route(x2)
    cap = None
    if layer.cfg.capacity_factor is not None:
        cap = math.ceil(layer.cfg.capacity_factor * x2.shape[0] * layer.top_k / layer.num_experts)
    kept = dispatch(r.expert_idx, r.expert_weights, layer.num_experts, cap).grid_weights
    out = torch.zeros_like(x2)
    for n in range(x2.shape[0]):
        for j in range(layer.top_k):
            gu, dn = layer.experts.expert_weights(int(r.expert_idx[n, j]))
            g, u = F.linear(x2[n], gu).chunk(2)
            out[n] += kept[n, j] * F.linear(F.silu(g) * u, dn)
        if layer.shared_expert is not None:
            out[n] += layer.shared_expert(x2[n : n + 1])[0]
    return out.reshape(x.shape)


def test_route_invariants():
    torch.manual_seed(0)
    logits = torch.randn(64, 6)
    r = route(logits, num_experts=6, top_k=3)
    assert r.expert_idx.shape == (64, 3)
    assert all(len(set(row.tolist())) == 3 for row in r.expert_idx)  # k distinct experts
    torch.testing.assert_close(r.expert_weights.sum(-1), torch.ones(64))
    # the chosen are the k most probable
    assert torch.equal(r.expert_idx, logits.topk(3).indices)
    raw = route(logits, 6, 3, renormalize=False)
    torch.testing.assert_close(raw.expert_weights, torch.softmax(logits, -1).gather(1, raw.expert_idx))


def test_dropless_dispatch_drops_nothing():
    torch.manual_seed(0)
    idx = torch.randint(0, 4, (50, 1)).repeat(1, 2)
    idx[:, 1] = (idx[:, 0] + 1) % 4
    d = dispatch(idx, torch.full((50, 2), 0.5), 4)
    assert d.dropped == 0 and sum(d.counts) == 100 and d.grid_valid is None
    assert torch.equal(torch.tensor(d.counts), torch.bincount(idx.flatten(), minlength=4))
    # grouped by expert, and each group really holds that expert's tokens
    sorted_e = idx.flatten()[d.sorted_to_grid]
    assert torch.equal(sorted_e, sorted_e.sort().values)
    assert torch.equal(d.sorted_to_grid // 2, d.token_idx)


def test_capacity_drops_and_reports():
    idx = torch.zeros(10, 2, dtype=torch.long)
    idx[:, 1] = torch.arange(10) % 3 + 1  # expert 0 is everyone's first choice
    cap = math.ceil(1.0 * 10 * 2 / 4)  # 5
    d = dispatch(idx, torch.full((10, 2), 0.5), 4, cap)
    assert max(d.counts) <= cap and d.counts[0] == 5
    assert d.dropped == 20 - sum(d.counts) == 5
    assert d.grid_valid[:5, 0].all() and not d.grid_valid[5:, 0].any()  # earliest first choices kept
    assert (d.grid_weights[5:, 0] == 0).all()

    layer = _layer(capacity_factor=0.5)
    x = torch.randn(2, 12, H)
    y, aux = layer(x)
    assert aux.dropped_tokens > 0
    assert aux.tokens_per_expert.sum() == 2 * 12 * 2 - aux.dropped_tokens
    assert aux.tokens_per_expert.max() <= math.ceil(0.5 * 24 * 2 / 4)
    torch.testing.assert_close(y, _reference(layer, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("shared", [False, True])
def test_grouped_equals_naive_reference(kind, shared):
    layer = _layer(expert_kind=kind, shared_expert=shared)
    x = torch.randn(3, 7, H)
    y, aux = layer(x)
    assert aux.dropped_tokens == 0 and int(aux.tokens_per_expert.sum()) == 3 * 7 * 2
    torch.testing.assert_close(y, _reference(layer, x), atol=1e-5, rtol=1e-4)


def test_renormalize_off_matches_reference():
    layer = _layer(renormalize=False, top_k=1)
    x = torch.randn(2, 5, H)
    torch.testing.assert_close(layer(x)[0], _reference(layer, x), atol=1e-5, rtol=1e-4)


def test_dispatch_ops_gradcheck():
    torch.manual_seed(0)
    idx = torch.randint(0, 3, (6, 2))
    idx[:, 1] = (idx[:, 0] + 1) % 3
    w = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    for cap in (None, 3):
        d = dispatch(idx, w, 3, cap)
        x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t, d=d: gather_tokens(t, d), (x,))
        y = torch.randn(sum(d.counts), 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t, d=d: combine_slots(t, d, 6), (y,))
    gu = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUAct.apply, (gu,))


def test_grouped_linear_fallback_matches(monkeypatch):
    import expertrag.moe.experts as ex

    torch.manual_seed(0)
    x = torch.randn(10, 6, requires_grad=True)
    w = torch.randn(3, 4, 6, requires_grad=True)
    counts = [4, 0, 6]
    y1 = grouped_linear(x, w, counts)
    monkeypatch.setattr(ex, "_HAS_GROUPED_MM", False)
    y2 = grouped_linear(x, w, counts)
    ref = torch.cat([x[:4] @ w[0].T, x[4:] @ w[2].T])
    torch.testing.assert_close(y1, ref)
    torch.testing.assert_close(y2, ref)
    y1.sum().backward()  # expanded (zero-stride) gradient must be accepted


def test_jitter_only_in_training():
    layer = _layer(router_jitter=0.5)
    x = torch.randn(1, 6, H)
    layer.eval()
    assert torch.equal(layer(x)[1].router_logits, layer(x)[1].router_logits)
    layer.train()
    assert not torch.equal(layer(x)[1].router_logits, layer(x)[1].router_logits)


def test_bf16_runs_and_router_is_fp32():
    layer = _layer().to(torch.bfloat16)
    y, aux = layer(torch.randn(2, 4, H, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and aux.router_logits.dtype == torch.float32
