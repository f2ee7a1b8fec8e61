"""The `native` backend: `ExpertRAGGenerator` runs our decoder (dense or with MoE layers, reading
passages through the retrieval expert) behind the `Generator` seam of model.backend.

Its router statistics (`Generation.router_stats`) count every prompt token (span "prompt"), as the router
policy's thresholds were tuned that way; given `router_span`, a single-prompt call also returns the same
statistics over the span's tokens only (`Generation.question_router_stats`). The transformers backend
counts the question's tokens in `router_stats` itself. `Generation`/`Generator` are
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


def native_router_stats(router: list[MoEAux | None] | None, rows: Sequence[bool] | None = None
                        ) -> RouterStats | None:
    """Our MoE layers' outputs -> RouterStats over every prompt token (the retrieval slot included in
    the softmax, its probability as retrieval_affinity; usage from the dispatch counts). `rows`: a mask over
    the prompt's tokens of ONE unpadded row (B = 1) to count only those (span "question")."""
    import torch

    probs, affinity, usage = {}, {}, {}
    for i, a in enumerate(router or []):
        if a is None:
            continue
        p = a.router_logits.float().softmax(-1)
        aff = a.retrieval_affinity
        if rows is not None:
            sel = torch.tensor(list(rows), dtype=torch.bool, device=p.device)
            if sel.numel() != p.shape[0]:
                return None  # not the single unpadded prompt the mask was made for
            p = p[sel]
            aff = None if aff is None else aff.reshape(-1)[sel]
        probs[i] = p
        counts = a.tokens_per_expert.float()
        usage[i] = (counts / counts.sum().clamp_min(1)).tolist()
        if aff is not None:
            affinity[i] = float(aff.float().mean())
    span = "prompt" if rows is None else "question"
    return router_stats(probs, span, affinity=affinity, usage=usage) if probs else None


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
        """`router_span`: also count the router over that substring's tokens (question_router_stats)."""
        g = self.generate_batch(
            None if prompt is None else [prompt], max_new_tokens=max_new_tokens, stop=stop,
            passages=None if passages is None else [passages] if not isinstance(passages, PassageMemory)
            else passages, state=state, temperature=temperature, top_p=top_p, seed=seed,
            hidden_layers=hidden_layers, return_router=return_router, on_token=on_token)[0]
        if return_router and router_span and prompt is not None and state is None and g.router is not None:
            mask = self._span_mask(prompt, router_span)
            if mask is not None:
                g.question_router_stats = native_router_stats(g.router, mask)
        return g

    def _span_mask(self, prompt: Prompt, span: str) -> list[bool] | None:
        """Which prompt tokens cover `span`, on the same text and ids `encode_prompt` feeds the model."""
        from expertrag.model.generation import encode_prompt
        from expertrag.model.router_stats import span_token_mask

        ids = encode_prompt(self.tokenizer, prompt, system_prompt=self.cfg.system_prompt)
        if isinstance(prompt, str):
            return span_token_mask(self.tokenizer, prompt, True, ids, span)
        messages = list(prompt)
        if self.cfg.system_prompt is not None and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return span_token_mask(self.tokenizer, text, False, ids, span)

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
