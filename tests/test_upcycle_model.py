"""Upcycling our decoder: equal to the dense model (and to transformers) at init; which parameters train."""

from __future__ import annotations

import copy

import pytest
import torch

from expertrag.model.upcycle import DEMO_MOE, delta_parameters, parameter_bytes, set_trainable, upcycle
from expertrag.moe import MoEConfig, MoELayer

TEXT = "The capital of France is Paris. It is known for the Eiffel Tower and"
PASSAGE = "Paris is the capital and largest city of France, on the river Seine."


def tiny_cfg(kind: str = "lora", **kw) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, layers="all", expert_kind=kind, lora_rank=4, retrieval_expert=True,
                retrieval_rank=8, retrieval_heads=2)
    return MoEConfig(**{**base, **kw})


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_tiny_upcycled_equals_dense(tiny_llama, kind):
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny_llama(ids).logits
        model = upcycle(copy.deepcopy(tiny_llama), tiny_cfg(kind, router_init_std=0.3))
        assert model.moe_layers == [0, 1]
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
        pm = model.encode_passages([[5, 6, 7, 8], []])
        out = model(ids, passages=pm)
        assert sum(int(a.tokens_per_expert[-1]) for a in out.aux) > 0  # the retrieval expert ran ...
        torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)  # ... as a no-op


def test_upcycle_layers_noise_and_errors(tiny_llama):
    model = upcycle(copy.deepcopy(tiny_llama), tiny_cfg("full", layers="every:2"), noise_std=0.01)
    assert model.moe_layers == [1]
    ex = model.layers[1].mlp.experts
    assert not torch.equal(ex.gate_up[0], ex.gate_up[1])
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle(model, tiny_cfg("full"))
    with pytest.raises(ValueError, match="out of range"):
        upcycle(copy.deepcopy(tiny_llama), tiny_cfg(layers="0,5"))


def test_set_trainable_groups(tiny_llama):
    model = upcycle(copy.deepcopy(tiny_llama), tiny_cfg("lora"))
    deltas = delta_parameters(model)
    assert not any("base_gate_up" in n or "base_down" in n for n in deltas)
    assert {n.split(".mlp.")[1].split(".")[0] for n in deltas} == {"router", "experts", "retrieval"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(deltas)  # default: every group; the base (incl. LoRA's shared FFN) is frozen
    only = set_trainable(model, "routers,retrieval")
    assert all(".router." in n or ".retrieval." in n for n in only)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(only)
    assert parameter_bytes(model, trainable_only=True) < parameter_bytes(model)
    with pytest.raises(ValueError, match="unknown trainable part"):
        set_trainable(model, "routers,attention")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_smollm2_upcycled_equals_dense_and_transformers(smollm2, hf_smollm2, kind):
    """Identical experts, no noise: upcycled == dense == transformers' SmolLM2 (fp32 rounding), with the
    retrieval expert on, both without passages and with passages (it starts as a no-op)."""
    model, tok = smollm2
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    cfg = DEMO_MOE.model_copy(update={"expert_kind": kind})
    up = upcycle(copy.deepcopy(model), cfg)
    assert up.moe_layers == list(range(1, 30, 2))
    assert all(isinstance(up.layers[i].mlp, MoELayer) for i in up.moe_layers)
    with torch.inference_mode():
        dense = model(ids).logits
        hf = hf_smollm2(input_ids=ids).logits
        moe = up(ids).logits
        pm = up.encode_passages([tok(PASSAGE, add_special_tokens=False)["input_ids"]])
        with_passages = up(ids, passages=pm)
    torch.testing.assert_close(dense, hf, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(moe, dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(moe, hf, atol=1e-4, rtol=1e-4)
    fired = sum(int(a.tokens_per_expert[-1]) for a in with_passages.aux if a is not None)
    assert fired > 0
    torch.testing.assert_close(with_passages.logits, dense, atol=1e-4, rtol=1e-4)
    assert (moe.argmax(-1) == hf.argmax(-1)).all()


def test_router_losses_ignore_left_padding(tiny_llama):
    """The decoder hands the attention mask to each MoE layer, so padding is not counted in the
    load-balancing or z-loss: a left-padded row has the losses of the same row unpadded."""
    model = upcycle(copy.deepcopy(tiny_llama), tiny_cfg("lora", router_init_std=0.3)).eval()
    ids = torch.randint(2, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 7, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        plain = model(ids).aux
        left = model(padded, attention_mask=mask).aux
    for a, b in zip(plain, left, strict=True):
        torch.testing.assert_close(b.aux_loss, a.aux_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.z_loss, a.z_loss, atol=1e-6, rtol=1e-5)
