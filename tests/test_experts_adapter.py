"""LoRA adapters of domain experts: peft format, bit-exact round trip, loadable by peft onto transformers'
LlamaForCausalLM, attach/detach at run time, and training with the base frozen."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from expertrag.experts.adapter import (
    CONFIG_FILE,
    HF_PREFIX,
    WEIGHTS_FILE,
    AdapterError,
    adapter_state,
    attach,
    detach,
    has_adapter,
    load_adapter,
    lora_config,
    mean_nll,
    save_adapter,
    train_adapter,
    with_adapter,
)
from expertrag.model.train.examples import Example


def _randomise_b(model, seed=1, std=0.1):
    # a fresh adapter has B = 0 (it changes nothing); give it weights so round trips are meaningful
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 64]])


def test_round_trip_is_bit_exact(tiny_llama, tmp_path):
    base = copy.deepcopy(tiny_llama)
    attach(tiny_llama, lora_config(rank=4, targets=("q_proj", "v_proj", "down_proj")), seed=0)
    _randomise_b(tiny_llama)
    want = tiny_llama(IDS).logits
    save_adapter(tiny_llama, tmp_path / "a", info={"name": "x"})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_FILE, "adapter_model.safetensors",
                                                                   "expertrag_adapter.json"]
    cfg = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    load_adapter(base, tmp_path / "a")
    a, b = adapter_state(tiny_llama), adapter_state(base)
    assert a.keys() == b.keys() and len(a) == 2 * 3 * 2  # A and B of 3 projections in 2 layers
    assert all(k.startswith(HF_PREFIX) for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(base(IDS).logits, want)
    # greedy decoding, one token at a time (the 1-row fast path of model.llama.project included)
    def greedy(m):
        ids = IDS.clone()
        with torch.no_grad():
            for _ in range(6):
                ids = torch.cat([ids, m(ids).logits[:, -1:].argmax(-1)], 1)
        return ids.tolist()
    assert greedy(base) == greedy(tiny_llama)


def test_detach_puts_the_base_model_back_exactly(tiny_llama):
    with torch.no_grad():
        before = tiny_llama(IDS).logits
        one_token = tiny_llama(IDS[:, :1]).logits
    q = tiny_llama.layers[0].self_attn.q_proj
    attach(tiny_llama, lora_config(rank=2), seed=0)
    _randomise_b(tiny_llama)
    with torch.no_grad():
        assert not torch.allclose(tiny_llama(IDS).logits, before)
        # a single row takes project()'s fused fast path: it must not skip the adapter
        assert not torch.allclose(tiny_llama(IDS[:, :1]).logits, one_token)
    with pytest.raises(AdapterError, match="already carries an adapter"):
        attach(tiny_llama, lora_config(rank=2), seed=0)
    detach(tiny_llama)
    assert not has_adapter(tiny_llama) and tiny_llama.layers[0].self_attn.q_proj is q
    assert not hasattr(tiny_llama, "peft_config")
    with torch.no_grad():
        assert torch.equal(tiny_llama(IDS).logits, before)


def test_peft_loads_it_onto_transformers_llama(tiny_llama_config, tmp_path):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from expertrag.model.llama import LlamaArgs, LlamaLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**tiny_llama_config)).eval()
    ours = LlamaLM(LlamaArgs.from_hf(tiny_llama_config))
    ours.load_hf_state_dict({k: v.clone() for k, v in hf.state_dict().items()})
    ours.eval()
    attach(ours, lora_config(rank=4), seed=0)
    _randomise_b(ours)
    save_adapter(ours, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "a")).eval()
    with torch.no_grad():
        for ids in (IDS, IDS[:, :1]):
            theirs, mine = peft_model(input_ids=ids).logits, ours(ids).logits
            assert torch.allclose(theirs, mine, atol=1e-5), (theirs - mine).abs().max()
        # and the adapter does something there (so the match is not base == base)
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(input_ids=IDS).logits, mine, atol=1e-3)


def test_bad_adapter_folders(tiny_llama, tiny_llama_config, tmp_path):
    with pytest.raises(AdapterError, match=f"{CONFIG_FILE}: missing"):
        load_adapter(tiny_llama, tmp_path)
    other = copy.deepcopy(tiny_llama_config)
    other.update(hidden_size=48, num_attention_heads=6, head_dim=8)
    from expertrag.model.llama import LlamaArgs, LlamaLM

    big = LlamaLM(LlamaArgs.from_hf(other))
    attach(big, lora_config(rank=2), seed=0)
    save_adapter(big, tmp_path / "big")
    with pytest.raises(AdapterError, match="does not fit this model"):
        load_adapter(tiny_llama, tmp_path / "big")
    assert not has_adapter(tiny_llama)  # a failed load leaves the model as it was
    (tmp_path / "big" / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(tiny_llama, tmp_path / "big")


def test_tensors_without_the_llama_prefix_are_refused_by_both_loaders(tiny_llama, tmp_path):
    """load_adapter and the pipeline's AdapterBank read a folder through one helper: a tensor that is not
    named like a Llama adapter's (HF_PREFIX) is one clear error in both, and neither leaves LoRA layers."""
    from safetensors.torch import load_file, save_file

    from expertrag.experts.adapter import AdapterBank

    work = copy.deepcopy(tiny_llama)
    attach(work, lora_config(rank=2, targets=("q_proj",)), seed=0)
    folder = save_adapter(work, tmp_path / "a")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    first = sorted(tensors)[0]
    tensors["base_model.model." + first.removeprefix(HF_PREFIX)] = tensors.pop(first)  # no "model." level
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=r"is not named like a Llama adapter \(expected the prefix"):
        load_adapter(tiny_llama, folder)
    with pytest.raises(AdapterError, match="is not named like a Llama adapter"):
        AdapterBank(tiny_llama).load(folder)
    assert not has_adapter(tiny_llama)


def test_saving_over_an_adapter_replaces_it_whole(tiny_llama, tmp_path):
    attach(tiny_llama, lora_config(rank=2), seed=0)
    save_adapter(tiny_llama, tmp_path / "a")
    _randomise_b(tiny_llama, seed=3)
    save_adapter(tiny_llama, tmp_path / "a")
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary or old folder left behind
    fresh = copy.deepcopy(tiny_llama)
    detach(fresh)
    load_adapter(fresh, tmp_path / "a")
    assert all(torch.equal(v, adapter_state(tiny_llama)[k]) for k, v in adapter_state(fresh).items())


def _pattern_examples(n, offset=0):
    # a learnable "domain": ascending runs of token ids, each sequence from a different start
    return [Example(ids := [(offset + 3 * i + t) % 120 + 4 for t in range(16)], list(ids), "corpus")
            for i in range(n)]


def test_training_moves_only_the_adapter_and_lowers_held_out_loss(tiny_llama):
    base = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    attach(tiny_llama, lora_config(rank=4, alpha=8), seed=0)
    train, heldout = _pattern_examples(24), _pattern_examples(6, offset=1)
    before = {k: v.clone() for k, v in adapter_state(tiny_llama).items()}
    report = train_adapter(tiny_llama, train, heldout, pad_id=0, steps=40, lr=5e-3, batch_size=4)
    assert report["steps"] == 40 and report["trainable_parameters"] == sum(v.numel() for v in before.values())
    assert report["heldout_nll_after"] < report["heldout_nll_before"]
    assert report["perplexity_after"] < report["perplexity_before"] and report["heldout_tokens"] == 6 * 15
    after = adapter_state(tiny_llama)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    detach(tiny_llama)
    assert all(torch.equal(v, base[k]) for k, v in tiny_llama.state_dict().items())  # base frozen
    assert mean_nll(tiny_llama, heldout, 0)[0] == pytest.approx(report["heldout_nll_before"], abs=1e-3)


@pytest.mark.slow
def test_with_adapter_on_the_real_generator(smollm2, tmp_path):
    from expertrag.model.generator import ExpertRAGGenerator

    model, tok = smollm2
    gen = ExpertRAGGenerator(model, tok)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    plain = gen.generate(prompt, max_new_tokens=8).token_ids
    work = copy.deepcopy(model)  # the session's shared model stays untouched
    attach(work, lora_config(rank=4, targets=("q_proj", "v_proj")), seed=0)
    # large enough that greedy decoding must change (at std 0.1 whether 8 tokens change was luck)
    _randomise_b(work, seed=7, std=1.0)
    save_adapter(work, tmp_path / "a")
    with with_adapter(gen, tmp_path / "a"):
        first = gen.generate(prompt, max_new_tokens=8).token_ids
    with with_adapter(gen, tmp_path / "a"):
        second = gen.generate(prompt, max_new_tokens=8).token_ids
    assert first == second != plain  # identical across loads, and the adapter changes something
    assert not has_adapter(model) and gen.generate(prompt, max_new_tokens=8).token_ids == plain


@pytest.mark.slow
def test_an_adapter_of_the_real_model_loads_onto_transformers_smollm2(smollm2, hf_smollm2, tmp_path):
    from peft import PeftModel

    model, tok = smollm2
    work = copy.deepcopy(model)
    attach(work, lora_config(rank=4), seed=0)
    _randomise_b(work, seed=11)
    save_adapter(work, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_smollm2), str(tmp_path / "a")).eval()
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        theirs, mine = peft_model(input_ids=ids).logits, work(ids).logits
        base = model(ids).logits
    assert torch.allclose(theirs, mine, atol=1e-3), (theirs - mine).abs().max()
    assert (mine - base).abs().max() > 1e-2  # the adapter changes the real model's output


def test_a_fresh_adapter_is_drawn_from_its_seed(tiny_llama):
    """Same seed, same A (one `expert train` command gives one adapter); another seed, another A; and the
    caller's torch generator is left where it was."""
    def fresh_a(seed):
        model = copy.deepcopy(tiny_llama)
        attach(model, lora_config(rank=2), seed=seed)
        return {k: v.clone() for k, v in adapter_state(model).items() if "lora_A" in k}

    torch.manual_seed(123)
    want_next = torch.rand(3)
    torch.manual_seed(123)
    a0, a0_again, a1 = fresh_a(0), fresh_a(0), fresh_a(1)
    assert torch.equal(torch.rand(3), want_next)
    assert a0 and all(torch.equal(a0[k], a0_again[k]) for k in a0)
    assert all(not torch.equal(a0[k], a1[k]) for k in a0)
