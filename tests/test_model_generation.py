"""Generation with our decoder: greedy equals transformers, batching, continuation, stops, streaming."""

from __future__ import annotations

import math

import pytest
import torch

from expertrag.model.generation import (
    encode_prompt,
    encode_prompts,
    generate,
    left_pad,
    sample_next,
    stream_generate,
)

CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]
SHORT = [{"role": "user", "content": "What is the capital of France?"}]


def hf_greedy(hf, ids: list[list[int]], pad: int, max_new_tokens: int) -> list[list[int]]:
    x, m = left_pad(ids, pad)
    out = hf.generate(input_ids=x, attention_mask=m.long(), max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=pad, eos_token_id=2)
    rows = []
    for seq in out[:, x.shape[1]:].tolist():
        rows.append(seq[:seq.index(2) + 1] if 2 in seq else seq)
    return rows


def test_sample_next_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0]])
    assert sample_next(logits, 0.0, 1.0, None).tolist() == [1]
    rng = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, 1.0, 0.5, rng).item() == 1 for _ in range(20))  # top-p keeps only the max
    draws = {sample_next(logits, 5.0, 1.0, rng).item() for _ in range(200)}
    assert draws == {0, 1, 2, 3}


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[True] * 3, [False, False, True]]
    with pytest.raises(ValueError):
        left_pad([[1], []], 0)


def test_tiny_model_continuation_and_max_new_tokens_zero(tiny_llama):
    class Tok:  # the engine needs only decode/eos/pad from a tokenizer when given input_ids
        eos_token_id = 1
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    tok, prompt = Tok(), [[5, 9, 17, 33], [7, 8]]
    full = generate(tiny_llama, tok, input_ids=prompt, max_new_tokens=12, eos_token_ids=[])
    zero = generate(tiny_llama, tok, input_ids=prompt, max_new_tokens=0, eos_token_ids=[])
    assert zero.token_ids == [[], []] and zero.state.cache_len == zero.state.tokens.shape[1] - 1
    part = generate(tiny_llama, tok, state=zero.state, max_new_tokens=5, eos_token_ids=[])
    fork = part.state.fork()
    rest = generate(tiny_llama, tok, state=part.state, max_new_tokens=7, eos_token_ids=[])
    assert [a + b for a, b in zip(part.token_ids, rest.token_ids, strict=True)] == full.token_ids
    again = generate(tiny_llama, tok, state=fork, max_new_tokens=7, eos_token_ids=[])  # branch from a copy
    assert again.token_ids == rest.token_ids
    assert full.state.generated == [a + b for a, b in zip(part.token_ids, rest.token_ids, strict=True)]


@pytest.mark.slow
def test_chat_template_is_applied(smollm2):
    _, tok = smollm2
    ids = encode_prompt(tok, SHORT)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "What is the capital of France?" in text
    custom = tok.decode(encode_prompt(tok, SHORT, system_prompt="Be brief."))
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert encode_prompts(tok, [SHORT, "raw text"])[1] == tok("raw text")["input_ids"]


@pytest.mark.slow
def test_greedy_matches_transformers_single_and_batched(smollm2, hf_smollm2):
    model, tok = smollm2
    prompts = encode_prompts(tok, [SHORT, CHAT])
    ours = generate(model, tok, [SHORT, CHAT], max_new_tokens=16)
    theirs = hf_greedy(hf_smollm2, prompts, tok.pad_token_id, 16)
    assert ours.token_ids == theirs
    assert ours.finish_reasons == ["eos", "length"] and "Paris" in ours.texts[0]
    single = [generate(model, tok, p, max_new_tokens=16).token_ids[0] for p in (SHORT, CHAT)]
    assert single == ours.token_ids
    assert ours.prompt_tokens == [len(p) for p in prompts]


@pytest.mark.slow
def test_logprobs_entropies_hidden_router(smollm2, hf_smollm2):
    model, tok = smollm2
    out = generate(model, tok, CHAT, max_new_tokens=4, hidden_layers=[0, 15, -1], return_router=True)
    ids = torch.tensor([encode_prompt(tok, CHAT) + out.token_ids[0]])
    with torch.inference_mode():
        ref = hf_smollm2(input_ids=ids, output_hidden_states=True)
    P = ids.shape[1] - 4
    logp = torch.log_softmax(ref.logits[0, P - 1:-1].float(), -1)
    want_lp = logp.gather(1, ids[0, P:, None])[:, 0]
    want_h = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(torch.tensor(out.logprobs[0]), want_lp, atol=1e-3)
    assert torch.allclose(torch.tensor(out.entropies[0]), want_h, atol=1e-3)
    assert all(lp <= 0 for lp in out.logprobs[0]) and all(h >= 0 for h in out.entropies[0])
    assert out.hidden.shape == (1, 3, 576)
    for k, layer in enumerate([0, 15, -1]):
        assert torch.allclose(out.hidden[0, k], ref.hidden_states[layer][0, P - 1], atol=1e-3)
    assert out.router == [None] * 30  # dense: no MoE layers


@pytest.mark.slow
def test_continuation_equals_single_call(smollm2):
    model, tok = smollm2
    full = generate(model, tok, CHAT, max_new_tokens=32)
    draft = generate(model, tok, CHAT, max_new_tokens=8)
    rest = generate(model, tok, None, state=draft.state, max_new_tokens=24)
    assert draft.token_ids[0] + rest.token_ids[0] == full.token_ids[0]
    assert rest.prompt_tokens == [1]  # only the draft's last token was fed: no prompt recompute
    assert draft.texts[0] + rest.texts[0] == full.texts[0]
    # a finished state continues to nothing
    done = generate(model, tok, SHORT, max_new_tokens=16)
    assert done.finish_reasons == ["eos"]
    more = generate(model, tok, None, state=done.state, max_new_tokens=4)
    assert more.token_ids == [[]] and more.finish_reasons == ["eos"]


@pytest.mark.slow
def test_stop_strings_and_streaming(smollm2):
    model, tok = smollm2
    events = []
    out = generate(model, tok, SHORT, max_new_tokens=16, stop=["Paris"], on_token=events.append)
    assert out.finish_reasons == ["stop"] and out.texts[0] == "The capital of France is "
    assert "Paris" in tok.decode(out.token_ids[0]) and len(out.logprobs[0]) == len(out.token_ids[0])
    assert "".join(e.text for e in events) == out.texts[0]
    assert all(math.isfinite(e.logprob) for e in events)
    stream = stream_generate(model, tok, CHAT, max_new_tokens=20, stop=["\n"])
    pieces = [e.text for e in stream]
    assert stream.result.finish_reasons == ["stop"] and "\n" not in stream.result.texts[0]
    assert "".join(pieces) == stream.result.texts[0] and len(pieces) > 3


@pytest.mark.slow
def test_sampling_is_seeded(smollm2):
    model, tok = smollm2
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = generate(model, tok, CHAT, seed=1, **kw).token_ids
    b = generate(model, tok, CHAT, seed=1, **kw).token_ids
    c = generate(model, tok, CHAT, seed=2, **kw).token_ids
    assert a == b and a != c
    greedy = generate(model, tok, CHAT, max_new_tokens=8).token_ids
    assert generate(model, tok, CHAT, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3).token_ids == greedy


def test_tiny_model_continuation_with_appended_tokens(tiny_llama):
    class Tok:
        eos_token_id = 1
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    tok = Tok()
    first = generate(tiny_llama, tok, input_ids=[[5, 9, 17, 33], [7, 8]], max_new_tokens=3, eos_token_ids=[])
    cont = generate(tiny_llama, tok, input_ids=[[40, 41], [42, 43]], state=first.state, max_new_tokens=4,
                    eos_token_ids=[])
    assert cont.prompt_tokens == [3, 3]  # the pending draft token + the two appended ones
    fresh = generate(tiny_llama, tok, input_ids=[[5, 9, 17, 33, *first.token_ids[0], 40, 41],
                                                 [7, 8, *first.token_ids[1], 42, 43]],
                     max_new_tokens=4, eos_token_ids=[])
    assert cont.token_ids == fresh.token_ids
