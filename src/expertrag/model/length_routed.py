"""A per-phase choice of engine: short prompts to one backend, long prompts to another.

Why: on this CPU llama.cpp decodes quantised weights fast but prefills slowly, and our fp32 decoder
prefills fast (one large matmul per layer) but decodes slowly (540 MB of weights per token). A closed-book
answer is a ~50-token prompt and ~24 decoded tokens: decode-bound. A 5-passage answer is a ~700-token
prompt: prefill-bound. `model.long_prompt_backend` names the engine for prompts of at least
`model.long_prompt_tokens` tokens; shorter ones (closed-book answers, the gate's probe and its
continuation) go to `model.backend`. Both engines share the base weights' tokenizer, so a prompt has the
same tokens on either (tests/test_backend_llamacpp.py checks it for the packaged SmolLM2).

A continuation goes back to the engine that made the state. The capabilities are what both engines give
(a signal one of them lacks is refused at start-up like any backend's), so the gate never reads a signal on
some questions and not on others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from expertrag.model.backend import Capabilities, Generation, Generator, Prompt, TokenEvent

_ENTROPY_RANK = {"none": 0, "top_k": 1, "full": 2}


def common_capabilities(short: Capabilities, long: Capabilities, name: str) -> Capabilities:
    """What both engines can give."""
    flags = {f.name: getattr(short, f.name) and getattr(long, f.name)
             for f in fields(Capabilities) if isinstance(getattr(short, f.name), bool)}
    flags["batched"] = False  # rows of one batch may need different engines
    flags["batch_shares_router"] = False
    entropy = min(short.entropy, long.entropy, key=_ENTROPY_RANK.__getitem__)
    hidden_size = short.hidden_size if short.hidden_size == long.hidden_size else None
    return Capabilities(backend=name, model=f"{short.model} (short prompts), {long.model} (long prompts)",
                        entropy=entropy, hidden_size=hidden_size, **flags)


class LengthRoutedGenerator:
    """`short` answers prompts under `threshold` tokens (counted by `count`), `long` the others."""

    def __init__(self, short: Generator, long: Generator, threshold: int, count: Callable[[Prompt], int]):
        self.short, self.long, self.threshold, self.count = short, long, threshold, count
        self.capabilities = common_capabilities(short.capabilities, long.capabilities,
                                                f"{short.capabilities.backend}+{long.capabilities.backend}")
        self.routed = {"short": 0, "long": 0}  # calls per engine (for benchmarks and diagnostics)

    def forget_cache(self) -> None:
        """Benchmarks: drop whatever prompt cache an engine keeps (llama.cpp's prefix)."""
        for engine in (self.short, self.long):
            forget = getattr(engine, "forget_cache", None)
            if forget is not None:
                forget()

    def set_threads(self, n: int) -> None:
        """Benchmarks: an engine with its own thread pool (llama.cpp) follows torch's thread count."""
        for engine in (self.short, self.long):
            set_threads = getattr(engine, "set_threads", None)
            if set_threads is not None:
                set_threads(n)

    def engine_for(self, prompt: Prompt | None, state: Any = None) -> Generator:
        if state is not None:
            return self.long if getattr(state, "engine", None) == "long" else self.short
        assert prompt is not None
        return self.long if self.count(prompt) >= self.threshold else self.short

    def generate(self, prompt: Prompt | None = None, *, max_new_tokens: int | None = None,
                 stop: Sequence[str] | None = None, passages: Any = None, state: Any = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 hidden_layers: Sequence[int] | None = None, return_router: bool = False,
                 router_span: str | None = None,
                 on_token: Callable[[TokenEvent], None] | None = None) -> Generation:
        if prompt is None and state is None:
            raise ValueError("give a prompt (or a state to continue)")
        inner = state.inner if isinstance(state, RoutedState) else state
        engine = self.engine_for(prompt, state)
        which = "long" if engine is self.long else "short"
        self.routed[which] += 1
        g = engine.generate(prompt, max_new_tokens=max_new_tokens, stop=stop, passages=passages, state=inner,
                            temperature=temperature, top_p=top_p, seed=seed, hidden_layers=hidden_layers,
                            return_router=return_router, router_span=router_span, on_token=on_token)
        g.state = RoutedState(which, g.state)
        return g


class RoutedState:
    """An engine's continuation state, with which engine made it."""

    def __init__(self, engine: str, inner: Any):
        self.engine, self.inner = engine, inner
