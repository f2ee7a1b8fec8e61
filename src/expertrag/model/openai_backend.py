"""The `openai` backend: chat completions of an OpenAI-compatible server (vLLM, llama-server, Ollama, or
`expertrag serve`) behind the `Generator` seam, over httpx.

What HTTP gives and what it does not (see `capabilities`):
- text, per-token log-probs (`logprobs: true`), finish reason and prompt tokens (`usage`);
- entropies only as a top-k approximation: H ~ -sum_i p_i log p_i - r log r over the `top_logprobs`
  alternatives, with the rest mass r = 1 - sum_i p_i counted as one outcome. Merging outcomes never raises
  entropy, so this is a lower bound of the full-distribution entropy the native backend reports;
- no token ids (the API sends token strings: ids are -1), no hidden states, no router statistics, no
  passage memory, no batching;
- no KV cache to continue: `state` keeps the request, and a continuation asks again for the draft plus the
  new tokens and returns the new ones (exact for greedy decoding; the draft is decoded twice).
Requests time out after `model.timeout_s` and are retried `model.retries` times with exponential backoff
on connection errors, timeouts, 429 and 5xx; a server that is down, rejects the key, or does not serve the
model raises one clear ExpertRAGError.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from expertrag.errors import ExpertRAGError
from expertrag.model.backend import Capabilities, Generation, Prompt, TokenEvent
from expertrag.model.config import GenerationConfig, ModelConfig

_RETRY_STATUS = {429, 500, 502, 503, 504}


class BackendUnavailable(ExpertRAGError):
    """The OpenAI-compatible server cannot be reached, rejects us, or does not serve the model."""


@dataclass
class OpenAIState:
    """What a continuation re-asks: the messages, and what was generated for them so far."""

    messages: list[dict[str, str]]
    text: str
    tokens: int
    logprobs: list[float]
    ended: str | None = None


def topk_entropy(alternatives: Sequence[float]) -> float:
    """Entropy (nats) of the top-k log-probs, the remaining mass as one outcome (a lower bound)."""
    ps = [math.exp(lp) for lp in alternatives if lp is not None and math.isfinite(lp)]
    rest = max(0.0, 1.0 - sum(ps))
    return -sum(p * math.log(p) for p in ps if p > 0) - (rest * math.log(rest) if rest > 0 else 0.0)


class OpenAIGenerator:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, cfg: GenerationConfig | None = None,
                 timeout_s: float = 60.0, retries: int = 2, top_logprobs: int = 5, backoff_s: float = 0.5,
                 check: bool = True):
        self.base_url, self.model_name = base_url.rstrip("/"), model
        self.cfg = cfg or GenerationConfig()
        self.retries, self.backoff_s, self.top_k = int(retries), float(backoff_s), int(top_logprobs)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self.capabilities = Capabilities(
            backend="openai", model=f"{model} at {self.base_url}", entropy="top_k" if self.top_k else "none",
            top_logprobs=bool(self.top_k), hidden_states=False, router_stats=False, batched=False,
            continuation=False, streaming=True)
        if check:
            self.check_model()

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> OpenAIGenerator:
        if not cfg.base_url or not cfg.name:
            raise ExpertRAGError("the openai backend needs model.base_url (e.g. http://127.0.0.1:8000/v1) and "
                                 "model.name")
        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ExpertRAGError(f"model.api_key_env names {cfg.api_key_env}, which is not set")
        return cls(cfg.base_url, cfg.name, key, cfg=cfg.generation, timeout_s=cfg.timeout_s, retries=cfg.retries,
                   top_logprobs=cfg.top_logprobs)

    def close(self) -> None:
        self.client.close()

    # ---- HTTP --------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, *, stream: bool = False) -> httpx.Response:
        """One request with retries; the response is open (read or close it) when `stream`."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                req = self.client.build_request(method, path, json=body)
                r = self.client.send(req, stream=stream)
            except httpx.TransportError as e:  # connection refused, reset, timeout
                last = e
                continue
            if r.status_code in _RETRY_STATUS and attempt < self.retries:
                r.close()
                last = None
                continue
            if r.status_code >= 400:
                if stream:
                    r.read()
                self._raise_for(r)
            return r
        if isinstance(last, httpx.TimeoutException):
            raise BackendUnavailable(f"openai backend: {self.base_url} timed out after {self.client.timeout.read} s "
                                     f"({self.retries + 1} attempts); raise model.timeout_s")
        raise BackendUnavailable(f"openai backend: cannot reach {self.base_url} ({type(last).__name__}: {last}) "
                                 f"after {self.retries + 1} attempts; is the server running?")

    def _raise_for(self, r: httpx.Response) -> None:
        try:
            err = r.json().get("error", {})
            msg = err.get("message") if isinstance(err, dict) else str(err)
        except (json.JSONDecodeError, AttributeError):
            msg = r.text[:300]
        if r.status_code in (401, 403):
            raise BackendUnavailable(f"openai backend: {self.base_url} rejected the API key ({r.status_code}: {msg}); "
                                     "set the env var named by model.api_key_env")
        if r.status_code == 404:
            raise BackendUnavailable(f"openai backend: {self.base_url} does not serve model '{self.model_name}' "
                                     f"({msg})")
        raise BackendUnavailable(f"openai backend: {self.base_url} answered {r.status_code}: {msg}")

    def check_model(self) -> None:
        """At start-up: the server answers and lists the model (servers without /models are let through)."""
        try:
            r = self._request("GET", "/models")
        except BackendUnavailable as e:
            if "does not serve" in str(e):  # no /models route: the first completion will tell
                return
            raise
        ids = [m.get("id") for m in r.json().get("data", []) if isinstance(m, dict)]
        if ids and self.model_name not in ids:
            raise BackendUnavailable(f"openai backend: {self.base_url} does not serve model '{self.model_name}'; "
                                     f"it serves: {', '.join(map(str, ids))}")

    def _events(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        r = self._request("POST", "/chat/completions", body, stream=True)
        try:
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event and "choices" not in event:
                    raise BackendUnavailable(f"openai backend: the stream failed: {event['error']}")
                yield event
        except httpx.TimeoutException:  # between two chunks: the server stalled longer than the read timeout
            raise BackendUnavailable(f"openai backend: {self.base_url} timed out after {self.client.timeout.read} s "
                                     "mid-stream; raise model.timeout_s") from None
        except httpx.TransportError as e:
            raise BackendUnavailable(f"openai backend: the stream from {self.base_url} broke: {e}") from None
        finally:
            r.close()

    # ---- the seam -----------------------------------------------------------------------------------
    def _messages(self, prompt: Prompt) -> list[dict[str, str]]:
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        messages = [dict(m) for m in prompt]
        sp = self.cfg.system_prompt
        if sp is not None and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": sp}, *messages]
        return messages

    def generate(self, prompt: Prompt | None = None, *, max_new_tokens: int | None = None,
                 stop: Sequence[str] | None = None, passages: Any = None, state: OpenAIState | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 hidden_layers: Sequence[int] | None = None, return_router: bool = False,
                 router_span: str | None = None,
                 on_token: Callable[[TokenEvent], None] | None = None) -> Generation:
        """hidden_layers / return_router give None here (capabilities say so); passages are refused."""
        if passages is not None:
            raise ValueError("the openai backend cannot read passage memory; put the passages in the prompt")
        c = self.cfg
        max_new, stops, temperature, top_p, seed = c.resolve(max_new_tokens, stop, temperature, top_p, seed)
        if state is not None:
            if prompt is not None:
                raise ValueError("the openai backend cannot append text to a continuation")
            if state.ended:
                return Generation("", [], [], [], state, 0, state.ended)
            messages, skip_text, skip_tokens = state.messages, state.text, state.tokens
        elif prompt is None:
            raise ValueError("give a prompt (or a state to continue)")
        else:
            messages, skip_text, skip_tokens = self._messages(prompt), "", 0
        body: dict[str, Any] = {
            "model": self.model_name, "messages": messages, "max_tokens": skip_tokens + max_new, "stream": True,
            "logprobs": True, "temperature": temperature,
            "top_p": top_p, "stream_options": {"include_usage": True},
        }
        if self.top_k:
            body["top_logprobs"] = self.top_k
        if stops:
            body["stop"] = stops[:4]  # OpenAI's limit; the rest are applied here
        if seed is not None:
            body["seed"] = seed
        text, entries, reason, prompt_tokens = "", [], None, 0
        emitted = len(skip_text)
        for ev in self._events(body):
            usage = ev.get("usage")
            if usage:
                prompt_tokens = int(usage.get("prompt_tokens") or 0)
            for ch in ev.get("choices") or []:
                text += (ch.get("delta") or {}).get("content") or ""
                entries += ((ch.get("logprobs") or {}).get("content") or [])
                reason = ch.get("finish_reason") or reason
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
            if on_token is not None and len(text) > emitted:
                on_token(TokenEvent(0, -1, text[emitted:], math.nan, math.nan))  # per-token values come last
                emitted = len(text)
            if cut >= 0:
                break
        if text and not entries:
            raise BackendUnavailable(f"openai backend: {self.base_url} returned no logprobs; this backend needs a "
                                     "server that supports `logprobs: true`")
        logprobs = [float(e.get("logprob", math.nan)) for e in entries]
        entropies = [topk_entropy([a.get("logprob") for a in e.get("top_logprobs") or []]) for e in entries]
        if not text.startswith(skip_text):  # a non-deterministic server did not repeat the draft
            raise ExpertRAGError("openai backend: the server did not reproduce the draft it continues (sampling "
                                 "or a non-deterministic server); continue with temperature 0")
        new_lp, new_ent = logprobs[skip_tokens:], entropies[skip_tokens:]
        finish = {"length": "length"}.get(reason or "", "stop")
        n_new = len(new_lp)
        new_state = OpenAIState(messages, text, skip_tokens + n_new, (state.logprobs if state else []) + new_lp,
                                None if finish == "length" else finish)
        return Generation(text=text[len(skip_text):], token_ids=[-1] * n_new, logprobs=new_lp, entropies=new_ent,
                          state=new_state, prompt_tokens=prompt_tokens,  # HTTP re-feeds the whole prompt
                          finish_reason=finish, top_logprobs=None)
