"""Our decoder vs transformers' Llama: same logits (tiny random configs, then SmolLM2's real weights)."""

from __future__ import annotations

import copy

import pytest
import torch

from expertrag.model.llama import DenseFFN, KVCache, LlamaArgs, LlamaLM
from expertrag.moe.types import MoEAux, PassageMemory

ATOL = 1e-4


def left_padded(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, seqs))
    ids = torch.tensor([[pad] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def hf_logits(hf, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    kwargs = {}
    if mask is not None:  # transformers' forward takes positions from the caller (generate derives them)
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    with torch.inference_mode():
        return hf(input_ids=ids, **kwargs).logits


def pair_from_config(config: dict):
    """A random transformers LlamaForCausalLM and our LlamaLM holding the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    ours = LlamaLM(LlamaArgs.from_hf(hf.config))
    ours.load_hf_state_dict(hf.state_dict())
    return ours.eval(), hf


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": False, "num_key_value_heads": 4},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16, "rope_theta": 10000.0}},
], ids=["tied-gqa", "untied-mha", "rope-linear", "rope-llama3"])
def test_tiny_configs_match_transformers(tiny_llama_config, overrides):
    ours, hf = pair_from_config({**tiny_llama_config, **overrides})
    ids, mask = left_padded([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]])
    with torch.inference_mode():
        got = ours(ids, attention_mask=mask).logits
    want = hf_logits(hf, ids, mask)
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)


def test_kv_cache_grow_crop_copy(tiny_llama):
    ids = torch.randint(2, 128, (2, 9))
    with torch.inference_mode():
        full = tiny_llama(ids).logits
        cache = KVCache.for_model(tiny_llama, 2, capacity=2)  # forces growth
        steps = [tiny_llama(ids[:, :4], cache=cache).logits]
        steps += [tiny_llama(ids[:, t:t + 1], cache=cache).logits for t in range(4, 9)]
        assert cache.length == 9 and cache.capacity >= 9
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        branch = cache.copy()
        cache.crop(6)
        again = tiny_llama(ids[:, 6:7], cache=cache).logits
        assert torch.allclose(again[:, 0], full[:, 6], atol=1e-5)
        assert branch.length == 9 and cache.length == 7
        with pytest.raises(ValueError):
            cache.crop(8)


def test_pluggable_ffn_and_passages(tiny_llama):
    calls = []

    class Spy(torch.nn.Module):  # an FFN with the MoE contract, wrapping the dense one
        def __init__(self, dense):
            super().__init__()
            self.dense = dense

        def forward(self, x, passages=None, attention_mask=None):
            calls.append(passages)
            y, _ = self.dense(x)
            n = x.shape[0] * x.shape[1]
            return y, MoEAux(router_logits=torch.zeros(n, 2), aux_loss=torch.tensor(0.0),
                             z_loss=torch.tensor(0.0), tokens_per_expert=torch.tensor([n, 0]))

    ids = torch.randint(2, 128, (2, 5))
    memory = tiny_llama.encode_passages([[3, 4, 5], []])
    assert memory.states.shape == (2, 3, 32) and memory.mask.tolist() == [[True] * 3, [False] * 3]
    assert torch.equal(memory.states[0], tiny_llama.embed_tokens.weight[[3, 4, 5]])
    with torch.inference_mode():
        dense = tiny_llama(ids, passages=memory)
        assert dense.aux == [None, None]
        assert isinstance(tiny_llama.layers[1].mlp, DenseFFN)
        tiny_llama.set_ffn(1, Spy(tiny_llama.layers[1].mlp))
        plugged = tiny_llama(ids, passages=memory)
    assert tiny_llama.moe_layers == [1]
    assert plugged.aux[0] is None and isinstance(plugged.aux[1], MoEAux)
    assert calls == [memory] and isinstance(calls[0], PassageMemory)
    assert torch.equal(plugged.logits, dense.logits)


def test_dtype_and_hidden_states(tiny_llama):
    ids = torch.randint(2, 128, (1, 6))
    with torch.inference_mode():
        out = tiny_llama(ids, output_hidden_states=True, logits_to_keep=1)
        assert len(out.hidden_states) == 3 and out.logits.shape == (1, 1, 128)
        half = copy.deepcopy(tiny_llama).to(torch.bfloat16)(ids).logits
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


# ------------------------------------------------------------------------------ SmolLM2 real weights

TEXTS = ["The capital of France is", "Hello, my name is John and I like to eat", "1 2 3"]


@pytest.mark.slow
def test_smollm2_architecture_read_from_config(smollm2):
    model, _ = smollm2
    a = model.args
    assert (a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads, a.intermediate_size) == (576, 30, 9, 3, 1536)
    assert a.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    mlp = model.layers[0].mlp
    assert all(isinstance(getattr(mlp, n), torch.nn.Linear) and getattr(mlp, n).bias is None
               for n in ("gate_proj", "up_proj", "down_proj"))


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    # no padding
    ids = torch.tensor([seqs[1]])
    with torch.inference_mode():
        got = model(ids, output_hidden_states=True)
        want = hf_smollm2(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(got.logits, want.logits, atol=ATOL)
    assert len(got.hidden_states) == len(want.hidden_states) == 31
    assert all(torch.allclose(a, b, atol=ATOL) for a, b in zip(got.hidden_states, want.hidden_states, strict=True))
    # left padding
    ids, mask = left_padded(seqs, pad=tok.pad_token_id)
    with torch.inference_mode():
        got = model(ids, attention_mask=mask).logits
    want = hf_logits(hf_smollm2, ids, mask)
    real = mask.bool()
    assert torch.isfinite(got).all()
    assert torch.allclose(got[real], want[real], atol=ATOL)


@pytest.mark.slow
def test_smollm2_kv_cache_decoding_equals_full_forward(smollm2):
    model, tok = smollm2
    seqs = [tok(t)["input_ids"] for t in TEXTS[:2]]
    ids, mask = left_padded(seqs, pad=tok.pad_token_id)
    more = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]])  # 4 tokens appended to both rows
    full_ids = torch.cat([ids, more], 1)
    full_mask = torch.cat([mask, torch.ones_like(more)], 1)
    with torch.inference_mode():
        full = model(full_ids, attention_mask=full_mask).logits
        for rows in ([1], [0, 1]):  # unpadded single row, then the left-padded batch
            cache = KVCache.for_model(model, len(rows), capacity=ids.shape[1] + 4)
            P = ids.shape[1]
            first = model(ids[rows], attention_mask=mask[rows], cache=cache).logits
            assert torch.allclose(first[mask[rows].bool()], full[rows, :P][mask[rows].bool()], atol=ATOL)
            for t in range(4):
                step = model(more[rows, t:t + 1], attention_mask=full_mask[rows, :P + t + 1], cache=cache).logits
                assert torch.allclose(step[:, 0], full[rows, P + t], atol=ATOL), (rows, t)
