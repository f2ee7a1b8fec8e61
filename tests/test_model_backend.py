"""The generator seam: torch-free types, and router probabilities -> RouterStats."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest


def test_the_seam_imports_without_torch():
    code = ("import sys, expertrag.model.backend as b, expertrag.model.config; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(b.BACKENDS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "native" in out.stdout and "openai" in out.stdout


def test_router_stats_entropy_shares_and_agreement():
    import torch

    from expertrag.model.router_stats import router_stats

    uniform = torch.full((4, 2), 0.5)
    sure = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    other = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.9, 0.1]])
    s = router_stats({0: uniform, 3: sure, 5: other}, "question", affinity={3: 0.25})
    assert s.span == "question" and s.tokens == 4 and sorted(s.layers) == [0, 3, 5]
    assert s.layers[0].entropy == pytest.approx(math.log(2)) and s.layers[3].entropy == pytest.approx(0.0, abs=1e-6)
    assert s.layers[3].expert_share == [0.75, 0.25] and s.layers[3].retrieval_affinity == 0.25
    # top-1 per layer: uniform -> expert 0 everywhere (argmax tie), sure -> 0,0,1,0, other -> 0,1,1,0
    assert s.top_expert_agreement == pytest.approx((3 / 4 + 3 / 4) / 2)
    assert s.mean_retrieval_affinity == 0.25 and s.usage[3] == [0.75, 0.25]
    assert router_stats({0: torch.zeros(0, 2)}, "prompt") is None
    assert router_stats({1: sure}, "prompt").top_expert_agreement is None  # one MoE layer: nothing to agree with


def test_model_config_names_the_backend_and_its_settings():
    from pydantic import ValidationError

    from expertrag.model.config import ModelConfig

    assert ModelConfig().backend == "native"
    cfg = ModelConfig(backend="openai", base_url="http://127.0.0.1:8000/v1", name="m", api_key_env="KEY")
    assert cfg.timeout_s > 0 and cfg.retries >= 0 and cfg.top_logprobs == 5
    with pytest.raises(ValidationError):
        ModelConfig(backend="llama.cpp")  # a misspelt backend is refused, not silently native
    with pytest.raises(ValidationError):
        ModelConfig(backend="llamacpp", gguf_type="q5_k")  # a file type we do not offer
    with pytest.raises(ValidationError):
        ModelConfig(top_logprobs=21)  # OpenAI's limit is 20


def test_openai_backend_needs_its_settings(monkeypatch):
    from expertrag.errors import ExpertRAGError
    from expertrag.model.config import ModelConfig
    from expertrag.model.openai_backend import OpenAIGenerator

    with pytest.raises(ExpertRAGError, match="needs model.base_url"):
        OpenAIGenerator.from_config(ModelConfig(backend="openai"))
    monkeypatch.delenv("EXPERTRAG_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ExpertRAGError, match="EXPERTRAG_TEST_NO_SUCH_KEY, which is not set"):
        OpenAIGenerator.from_config(ModelConfig(backend="openai", base_url="http://127.0.0.1:9/v1", name="m",
                                                api_key_env="EXPERTRAG_TEST_NO_SUCH_KEY"))


def test_auto_backend_resolves_to_what_is_installed():
    """`model.backend: auto` is llama.cpp with long prompts on native where llama-cpp-python imports, else
    native; a named backend or a native-only setting (an MoE checkpoint) is left to native."""
    from expertrag.model import llamacpp_backend
    from expertrag.model.auto_backend import describe, resolve
    from expertrag.model.config import ModelConfig

    auto = resolve(ModelConfig(backend="auto"))
    if llamacpp_backend.available():
        assert auto.backend == "llamacpp" and auto.long_prompt_backend == "native"
        assert describe(ModelConfig(backend="auto")).startswith("llamacpp (the packaged GGUF")
    else:
        assert auto.backend == "native" and "make llamacpp" in describe(ModelConfig(backend="auto"))
    assert resolve(ModelConfig(backend="auto", checkpoint="runs/moe")).backend == "native"
    assert resolve(ModelConfig(backend="transformers")).backend == "transformers"
