"""Autoregressive generation with our decoder: one prompt forward, then one token per forward.

Greedy or sampled (temperature, top-p, seed); batched with left padding; stop strings (generation ends
where one begins, and it is stripped); streaming (a callback, or iterate `stream_generate`); per-token
log-probability and entropy of the model's full next-token distribution (before temperature/top-p);
hidden states of the prompt's last token at chosen layers; the MoE router outputs of the prompt forward.

Continuation: every result carries a `GenerationState` (KV cache + all tokens). Passing it back as
`state=` continues exactly where generation stopped without recomputing anything: greedy 8 tokens then
24 more from the state gives the same 32 tokens as one 32-token call. The state's last token has been
sampled but not yet fed, so the cache always covers `tokens[:, :cache_len]` with `cache_len = N - 1`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Message, Prompt, TokenEvent live in the torch-free seam; imported here for the loop and its callers
from expertrag.model.backend import Message, Prompt, TokenEvent  # noqa: F401
from expertrag.model.llama import KVCache, LlamaLM
from expertrag.moe.types import MoEAux, PassageMemory

# ------------------------------------------------------------------------------------------ prompts


def is_chat(prompt: Any) -> bool:
    return not isinstance(prompt, str) and len(prompt) > 0 and isinstance(prompt[0], dict)


def encode_prompt(tokenizer: Any, prompt: Prompt, *, system_prompt: str | None = None) -> list[int]:
    """Token ids of one prompt: raw text as is, a chat through the tokenizer's chat template
    (with the assistant generation prompt appended)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    messages = list(prompt)
    if system_prompt is not None and (not messages or messages[0].get("role") != "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(tokenizer: Any, prompts: Prompt | Sequence[Prompt], *,
                   system_prompt: str | None = None) -> list[list[int]]:
    """One prompt (str or chat) or a batch of them -> one id list per row."""
    single = isinstance(prompts, str) or is_chat(prompts)
    batch = [prompts] if single else list(prompts)
    return [encode_prompt(tokenizer, p, system_prompt=system_prompt) for p in batch]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu",
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, L] padded on the left with `pad_id`, and the bool mask of real tokens."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every prompt needs at least one token")
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, L - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, L - len(s):] = True
    return ids.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------ results


@dataclass
class GenerationState:
    """Everything needed to continue: the cache covers `tokens[:, :cache_len]`; `tokens[:, cache_len:]`
    (the last sampled token) is fed first by the next call. `fork()` before branching twice."""

    cache: KVCache
    tokens: torch.Tensor  # [B, N] left-padded prompt + generated tokens
    mask: torch.Tensor  # [B, N] bool, True for real tokens
    cache_len: int
    ended: list[str | None]  # per row: "eos" / "stop" once it ended (continuing adds nothing), else None
    generated: list[list[int]]  # per row, every token generated so far (over all calls)
    rng: torch.Generator | None = None

    def fork(self) -> GenerationState:
        rng = None
        if self.rng is not None:
            rng = torch.Generator(device=self.rng.device)
            rng.set_state(self.rng.get_state())
        return GenerationState(self.cache.copy(), self.tokens.clone(), self.mask.clone(), self.cache_len,
                               list(self.ended), [list(g) for g in self.generated], rng)


@dataclass
class BatchGeneration:
    texts: list[str]  # stop string and special tokens removed
    token_ids: list[list[int]]  # this call's tokens (eos included; cut after the token completing a stop)
    logprobs: list[list[float]]  # log p(token) under the model's full distribution
    entropies: list[list[float]]  # entropy (nats) of that distribution
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    prompt_tokens: list[int]  # real prompt tokens per row (for a continuation: newly fed tokens)
    state: GenerationState
    hidden: torch.Tensor | None = None  # [B, len(hidden_layers), H] at the prompt's last token
    router: list[MoEAux | None] | None = None  # per layer, from the prompt forward
    steps: int = 0  # decoder forwards after the prompt forward


# ----------------------------------------------------------------------------------------- sampling


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                rng: torch.Generator | None) -> torch.Tensor:
    """Next token per row from fp32 logits [B, V]: argmax when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=rng).squeeze(1)


def logprob_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) and the entropy (nats) of softmax(logits), over the last dim: [..., V], [...] -> [...]."""
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, tokens[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------------------------------- engine


class GenerationStream:
    """Iterate to receive `TokenEvent`s as tokens are produced; `result` is set once exhausted."""

    def __init__(self, steps: Iterator[TokenEvent], holder: dict[str, BatchGeneration]):
        self._steps = steps
        self._holder = holder

    def __iter__(self) -> Iterator[TokenEvent]:
        yield from self._steps

    @property
    def result(self) -> BatchGeneration:
        if "result" not in self._holder:
            raise RuntimeError("iterate the stream to the end first")
        return self._holder["result"]


def stream_generate(model: LlamaLM, tokenizer: Any, prompts: Prompt | Sequence[Prompt] | None = None, *,
                    input_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> GenerationStream:
    """Like `generate`, as an iterator of `TokenEvent`s (then `.result`)."""
    holder: dict[str, BatchGeneration] = {}
    steps = _run(model, tokenizer, prompts, input_ids=input_ids, holder=holder, emit=True, **kwargs)
    return GenerationStream(steps, holder)


def generate(model: LlamaLM, tokenizer: Any, prompts: Prompt | Sequence[Prompt] | None = None, *,
             input_ids: Sequence[Sequence[int]] | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop: Sequence[str] | None = None, eos_token_ids: Sequence[int] | None = None,
             passages: PassageMemory | None = None, hidden_layers: Sequence[int] | None = None,
             return_router: bool = False, state: GenerationState | None = None,
             system_prompt: str | None = None,
             on_token: Callable[[TokenEvent], None] | None = None) -> BatchGeneration:
    """Generate for one prompt or a batch (str / chat messages / their lists, or `input_ids`).

    With `state`, continue from it: `prompts`/`input_ids` are then optional extra text/tokens appended
    first (same count for every row); pass the same `passages` again (the state does not keep them).
    `hidden_layers` index `LMOutput.hidden_states` (0 = embeddings, L = final-normed output; negatives
    allowed) and need a prompt forward (no state). `on_token` receives each `TokenEvent` as it is made.
    """
    holder: dict[str, BatchGeneration] = {}
    for event in _run(model, tokenizer, prompts, input_ids=input_ids, holder=holder, emit=on_token is not None,
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      stop=stop, eos_token_ids=eos_token_ids, passages=passages, hidden_layers=hidden_layers,
                      return_router=return_router, state=state, system_prompt=system_prompt):
        if on_token is not None:
            on_token(event)
    return holder["result"]


@dataclass
class _Row:
    """Per-row bookkeeping during one call."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    reason: str | None = None
    emitted: int = 0  # characters of text already streamed
    stop_at: int | None = None  # character index where a stop string begins


def _default_eos(model: LlamaLM, tokenizer: Any) -> set[int]:
    eos: set[int] = set()
    for value in (model.args.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            eos.add(value)
        elif value:
            eos.update(value)
    return eos


@torch.inference_mode()
def _run(model: LlamaLM, tokenizer: Any, prompts: Any, *, input_ids: Sequence[Sequence[int]] | None,
         holder: dict[str, BatchGeneration], emit: bool, max_new_tokens: int = 64, temperature: float = 0.0,
         top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | None = None,
         eos_token_ids: Sequence[int] | None = None, passages: PassageMemory | None = None,
         hidden_layers: Sequence[int] | None = None, return_router: bool = False,
         state: GenerationState | None = None, system_prompt: str | None = None) -> Iterator[TokenEvent]:
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    device = model.embed_tokens.weight.device
    pad_id = model.args.pad_token_id if model.args.pad_token_id is not None else (tokenizer.pad_token_id or 0)
    eos = set(eos_token_ids) if eos_token_ids is not None else _default_eos(model, tokenizer)
    stops = [s for s in (stop or []) if s]
    hold = max((len(s) for s in stops), default=1) - 1  # characters that may still start a stop string

    extra: list[list[int]] | None = None
    if input_ids is not None:
        extra = [list(s) for s in input_ids]
    elif prompts is not None:
        if state is not None:  # appended text: no template, no special tokens
            single = isinstance(prompts, str)
            texts = [prompts] if single else list(prompts)
            extra = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        else:
            extra = encode_prompts(tokenizer, prompts, system_prompt=system_prompt)

    # ---- prompt forward (or the pending tokens of a continued state)
    if state is None:
        if not extra:
            raise ValueError("give prompts or input_ids (or a state to continue)")
        ids, mask = left_pad(extra, pad_id, device)
        B, P = ids.shape
        cache = KVCache.for_model(model, B, P + max(max_new_tokens, 1))
        ended: list[str | None] = [None] * B
        generated: list[list[int]] = [[] for _ in range(B)]
        rng = None
        if seed is not None and temperature > 0:
            rng = torch.Generator(device=device).manual_seed(seed)
        tokens, tmask, feed, feed_mask = ids, mask, ids, mask
        prompt_tokens = mask.sum(1).tolist()
    else:
        if hidden_layers:
            raise ValueError("hidden_layers needs a prompt forward; not available when continuing a state")
        cache, tokens, tmask = state.cache, state.tokens, state.mask
        B = tokens.shape[0]
        ended, generated, rng = list(state.ended), [list(g) for g in state.generated], state.rng
        if extra is None and all(ended):  # every row already ended: nothing to do
            holder["result"] = BatchGeneration([""] * B, [[] for _ in range(B)], [[] for _ in range(B)],
                                               [[] for _ in range(B)], [str(e) for e in ended], [0] * B, state)
            return
        cache.crop(state.cache_len)  # undo anything a later continuation of this state appended
        if extra is not None:
            if len(extra) != B or len({len(e) for e in extra}) != 1:
                raise ValueError(f"appended tokens must be {B} rows of equal length")
            add = torch.tensor(extra, dtype=torch.long, device=device)
            tokens = torch.cat([tokens, add], 1)
            tmask = torch.cat([tmask, torch.ones_like(add, dtype=torch.bool)], 1)
            ended = [None] * B
        feed, feed_mask = tokens[:, state.cache_len:], tmask[:, state.cache_len:]
        prompt_tokens = feed_mask.sum(1).tolist()
    if passages is not None and passages.states.shape[0] != B:
        raise ValueError(f"passages have {passages.states.shape[0]} rows for {B} sequences")

    rows = [_Row(reason=ended[b]) for b in range(B)]
    out = model(feed, attention_mask=feed_mask, cache=cache, passages=passages,
                output_hidden_states=bool(hidden_layers), logits_to_keep=1)
    hidden = None
    if hidden_layers:
        hidden = torch.stack([out.hidden_states[i][:, -1] for i in hidden_layers], 1).float()
    router = out.aux if return_router else None
    logits = out.logits[:, -1].float()

    # ---- decode loop: sample, record, feed
    steps = 0
    new_cols: list[torch.Tensor] = []
    new_masks: list[torch.Tensor] = []
    active = torch.tensor([e is None for e in ended], dtype=torch.bool, device=device)
    # Without streaming, log-probs/entropies are computed for many steps at once (one big op instead
    # of a few small ones per step): (logits [B, V], tokens [B], rows that took the token) per step.
    unscored: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []

    def score() -> None:
        if unscored:
            lp, h = logprob_entropy(torch.stack([u[0] for u in unscored]), torch.stack([u[1] for u in unscored]))
            for (_, _, took), lps, hs in zip(unscored, lp.tolist(), h.tolist(), strict=True):
                for b in took:
                    rows[b].logprobs.append(lps[b])
                    rows[b].entropies.append(hs[b])
            unscored.clear()

    for step in range(max_new_tokens):
        if not bool(active.any()):
            break
        nxt = sample_next(logits, temperature, top_p, rng)
        nxt = torch.where(active, nxt, torch.full_like(nxt, pad_id))
        new_cols.append(nxt)
        new_masks.append(active.clone())
        took = [b for b in range(B) if rows[b].reason is None]
        unscored.append((logits, nxt, took))
        if emit or len(unscored) >= 32:
            score()
        now = nxt.tolist()
        for b in took:
            r, t = rows[b], now[b]
            r.ids.append(t)
            generated[b].append(t)
            if t in eos:
                r.reason = "eos"
            elif stops:
                text = tokenizer.decode(r.ids, skip_special_tokens=True)
                hits = [i for i in (text.find(s, max(0, r.emitted - hold)) for s in stops) if i >= 0]
                if hits:
                    r.reason, r.stop_at = "stop", min(hits)
            if r.reason is None and step == max_new_tokens - 1:
                r.reason = "length"
            if emit:
                yield TokenEvent(b, t, _delta(tokenizer, r, hold), r.logprobs[-1], r.entropies[-1])
            if r.reason is not None:
                active[b] = False
        if step == max_new_tokens - 1 or not bool(active.any()):
            break
        # Feed the sampled column (rows that just finished feed their last token; older ones padding).
        out = model(nxt[:, None], attention_mask=new_masks[-1][:, None], cache=cache, passages=passages,
                    logits_to_keep=1)
        logits = out.logits[:, -1].float()
        steps += 1

    score()
    if new_cols:
        tokens = torch.cat([tokens, torch.stack(new_cols, 1)], 1)
        tmask = torch.cat([tmask, torch.stack(new_masks, 1)], 1)
    if not new_cols:  # max_new_tokens == 0: keep the invariant (the last token stays unfed)
        cache.crop(tokens.shape[1] - 1)
    new_state = GenerationState(cache, tokens, tmask, cache.length,
                                [r.reason if r.reason in ("eos", "stop") else None for r in rows], generated, rng)

    texts, token_ids, reasons = [], [], []
    for r in rows:
        text = tokenizer.decode(r.ids, skip_special_tokens=True) if r.ids else ""
        ids_kept = r.ids
        if r.stop_at is not None:
            text = text[:r.stop_at]
            ids_kept = _ids_covering(tokenizer, r.ids, r.stop_at)
        texts.append(text)
        token_ids.append(ids_kept)
        reasons.append(r.reason or "length")
    n = [len(t) for t in token_ids]
    holder["result"] = BatchGeneration(
        texts=texts, token_ids=token_ids, logprobs=[r.logprobs[:k] for r, k in zip(rows, n, strict=True)],
        entropies=[r.entropies[:k] for r, k in zip(rows, n, strict=True)], finish_reasons=reasons,
        prompt_tokens=prompt_tokens, state=new_state, hidden=hidden, router=router, steps=steps)


def _delta(tokenizer: Any, r: _Row, hold: int) -> str:
    """Text of row `r` that became final with its latest token (for streaming)."""
    text = tokenizer.decode(r.ids, skip_special_tokens=True)
    if r.stop_at is not None:
        end = r.stop_at
    elif r.reason is not None:
        end = len(text)
    else:
        end = len(text) - hold
        while end > 0 and text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
            end -= 1
    if end <= r.emitted:
        return ""
    piece, r.emitted = text[r.emitted:end], end
    return piece


def _ids_covering(tokenizer: Any, ids: list[int], n_chars: int) -> list[int]:
    """The shortest prefix of `ids` whose text reaches `n_chars` characters (the text before a stop)."""
    for k in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True)) >= n_chars:
            return ids[:k]
    return ids
