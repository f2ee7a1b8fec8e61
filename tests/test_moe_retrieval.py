"""Retrieval expert: masked without passages (affinity still reported), a no-op there, and trainable."""

import torch

from expertrag.moe import MoEConfig, MoELayer, PassageMemory

H, INTER = 16, 24


def _pair(**kw):
    """A layer with the retrieval expert and the same layer without it (shared weights)."""
    torch.manual_seed(0)
    base = {
        "num_experts": 4,
        "top_k": 2,
        "router_init_std": 0.5,
        "retrieval_rank": 8,
        "retrieval_heads": 2,
        **kw,
    }
    with_r = MoELayer(MoEConfig(retrieval_expert=True, retrieval_out_init_std=0.1, **base), H, INTER)
    without = MoELayer(MoEConfig(**base), H, INTER)
    state = {k: v for k, v in with_r.state_dict().items() if not k.startswith("retrieval.")}
    state["router.weight"] = state["router.weight"][:4]
    without.load_state_dict(state)
    with torch.no_grad():  # make the retrieval slot attractive so it would fire if allowed
        with_r.router.weight[4] = with_r.router.weight[:4].sum(0) * 3
    return with_r, without


def test_masked_without_passages():
    with_r, without = _pair()
    x = torch.randn(2, 6, H)
    y_ref, aux_ref = without(x)
    empty = PassageMemory(torch.randn(2, 3, H), torch.zeros(2, 3, dtype=torch.bool))
    for passages in (None, empty):
        y, aux = with_r(x, passages)
        torch.testing.assert_close(y, y_ref)
        assert aux.router_logits.shape == (12, 5)
        assert aux.tokens_per_expert[-1] == 0  # never fired
        torch.testing.assert_close(aux.tokens_per_expert[:4], aux_ref.tokens_per_expert)
        # affinity from the unmasked logits: the raw logit is still there
        expected = torch.softmax(aux.router_logits, -1)[:, -1].reshape(2, 6)
        torch.testing.assert_close(aux.retrieval_affinity, expected)
        assert aux.retrieval_affinity.min() > 0
        torch.testing.assert_close(aux.aux_loss, aux_ref.aux_loss)
    assert aux_ref.retrieval_affinity is None


def test_fires_only_for_sequences_with_passages():
    with_r, without = _pair()
    x = torch.randn(2, 6, H)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, :2] = True
    y, aux = with_r(x, PassageMemory(torch.randn(2, 3, H), mask))
    y_ref, _ = without(x)
    assert aux.tokens_per_expert[-1] > 0
    torch.testing.assert_close(y[1], y_ref[1])  # no passages -> unchanged
    assert not torch.allclose(y[0], y_ref[0])
    # FFN experts unaffected: still exactly k per token
    assert int(aux.tokens_per_expert[:4].sum()) == 2 * 6 * 2


def test_gradients_flow_everywhere():
    with_r, _ = _pair(shared_expert=True)
    x = torch.randn(2, 6, H, requires_grad=True)
    passages = PassageMemory(torch.randn(2, 3, H), torch.ones(2, 3, dtype=torch.bool))
    y, aux = with_r(x, passages)
    (y.square().mean() + aux.aux_loss + aux.z_loss).backward()
    for name, p in with_r.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert with_r.router.weight.grad[4].abs().sum() > 0  # the retrieval slot's router row learns
    assert x.grad.abs().sum() > 0


def test_lora_gradients_flow():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(expert_kind="lora", lora_rank=4, router_init_std=0.5), H, INTER)
    with torch.no_grad():
        layer.experts.b_gate.normal_(0, 0.1)
        layer.experts.b_down.normal_(0, 0.1)
        layer.experts.b_up.normal_(0, 0.1)
    y, aux = layer(torch.randn(2, 5, H))
    (y.square().mean() + aux.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name
