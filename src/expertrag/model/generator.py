"""The `native` backend: `ExpertRAGGenerator` runs our decoder (dense or with MoE layers, reading
passages through the retrieval expert) behind the `Generator` seam of model.backend.

Its router statistics count every prompt token (span "prompt"), as the router policy's thresholds were
tuned that way; the transformers backend counts the question's tokens. `Generation`/`Generator` are
re-exported from model.backend, where they live.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from expertrag.model.backend import Capabilities, Generation, Generator, Prompt, RouterStats, TokenEvent
from expertrag.model.config import GenerationConfig, ModelConfig
from expertrag.model.generation import GenerationState, generate
from expertrag.model.llama import LlamaLM
from expertrag.model.router_stats import router_stats
from expertrag.moe.types import MoEAux, PassageMemory

__all__ = ["ExpertRAGGenerator", "Generation", "Generator", "native_router_stats"]


def native_router_stats(router: list[MoEAux | None] | None) -> RouterStats | None:
    """Our MoE layers' outputs -> RouterStats over every prompt token (the retrieval slot included in
    the softmax, its probability as retrieval_affinity; usage from the dispatch counts)."""
    probs, affinity, usage = {}, {}, {}
    for i, a in enumerate(router or []):
        if a is None:
            continue
        probs[i] = a.router_logits.float().softmax(-1)
        counts = a.tokens_per_expert.float()
        usage[i] = (counts / counts.sum().clamp_min(1)).tolist()
        if a.retrieval_affinity is not None:
            affinity[i] = float(a.retrieval_affinity.float().mean())
    return router_stats(probs, "prompt", affinity=affinity, usage=usage) if probs else None


class ExpertRAGGenerator:
    """Our decoder behind the `Generator` interface. Defaults come from `GenerationConfig`."""

    def __init__(self, model: LlamaLM, tokenizer: Any, cfg: GenerationConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg or GenerationConfig()
        mlps = [layer.mlp for layer in model.layers]
        moe = any(getattr(m, "router", None) is not None for m in mlps)
        retrieval = any(getattr(m, "retrieval", None) is not None for m in mlps)
        self.capabilities = Capabilities(
            backend="native", model="ExpertRAG decoder" + (" (MoE)" if moe else " (dense)"), entropy="full",
            hidden_states=True, router_stats=moe, retrieval_affinity=retrieval, passage_memory=retrieval,
            batched=True, batch_shares_router=moe, hidden_size=model.args.hidden_size,
            adapters=True)

    @classmethod
    def from_config(cls, cfg: ModelConfig | None = None) -> ExpertRAGGenerator:
        from expertrag.model.loading import load_model

        cfg = cfg or ModelConfig()
        model, tokenizer = load_model(cfg)
        return cls(model, tokenizer, cfg.generation)

    def _passage_ids(self, passages: Sequence[str]) -> list[int]:
        return [i for text in passages for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def encode_passages(self, passages: Sequence[str]) -> PassageMemory:
        """One row of passage memory from passage texts (their tokens, concatenated)."""
        return self.model.encode_passages([self._passage_ids(passages)])

    def generate(self, prompt: Prompt | None = None, *, max_new_tokens: int | None = None,
                 stop: Sequence[str] | None = None, passages: PassageMemory | Sequence[str] | None = None,
                 state: GenerationState | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 hidden_layers: Sequence[int] | None = None, return_router: bool = False,
                 router_span: str | None = None,
                 on_token: Callable[[TokenEvent], None] | None = None) -> Generation:
        """`router_span` is accepted and not used: our statistics count the whole prompt (module doc)."""
        return self.generate_batch(
            None if prompt is None else [prompt], max_new_tokens=max_new_tokens, stop=stop,
            passages=None if passages is None else [passages] if not isinstance(passages, PassageMemory)
            else passages, state=state, temperature=temperature, top_p=top_p, seed=seed,
            hidden_layers=hidden_layers, return_router=return_router, on_token=on_token)[0]

    def generate_batch(self, prompts: Sequence[Prompt] | None, *, max_new_tokens: int | None = None,
                       stop: Sequence[str] | None = None,
                       passages: PassageMemory | Sequence[Sequence[str]] | None = None,
                       state: GenerationState | None = None, temperature: float | None = None,
                       top_p: float | None = None, seed: int | None = None,
                       hidden_layers: Sequence[int] | None = None, return_router: bool = False,
                       on_token: Callable[[TokenEvent], None] | None = None) -> list[Generation]:
        """Several prompts at once (left-padded). `passages`: a PassageMemory, or passage texts per row."""
        c = self.cfg
        if passages is not None and not isinstance(passages, PassageMemory):
            passages = self.model.encode_passages([self._passage_ids(row) for row in passages])
        d = c.resolve(max_new_tokens, stop, temperature, top_p, seed)
        out = generate(
            self.model, self.tokenizer, prompts, max_new_tokens=d.max_new_tokens, temperature=d.temperature,
            top_p=d.top_p, seed=d.seed, stop=d.stop,
            passages=passages, hidden_layers=hidden_layers, return_router=return_router, state=state,
            system_prompt=c.system_prompt, on_token=on_token)
        stats = native_router_stats(out.router) if return_router else None  # one for the batch (shared aux)
        return [
            Generation(text=out.texts[b], token_ids=out.token_ids[b], logprobs=out.logprobs[b],
                       entropies=out.entropies[b], state=out.state, prompt_tokens=out.prompt_tokens[b],
                       finish_reason=out.finish_reasons[b],
                       hidden=None if out.hidden is None else out.hidden[b], router=out.router,
                       router_stats=stats)
            for b in range(len(out.texts))
        ]


# The transformers backend lives in model.hf_backend; the old name stays for the reference tests.
def __getattr__(name: str) -> Any:
    if name in ("HFGenerator", "HFState"):
        from expertrag.model import hf_backend

        return getattr(hf_backend, {"HFGenerator": "TransformersGenerator"}.get(name, name))
    raise AttributeError(name)
