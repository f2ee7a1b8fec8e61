"""The `transformers` backend: any local causal-LM folder behind the `Generator` seam.

One prompt forward (with hidden states and, for MoE checkpoints such as Mixtral, OLMoE or Qwen2-MoE, the
router logits), then our own decoding loop over transformers' KV cache: the probe's draft is continued
from its cache, batches are left-padded with explicit position ids, and log-probs/entropies come from the
raw logits of each step (the model's full distribution, before temperature/top-p). Router logits of the
prompt forward become `RouterStats` over the question's tokens (`router_span`), padding excluded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertrag.errors import ExpertRAGError
from expertrag.model.backend import Capabilities, Generation, Prompt, TokenEvent
from expertrag.model.config import GenerationConfig, ModelConfig
from expertrag.model.router_stats import router_stats, span_token_mask
from expertrag.model.stops import held_back

_MOE_KEYS = ("num_experts", "num_local_experts")


@dataclass
class HFState:
    """transformers' KV cache covering `tokens[:, :cache_len]` (the last token is fed by the next call)."""

    cache: Any
    tokens: torch.Tensor  # [1, N]
    cache_len: int
    ended: str | None = None  # "eos" / "stop" once generation ended


@dataclass
class _Row:
    ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    text: str = ""
    emitted: int = 0
    finished: str | None = None


class TransformersGenerator:
    """A transformers causal LM (dense or MoE) behind the `Generator` interface."""

    def __init__(self, model: Any, tokenizer: Any, cfg: GenerationConfig | None = None, name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg or GenerationConfig()
        self.is_moe = any(getattr(model.config, k, None) for k in _MOE_KEYS)
        # transformers 5 renamed the cache argument (`past_key_values` still works there, with a warning)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.capabilities = Capabilities(
            backend="transformers", model=name or getattr(model.config, "model_type", type(model).__name__),
            entropy="full", hidden_states=True, router_stats=self.is_moe, batched=True,
            hidden_size=getattr(model.config, "hidden_size", None))

    @classmethod
    def from_config(cls, cfg: ModelConfig | None = None) -> TransformersGenerator:
        """`model.path` (a local folder), else the converted SmolLM2 base."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = cfg or ModelConfig()
        if cfg.path is None:
            from expertrag.model.loading import load_hf_model, load_tokenizer

            model, tok, name = load_hf_model(cfg.base, dtype=cfg.dtype), load_tokenizer(cfg.base), cfg.base
        else:
            path = Path(cfg.path).expanduser()
            if not (path / "config.json").is_file():
                raise ExpertRAGError(f"model.path {path}: not a transformers model folder (no config.json)")
            try:
                tok = AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype))
            except (OSError, ValueError, KeyError) as e:
                raise ExpertRAGError(f"model.path {path}: cannot load it with transformers: {e}") from None
            name = path.name
        return cls(model.to(cfg.device), tok, cfg.generation, name)

    # ---- helpers -------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _eos(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        out = {eos} if isinstance(eos, int) else set(eos or [])
        if self.tokenizer.eos_token_id is not None:
            out.add(self.tokenizer.eos_token_id)
        return out

    def _render(self, prompt: Prompt) -> tuple[str, bool]:
        """(text, add_special_tokens) of a prompt: a chat through the tokenizer's chat template."""
        if isinstance(prompt, str):
            return prompt, True
        messages = list(prompt)
        sp = self.cfg.system_prompt
        if sp is not None and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": sp}, *messages]
        if not getattr(self.tokenizer, "chat_template", None):
            raise ExpertRAGError(f"model {self.capabilities.model}: its tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False

    # ---- the seam --------------------------------------------------------------------------------------
    def generate(self, prompt: Prompt | None = None, *, max_new_tokens: int | None = None,
                 stop: Sequence[str] | None = None, passages: Any = None, state: HFState | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 hidden_layers: Sequence[int] | None = None, return_router: bool = False,
                 router_span: str | None = None,
                 on_token: Callable[[TokenEvent], None] | None = None) -> Generation:
        if passages is not None:
            raise ValueError("the transformers backend cannot read passage memory; put the passages in the prompt")
        if state is not None:
            if hidden_layers:
                raise ValueError("hidden_layers needs a prompt forward; not available when continuing a state")
            return self._continue(state, prompt, max_new_tokens, stop, temperature, top_p, seed, on_token)
        if prompt is None:
            raise ValueError("give a prompt (or a state to continue)")
        return self.generate_batch([prompt], max_new_tokens=max_new_tokens, stop=stop, temperature=temperature,
                                   top_p=top_p, seed=seed, hidden_layers=hidden_layers, return_router=return_router,
                                   router_span=router_span, on_token=on_token)[0]

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Prompt], *, max_new_tokens: int | None = None,
                       stop: Sequence[str] | None = None, temperature: float | None = None,
                       top_p: float | None = None, seed: int | None = None,
                       hidden_layers: Sequence[int] | None = None, return_router: bool = False,
                       router_span: str | None = None,
                       on_token: Callable[[TokenEvent], None] | None = None) -> list[Generation]:
        """Several prompts at once, left-padded (position ids follow each row's real tokens)."""
        if not prompts:
            return []
        max_new, stops, temperature, top_p, seed = self.cfg.resolve(max_new_tokens, stop, temperature, top_p, seed)
        tok, dev = self.tokenizer, self._device()
        rendered = [self._render(p) for p in prompts]
        seqs = [list(tok(t, add_special_tokens=sp)["input_ids"]) for t, sp in rendered]
        if any(not s for s in seqs):
            raise ValueError("every prompt needs at least one token")
        B, L = len(seqs), max(len(s) for s in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else min(self._eos(), default=0)
        ids = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, L - len(s):] = torch.tensor(s)
            mask[b, L - len(s):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        want_router = return_router and self.is_moe
        kwargs: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                      output_hidden_states=bool(hidden_layers), logits_to_keep=1)
        if want_router:
            kwargs["output_router_logits"] = True
        out = self.model(**kwargs)
        hidden = None
        if hidden_layers:
            hidden = torch.stack([out.hidden_states[i][:, -1] for i in hidden_layers], 1).float()  # [B, n, H]
        stats: list[Any] = [None] * B
        if want_router and getattr(out, "router_logits", None) is not None:
            stats = [self._row_stats(out.router_logits, b, B, L, seqs[b], rendered[b], router_span) for b in range(B)]
        gens = self._decode(_cache_of(out), out.logits[:, -1], ids, mask, positions[:, -1], max_new, stops,
                            temperature, top_p, seed, on_token, prompt_tokens=[len(s) for s in seqs])
        for b, g in enumerate(gens):
            g.hidden = None if hidden is None else hidden[b]
            g.router_stats = stats[b]
        return gens

    def _row_stats(self, router_logits: Sequence[torch.Tensor], b: int, B: int, L: int, seq: list[int],
                   rendered: tuple[str, bool], span: str | None):
        """Row b's router probabilities at its counted tokens (question span if found, else whole prompt)."""
        sel = span_token_mask(self.tokenizer, rendered[0], rendered[1], seq, span) if span else None
        keep = torch.tensor(sel if sel is not None else [True] * len(seq))
        probs = {}
        for li, r in enumerate(router_logits):
            if r is None:
                continue
            r = r.float().reshape(B, L, -1)[b, L - len(seq):][keep.to(r.device)]
            # some implementations record probabilities rather than logits: do not softmax twice
            is_prob = bool((r >= 0).all()) and torch.allclose(r.sum(-1), torch.ones(1, device=r.device), atol=1e-3)
            probs[li] = r if is_prob else r.softmax(-1)
        return router_stats(probs, "question" if sel is not None else "prompt")

    @torch.inference_mode()
    def _continue(self, state: HFState, prompt: Any, max_new_tokens, stop, temperature, top_p, seed, on_token
                  ) -> Generation:
        if state.tokens.shape[0] != 1:
            raise ValueError("only a single-row state can be continued")
        if prompt is None and state.ended:
            return Generation("", [], [], [], state, 0, state.ended)
        max_new, stops, temperature, top_p, seed = self.cfg.resolve(max_new_tokens, stop, temperature, top_p, seed)
        cache, tokens = state.cache, state.tokens
        surplus = cache.get_seq_length() - state.cache_len  # a later continuation of the same state grew it
        if surplus > 0:
            cache.crop(state.cache_len)
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ValueError("a continuation appends raw text, not chat messages")
            extra = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            tokens = torch.cat([tokens, torch.tensor([extra], device=tokens.device)], 1)
        pending = tokens[:, state.cache_len:]
        N = tokens.shape[1]
        mask = torch.ones(1, N, dtype=torch.long, device=tokens.device)
        pos = torch.arange(state.cache_len, N, device=tokens.device)[None]
        out = self.model(input_ids=pending, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self._cache_arg: cache})
        return self._decode(_cache_of(out), out.logits[:, -1], tokens, mask, pos[:, -1], max_new, stops,
                            temperature, top_p, seed, on_token, prompt_tokens=[pending.shape[1]])[0]

    def _decode(self, cache: Any, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                last_pos: torch.Tensor, max_new: int, stops: list[str], temperature: float, top_p: float,
                seed: int | None, on_token: Callable[[TokenEvent], None] | None, *, prompt_tokens: list[int]
                ) -> list[Generation]:
        """Sample up to max_new tokens per row from `logits` (the prompt's last position) onwards."""
        B, eos, tok = tokens.shape[0], self._eos(), self.tokenizer
        rows = [_Row([], [], []) for _ in range(B)]
        rng = None
        if temperature > 0 and seed is not None:
            rng = torch.Generator(device=logits.device).manual_seed(seed)
        pos = last_pos.clone()
        for step in range(max_new):
            logp = torch.log_softmax(logits.float(), -1)
            ent = -(logp.exp() * logp).sum(-1)
            if temperature > 0:
                nxt = _sample(logits.float() / temperature, top_p, rng)
            else:
                nxt = logp.argmax(-1)
            lp = logp.gather(1, nxt[:, None])[:, 0]
            for b, r in enumerate(rows):
                if r.finished:
                    continue
                t = int(nxt[b])
                r.ids.append(t)
                r.logprobs.append(float(lp[b]))
                r.entropies.append(float(ent[b]))
                text = tok.decode(r.ids, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    r.text, r.finished = text[:cut], "stop"
                    end = cut
                elif t in eos:
                    r.text, r.finished = text, "eos"
                    end = len(text)
                else:
                    r.text = text
                    end = len(text) if step == max_new - 1 else len(text) - held_back(text, stops)
                if on_token is not None:
                    piece = r.text[r.emitted:end] if end > r.emitted else ""
                    r.emitted = max(r.emitted, end)
                    on_token(TokenEvent(b, t, piece, float(lp[b]), float(ent[b])))
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            if all(r.finished for r in rows) or step == max_new - 1:
                break
            # finished rows keep being fed (their outputs are ignored): the batch stays rectangular
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], 1)
            pos = pos + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                             **{self._cache_arg: cache})
            cache, logits = _cache_of(out), out.logits[:, -1]
        state = HFState(cache, tokens, tokens.shape[1] - 1, rows[0].finished if B == 1 else None)
        return [Generation(text=r.text, token_ids=r.ids, logprobs=r.logprobs, entropies=r.entropies, state=state,
                           prompt_tokens=prompt_tokens[b], finish_reason=r.finished or "length")
                for b, r in enumerate(rows)]


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)  # transformers 5; reading past_key_values there warns
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _sample(logits: torch.Tensor, top_p: float, rng: torch.Generator | None) -> torch.Tensor:
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=rng)[:, 0]
