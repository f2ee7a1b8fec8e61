from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field


class GenerationConfig(BaseModel):
    """Default decoding settings; every call may override them."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(64, gt=0, description="tokens generated per call")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy; >0 = sample from softmax(logits / T)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1 = off)")
    seed: int | None = Field(None, description="sampling seed; None = nondeterministic")
    stop: list[str] = Field(default_factory=list, description="stop strings (generation ends before them)")
    system_prompt: str | None = Field(None, description="system message for chat prompts; None = template default")

    def resolve(self, max_new_tokens: int | None = None, stop: Sequence[str] | None = None,
                temperature: float | None = None, top_p: float | None = None,
                seed: int | None = None) -> Decoding:
        """One call's decoding settings, as every backend reads them: an argument given wins, else this
        config's default; empty stop strings are dropped (they would match everywhere)."""
        return Decoding(self.max_new_tokens if max_new_tokens is None else max_new_tokens,
                        [s for s in (self.stop if stop is None else stop) if s],
                        self.temperature if temperature is None else temperature,
                        self.top_p if top_p is None else top_p, self.seed if seed is None else seed)


class Decoding(NamedTuple):
    max_new_tokens: int
    stop: list[str]
    temperature: float
    top_p: float
    seed: int | None


class ModelConfig(BaseModel):
    """The decoder model and where its base weights come from. Owned by the model/ package.

    `backend` picks the engine behind the Generator seam (model.backend): `native` (our decoder: `base`,
    `checkpoint`), `transformers` (any local causal-LM folder: `path`; null = the converted base), `llamacpp`
    (a GGUF file run by llama.cpp: `path`; null = the packaged GGUF of `base`, re-encoded once if `gguf_type`
    says so), `openai` (an OpenAI-compatible server: `base_url`, `name`, the key read from the env var
    `api_key_env`)."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["native", "transformers", "llamacpp", "openai", "auto"] = Field(
        "native", description="generator backend; auto = the fastest one installed (model.auto_backend)")
    path: str | None = Field(None, description="transformers backend: a local model folder; llamacpp: a .gguf file "
                                                "(null = the base)")
    gguf_type: Literal["as-is", "q8_0", "f16", "f32", "q4_1"] = Field(
        "as-is", description="llamacpp backend: re-encode the GGUF once into this llama.cpp type (cached); as-is = "
                             "read the file itself")
    threads: int | None = Field(None, ge=1, description="llamacpp backend: CPU threads (null = torch's count)")
    long_prompt_backend: Literal["native", "transformers"] | None = Field(
        None, description="llamacpp backend: the engine for prompts of at least long_prompt_tokens tokens (fast "
                          "prefill), e.g. native; null = llamacpp answers every prompt (model.length_routed)")
    long_prompt_tokens: int = Field(256, ge=1, description="with long_prompt_backend: where a prompt counts as long")
    base_url: str | None = Field(None, description="openai backend: server URL, e.g. http://127.0.0.1:8000/v1")
    name: str | None = Field(None, description="openai backend: the served model's name")
    api_key_env: str | None = Field(None, description="openai backend: env var holding the API key (null = none)")
    timeout_s: float = Field(60.0, gt=0, description="openai backend: seconds per HTTP request")
    retries: int = Field(2, ge=0, description="openai backend: retries (with backoff) of a failed request")
    top_logprobs: int = Field(5, ge=0, le=20, description="openai backend: alternatives per token (entropy approx.)")
    base: str = Field("smollm2-135m-instruct", description="base model name (see model.loading.BASES)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="parameter/activation dtype")
    device: str = Field("cpu", description="torch device for the model")
    checkpoint: str | None = Field(
        None, description="MoE checkpoint folder from `expertrag train lm` (upcycled model); null = the dense base")
    adapter: str | None = Field(
        None, description="native backend: a LoRA adapter folder (from `expertrag expert train`) kept on the base "
        "model for every answer and probe, e.g. a knowledge expert; null = none")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
