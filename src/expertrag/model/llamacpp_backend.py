"""The `llamacpp` backend: a GGUF file run by llama.cpp (`llama-cpp-python`) behind the `Generator` seam.

Why it exists: on a CPU, decode is memory-bound (our fp32 decoder moves ~540 MB of weights per token), and
llama.cpp runs quantised weights with hand-written kernels. The default model is the packaged SmolLM2
GGUF, read directly (no conversion); `model.gguf_type` re-encodes it once into another llama.cpp type
(q8_0, f16, f32: cached beside the converted model), because the packaged Q4_1 has no fast prefill path.

Our own decoding loop over llama.cpp's context, not `create_completion`: every step reads the last
position's full-vocabulary logits (available without `logits_all`, which would allocate n_ctx x vocab
floats), so log-probs and entropies are of the model's whole distribution, as on the other backends.

One context holds one sequence. A new prompt reuses the longest prefix of tokens already in the KV cache
(the system prompt and chat preamble of the previous question, or the probe's draft when the pipeline
continues it). A generation that may be continued (it ended on its length) also keeps a copy of its KV
cells (llama.cpp's per-sequence state, ~22 KB a token for SmolLM2): when other prompts ran in between, as
when the service probes several questions before continuing one, the copy is put back instead of
recomputing the prompt. Not batched: llama.cpp's batch API needs one sequence id per row and a
shared KV budget; the pipeline answers rows one by one here.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertrag.errors import ExpertRAGError
from expertrag.model.backend import Capabilities, Generation, Prompt, TokenEvent
from expertrag.model.config import GenerationConfig, ModelConfig
from expertrag.model.stops import held_back

INSTALL_HINT = ("the llamacpp backend needs llama-cpp-python, which compiles llama.cpp (~20 min on 2 cores): "
                "run `make llamacpp`")
# llama.cpp file types `model.gguf_type` may ask for (llama_ftype values); "as-is" reads the file itself.
GGUF_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 7, "q4_1": 3}


def available() -> bool:
    """Whether llama-cpp-python is importable (its native library built and loads)."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _llama_cpp():
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise ExpertRAGError(f"{INSTALL_HINT} ({e})") from None
    return llama_cpp


@dataclass
class LlamaCppState:
    """What a continuation needs: every token so far (the last one sampled, not yet fed) and how it ended."""

    tokens: list[int]
    ended: str | None = None  # "eos" / "stop" once generation ended
    kv: bytes | None = field(default=None, repr=False)  # the KV cells of tokens[:-1] (llama.cpp seq 0 state)


def converted_gguf(source: Path, gguf_type: str) -> Path:
    """`source` re-encoded once into `gguf_type` with llama.cpp's own quantiser, cached; the cached path.

    From the packaged Q4_1 file, f32/f16 hold the dequantised weights (f32 exactly, f16 to fp16 rounding)
    and q8_0 requantises them (8-bit blocks of the 4-bit values: a small extra rounding)."""
    from expertrag.fileio import atomic_path
    from expertrag.paths import cache_dir

    if gguf_type not in GGUF_TYPES:
        raise ExpertRAGError(f"model.gguf_type {gguf_type!r}: choose as-is or one of {', '.join(GGUF_TYPES)}")
    st = source.stat()
    target = cache_dir() / "gguf" / f"{source.stem}.{st.st_size}.{gguf_type}.gguf"
    if target.is_file():
        return target
    lc = _llama_cpp()
    target.parent.mkdir(parents=True, exist_ok=True)
    params = lc.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[gguf_type]
    params.allow_requantize = True  # the source is already quantised
    params.nthread = os.cpu_count() or 1
    with atomic_path(target) as tmp:
        rc = lc.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ExpertRAGError(f"{source}: llama.cpp could not re-encode it as {gguf_type} (code {rc})")
    return target


class LlamaCppGenerator:
    """A GGUF model run by llama.cpp behind the `Generator` interface. Defaults come from `GenerationConfig`."""

    def __init__(self, path: str | Path, cfg: GenerationConfig | None = None, *, n_ctx: int = 4096,
                 threads: int | None = None, name: str | None = None):
        self._lc = lc = _llama_cpp()
        path = Path(path)
        if not path.is_file():
            raise ExpertRAGError(f"model.path {path}: no such GGUF file")
        self.cfg = cfg or GenerationConfig()
        self.threads = threads or _default_threads()
        try:
            self.llm = lc.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=self.threads,
                                n_threads_batch=self.threads, logits_all=False, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise ExpertRAGError(f"model.path {path}: llama.cpp cannot load it: {e}") from None
        self.path = path
        self.n_vocab = self.llm.n_vocab()
        meta = self.llm.metadata or {}
        self._template = meta.get("tokenizer.chat_template")
        self._compiled: Any = None
        self._specials: dict[str, str] = {}
        self._add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self._eos = {self.llm.token_eos()}
        eot = getattr(self.llm._model, "token_eot", None)  # end of turn, where the vocabulary has one
        if eot is not None and eot() >= 0:
            self._eos.add(eot())
        self.capabilities = Capabilities(
            backend="llamacpp", model=name or path.name, entropy="full", hidden_states=False, router_stats=False,
            batched=False, continuation=True, streaming=True)

    @classmethod
    def from_config(cls, cfg: ModelConfig | None = None) -> LlamaCppGenerator:
        """`model.path` (a .gguf file), else the packaged GGUF of `model.base`; `model.gguf_type` re-encodes it."""
        from expertrag.model.loading import gguf_path

        cfg = cfg or ModelConfig()
        source = Path(cfg.path).expanduser() if cfg.path else gguf_path(cfg.base)
        if not source.is_file():
            raise ExpertRAGError(f"model.path {source}: no such GGUF file")
        path = source if cfg.gguf_type == "as-is" else converted_gguf(source, cfg.gguf_type)
        name = source.name if cfg.gguf_type == "as-is" else f"{source.name} as {cfg.gguf_type}"
        return cls(path, cfg.generation, threads=cfg.threads, name=name)

    def forget_cache(self) -> None:
        """Drop the cached prompt prefix: the next call evaluates its whole prompt (benchmarks use this)."""
        self.llm.reset()

    def set_threads(self, n: int) -> None:
        """CPU threads for prefill and decode from now on."""
        self.threads = n
        self.llm._ctx.set_n_threads(n, n)

    # ---- tokens ----------------------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """A chat through the GGUF's own chat template (with the assistant generation prompt)."""
        messages = list(prompt)
        sp = self.cfg.system_prompt
        if sp is not None and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": sp}, *messages]
        if not self._template:
            raise ExpertRAGError(f"model {self.capabilities.model}: its GGUF has no chat template")
        if self._compiled is None:  # compiling the template costs ~20 ms: once
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg: str) -> None:
                raise ExpertRAGError(f"model {self.capabilities.model}: chat template: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self._template)
            tok = self.llm._model  # the special tokens' text, as the template writes them: also once
            self._specials = {"bos_token": _piece(tok, self.llm.token_bos()),
                              "eos_token": _piece(tok, self.llm.token_eos())}
        return self._compiled.render(messages=messages, add_generation_prompt=True, **self._specials)

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.llm.tokenize(prompt.encode("utf-8"), add_bos=self._add_bos, special=False)
        # the template writes the special tokens (and a BOS where the model wants one) itself
        return self.llm.tokenize(self.render(prompt).encode("utf-8"), add_bos=False, special=True)

    def decode(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    # ---- the seam --------------------------------------------------------------------------------------
    def generate(self, prompt: Prompt | None = None, *, max_new_tokens: int | None = None,
                 stop: Sequence[str] | None = None, passages: Any = None, state: LlamaCppState | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 hidden_layers: Sequence[int] | None = None, return_router: bool = False,
                 router_span: str | None = None,
                 on_token: Callable[[TokenEvent], None] | None = None) -> Generation:
        if passages is not None:
            raise ValueError("the llamacpp backend cannot read passage memory; put the passages in the prompt")
        if hidden_layers:
            raise ValueError("the llamacpp backend gives no hidden states (capabilities.hidden_states is False)")
        max_new, stops, temperature, top_p, seed = self.cfg.resolve(max_new_tokens, stop, temperature, top_p, seed)
        if state is not None:
            if prompt is None and state.ended:
                return Generation("", [], [], [], state, 0, state.ended)
            if prompt is not None and not isinstance(prompt, str):
                raise ValueError("a continuation appends raw text, not chat messages")
            extra = [] if prompt is None else self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False)
            tokens = [*state.tokens, *extra]
        elif prompt is None:
            raise ValueError("give a prompt (or a state to continue)")
        else:
            tokens = self.encode(prompt)
            if not tokens:
                raise ValueError("every prompt needs at least one token")
        if len(tokens) + max_new > self.llm.n_ctx():
            raise ExpertRAGError(f"prompt of {len(tokens)} tokens + {max_new} new exceeds the context window "
                                 f"of {self.llm.n_ctx()} tokens")
        fed = self._feed(tokens, state)
        return self._decode(tokens, fed, max_new, stops, temperature, top_p, seed, on_token)

    def _cached_prefix(self, tokens: list[int]) -> int:
        """How many leading `tokens` the context's KV cache already holds (at most all but the last)."""
        llm = self.llm
        n = min(llm.n_tokens, len(tokens) - 1)
        if n <= 0:
            return 0
        diff = np.flatnonzero(llm.input_ids[:n] != np.asarray(tokens[:n], dtype=llm.input_ids.dtype))
        return int(diff[0]) if diff.size else n

    def _feed(self, tokens: list[int], state: LlamaCppState | None) -> int:
        """Bring the context to `tokens`: keep the longest cached prefix (or put a continued state's KV
        cells back), evaluate the rest (at least the last token, whose logits the first step reads).
        Returns the number of tokens evaluated."""
        llm = self.llm
        same = self._cached_prefix(tokens)
        if state is not None and state.kv is not None and same < len(state.tokens) - 1:
            same = len(state.tokens) - 1 if self._restore(state) else 0
        llm.n_tokens = same  # eval drops the KV cells from here on
        llm.eval(tokens[same:])
        return len(tokens) - same

    def _snapshot(self) -> bytes | None:
        """A copy of sequence 0's KV cells (what the context holds now)."""
        lc, ctx = self._lc, self.llm._ctx.ctx
        size = lc.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = lc.llama_state_seq_get_data(ctx, buf, size, 0)
        return ctypes.string_at(buf, n) if 0 < n <= size else None

    def _restore(self, state: LlamaCppState) -> bool:
        """Put `state`'s KV cells back into sequence 0; False when llama.cpp refuses them (the context is
        then empty and the caller recomputes)."""
        lc, llm, kv = self._lc, self.llm, state.kv
        assert kv is not None
        buf = (ctypes.c_uint8 * len(kv)).from_buffer_copy(kv)
        if lc.llama_state_seq_set_data(llm._ctx.ctx, buf, len(kv), 0) != len(kv):
            llm.reset()
            return False
        n = len(state.tokens) - 1
        llm.input_ids[:n] = state.tokens[:n]
        llm.n_tokens = n
        return True

    def _logits(self) -> np.ndarray:
        """The last evaluated position's logits (float32 copy: the buffer is reused by the next eval)."""
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def _decode(self, tokens: list[int], fed: int, max_new: int, stops: list[str], temperature: float,
                top_p: float, seed: int | None, on_token: Callable[[TokenEvent], None] | None) -> Generation:
        ids: list[int] = []
        logprobs: list[float] = []
        entropies: list[float] = []
        text, emitted, finished = "", 0, None
        rng = np.random.default_rng(seed) if temperature > 0 else None
        for step in range(max_new):
            if step:
                self.llm.eval([ids[-1]])
            logits = self._logits()
            t = _sample(logits, temperature, top_p, rng) if rng is not None else int(np.argmax(logits))
            lp, ent = _logprob_entropy(logits, t)
            ids.append(t)
            logprobs.append(lp)
            entropies.append(ent)
            full = self.decode(ids)
            cut = min((i for i in (full.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, finished, end = full[:cut], "stop", cut
            elif t in self._eos:
                text, finished, end = full, "eos", len(full)
            else:
                text = full
                end = len(full) if step == max_new - 1 else len(full) - held_back(full, stops)
            if on_token is not None:
                piece = text[emitted:end] if end > emitted else ""
                emitted = max(emitted, end)
                on_token(TokenEvent(0, t, piece, logprobs[-1], entropies[-1]))
            if finished:
                break
        # only a generation cut by its length can be continued: keep its KV cells for that
        state = LlamaCppState([*tokens, *ids], finished, self._snapshot() if finished is None else None)
        return Generation(text=text, token_ids=ids, logprobs=logprobs, entropies=entropies, state=state,
                          prompt_tokens=fed if fed else len(tokens), finish_reason=finished or "length")


def _default_threads() -> int:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return max(1, (os.cpu_count() or 2) // 2)


def _piece(model: Any, token: int) -> str:
    if token < 0:
        return ""
    return model.token_to_piece(token, special=True).decode("utf-8", errors="replace")


def _logprob_entropy(logits: np.ndarray, token: int) -> tuple[float, float]:
    """log p(token) and the entropy (nats) of softmax(logits), with one exp over the vocabulary
    (this runs once per generated token: log Z - E[z] with z = logits - max)."""
    z = logits - logits.max()
    e = np.exp(z)
    total = float(e.sum())
    log_z = float(np.log(total))
    return float(z[token]) - log_z, log_z - float(np.dot(e, z)) / total


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        sp = p[order]
        keep = np.cumsum(sp) - sp < top_p
        q = np.zeros_like(p)
        q[order[keep]] = sp[keep]
        p = q / q.sum()
    return int(rng.choice(p.size, p=p))
