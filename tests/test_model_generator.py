"""The pipeline's Generator interface: our model and transformers' generate agree."""

from __future__ import annotations

import pytest
import torch

from expertrag.model.config import GenerationConfig
from expertrag.model.generator import ExpertRAGGenerator, Generation, Generator, HFGenerator

CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def generators(smollm2, hf_smollm2):
    model, tok = smollm2
    return ExpertRAGGenerator(model, tok), HFGenerator(hf_smollm2, tok)


@pytest.mark.slow
def test_both_generators_agree_greedy(generators):
    ours, theirs = generators
    assert isinstance(ours, Generator) and isinstance(theirs, Generator)
    a = ours.generate(CHAT, max_new_tokens=12, hidden_layers=[-1])
    b = theirs.generate(CHAT, max_new_tokens=12, hidden_layers=[-1])
    assert isinstance(a, Generation) and isinstance(b, Generation)
    assert a.text == b.text and a.token_ids == b.token_ids and len(a.text) > 10
    assert a.prompt_tokens == b.prompt_tokens and a.finish_reason == b.finish_reason == "length"
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3)
    assert torch.allclose(torch.tensor(a.entropies), torch.tensor(b.entropies), atol=1e-3)
    assert a.hidden.shape == b.hidden.shape == (1, 576) and torch.allclose(a.hidden, b.hidden, atol=1e-3)


@pytest.mark.slow
def test_both_continue_from_state_and_stop(generators):
    ours, theirs = generators
    for gen in (ours, theirs):
        full = gen.generate(CHAT, max_new_tokens=16)
        draft = gen.generate(CHAT, max_new_tokens=6)
        rest = gen.generate(state=draft.state, max_new_tokens=10)
        assert draft.token_ids + rest.token_ids == full.token_ids, type(gen).__name__
        assert rest.prompt_tokens == 1
        stopped = gen.generate(CHAT, max_new_tokens=16, stop=["sea"])
        assert stopped.finish_reason == "stop" and stopped.text == "The waves of the "


@pytest.mark.slow
def test_config_defaults_and_passages(smollm2, generators):
    model, tok = smollm2
    ours, theirs = generators
    short = ExpertRAGGenerator(model, tok, GenerationConfig(max_new_tokens=3))
    assert len(short.generate(CHAT).token_ids) == 3
    seen = []
    dense = model.layers[0].mlp

    class Spy(torch.nn.Module):
        def forward(self, x, passages=None, attention_mask=None):
            seen.append(passages)
            return dense(x)

    model.set_ffn(0, Spy())
    try:
        out = ours.generate(CHAT, max_new_tokens=2, passages=["Paris is in France.", "The sea is big."])
    finally:
        model.set_ffn(0, dense)
    memory = seen[0]
    n = len(tok("Paris is in France.", add_special_tokens=False)["input_ids"]) + len(
        tok("The sea is big.", add_special_tokens=False)["input_ids"])
    assert len(seen) == 2 and memory.states.shape == (1, n, 576) and memory.mask.all()
    assert len(out.token_ids) == 2
    with pytest.raises(ValueError):
        theirs.generate(CHAT, max_new_tokens=2, passages=["x"])
