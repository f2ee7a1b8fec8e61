"""`ExpertRAG.answer`: decide whether to retrieve, retrieve if so, generate, cite, and say how sure.

One question's way (see DESIGN.md): the policy asks the question's `PipelineGateContext` for what it
needs (query-only features cost one index lookup; the closed-book probe costs a short draft). When the
decision is "no retrieval" and a probe ran, the answer continues the probe's draft from its KV cache, so
the no-retrieval path pays for the draft once. Retrieval reuses the BM25 and dense rankings the fast gate
already computed.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from expertrag.errors import InputError
from expertrag.answers import contains_answer, normalize_answer
from expertrag.gate.features import query_features
from expertrag.gate.types import Decision, Probe
from expertrag.pipeline.answer import Answer, Citation, Timings, User
from expertrag.pipeline.cache import LRUCache, cache_key
from expertrag.pipeline.config import PipelineConfig
from expertrag.pipeline.prompts import closed_book_messages, open_book_messages
from expertrag.retrieval.fusion import reciprocal_rank_fusion
from expertrag.retrieval.index import Index
from expertrag.retrieval.types import Filters, Hit

ABSTAIN_TEXT = "I don't know."
_MARKER = re.compile(r"\s*\[(\d{1,2})\]")


def validate_question(question: Any, max_chars: int) -> str:
    if not isinstance(question, str):
        raise InputError(f"the question must be text, got {type(question).__name__}")
    q = question.strip()
    if not q:
        raise InputError("empty question")
    if len(q) > max_chars:
        raise InputError(f"question too long: {len(q)} characters, the limit is {max_chars} "
                         "(pipeline.max_query_chars)")
    if not any(ch.isalnum() for ch in q):
        raise InputError("the question has no letters or digits")
    return q


class PipelineGateContext:
    """Lazily computed, cached facts about one question, for the policy to draw on."""

    def __init__(self, rag: ExpertRAG, question: str, metadata: dict[str, Any], filters: Filters | None):
        self.rag = rag
        self.question = question
        self.metadata = metadata
        self.filters = filters
        self._allowed: np.ndarray | None = None
        self._rankings: tuple[list, list] | None = None
        self._features: dict[str, float] | None = None
        self._embedding: np.ndarray | None = None
        self._probe: Probe | None = None
        self.retrieval_ms = 0.0  # ranking work done for the gate, reusable by retrieval

    def query_embedding(self) -> np.ndarray:
        if self._embedding is None:
            self._embedding = self.rag.index.embedder.encode([self.question])[0]
        return self._embedding

    def rankings(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """(bm25, dense) rankings of rowids at the fusion depth, computed once."""
        if self._rankings is None:
            t = time.perf_counter()
            index, cfg = self.rag.index, self.rag.index.config
            depth = max(self.rag.config.k, cfg.candidates)
            self._allowed = index.allowed(self.filters)
            bm25 = index.bm25.search(self.question, depth, self._allowed)
            dense = index.dense.search(self.query_embedding()[None, :], depth, self._allowed)[0]
            self._rankings = (bm25, dense)
            self.retrieval_ms += (time.perf_counter() - t) * 1000
        return self._rankings

    def query_features(self) -> dict[str, float]:
        if self._features is None:
            bm25, dense = self.rankings()
            top_b, top_d = self.rag.index.hits([bm25[:5], dense[:5]], self._allowed)
            self._features = query_features(self.question, top_b, top_d)
        return self._features

    def probe(self) -> Probe:
        if self._probe is None:
            self._probe = self.rag.probe(self.question)
        return self._probe

    @property
    def probed(self) -> Probe | None:
        return self._probe

    def retrieve(self, k: int) -> list[Hit]:
        bm25, dense = self.rankings()
        mode = self.rag.config.search_mode
        if mode == "bm25":
            ranked = bm25[:k]
        elif mode == "dense":
            ranked = dense[:k]
        else:
            cfg = self.rag.index.config
            ranked = reciprocal_rank_fusion([[r for r, _ in bm25], [r for r, _ in dense]],
                                            (cfg.weight_bm25, cfg.weight_dense), cfg.rrf_k)[:k]
        return self.rag.index.hits([ranked], self._allowed)[0]


class ExpertRAG:
    """The orchestrator: owns the index, the generator, the policy, timings and caches."""

    def __init__(self, index: Index, generator: Any, policy: Any, config: PipelineConfig | None = None,
                 policy_name: str | None = None):
        self.index = index
        self.generator = generator
        self.policy = policy
        self.policy_name = policy_name or getattr(policy, "name", type(policy).__name__)
        self.config = config or PipelineConfig()
        path = self.config.cache_path
        self.answer_cache = LRUCache(self.config.answer_cache_size, path, "answers") \
            if self.config.answer_cache_size else None
        self.retrieval_cache = LRUCache(self.config.retrieval_cache_size, path, "retrieval") \
            if self.config.retrieval_cache_size else None

    # ---- the closed-book probe -----------------------------------------------------------------------
    def probe(self, question: str) -> Probe:
        t = time.perf_counter()
        g = self.generator.generate(
            closed_book_messages(question), max_new_tokens=self.config.probe_tokens, stop=self.config.stop,
            hidden_layers=[self.config.probe_layer], return_router=True,
        )
        return Probe(
            text=g.text, token_ids=list(g.token_ids), logprobs=list(g.logprobs), entropies=list(g.entropies),
            hidden=None if g.hidden is None else g.hidden.float().reshape(-1).numpy(), retrieval_affinity=_mean_affinity(g.router), router_entropy=_mean_router_entropy(g.router),
            state=g, ms=(time.perf_counter() - t) * 1000,
        )

    # ---- answering -------------------------------------------------------------------------------------
    def answer(self, question: str, user: User | None = None, metadata: dict[str, Any] | None = None) -> Answer:
        started = time.perf_counter()
        q = validate_question(question, self.config.max_query_chars)
        # fail closed: no user = public passages only; everything needs the explicit all_groups switch
        filters = (Filters(groups=tuple(user.groups), all_groups=user.all_groups) if user is not None
                   else Filters())
        key = cache_key(q, self.index.version, self.policy_name, self.config.model_dump(), filters.access_key())
        if self.answer_cache is not None and metadata is None:
            cached = self.answer_cache.get(key)
            if cached is not None:
                answer = Answer.from_dict(cached)
                answer.timings = Timings(total_ms=(time.perf_counter() - started) * 1000, cache="answer")
                return answer

        ctx = PipelineGateContext(self, q, dict(metadata or {}), filters)
        t = time.perf_counter()
        decision: Decision = self.policy.decide(ctx)
        decide_ms = (time.perf_counter() - t) * 1000
        probe = ctx.probed
        probe_ms = probe.ms if probe is not None else 0.0
        timings = Timings(gate_ms=max(decide_ms - probe_ms - ctx.retrieval_ms, 0.0), probe_ms=probe_ms)

        hits: list[Hit] = []
        if decision.retrieve:
            t = time.perf_counter()
            hits, cached = self._retrieve(ctx, q, filters)
            if cached:
                timings.cache = "retrieval"
            timings.retrieval_ms = (time.perf_counter() - t) * 1000 + ctx.retrieval_ms
            t = time.perf_counter()
            messages = (closed_book_messages(q) if self.config.fusion == "expert" and has_retrieval_expert(self.generator)
                        else open_book_messages(q, hits, self.config.passage_max_chars))
            gen = self.generator.generate(
                messages,
                max_new_tokens=self.config.max_new_tokens, stop=self.config.stop,
                passages=self._passage_memory(hits), return_router=True,
            )
            timings.generation_ms = (time.perf_counter() - t) * 1000
            token_ids, logprobs = list(gen.token_ids), list(gen.logprobs)
            text, router, prompt_tokens = gen.text, gen.router, gen.prompt_tokens
        else:
            timings.gate_ms += ctx.retrieval_ms  # query features were gate work, not retrieval
            t = time.perf_counter()
            if probe is not None:  # continue the draft from its KV cache: nothing recomputed
                first = probe.state
                rest_budget = self.config.max_new_tokens - len(first.token_ids)
                token_ids, logprobs = list(first.token_ids), list(first.logprobs)
                text = first.text
                if first.finish_reason == "length" and rest_budget > 0:
                    more = self.generator.generate(None, state=first.state, max_new_tokens=rest_budget,
                                                   stop=self.config.stop)
                    token_ids += list(more.token_ids)
                    logprobs += list(more.logprobs)
                    text = first.text + more.text  # byte-level BPE: pieces decode independently
                router, prompt_tokens = first.router, first.prompt_tokens
            else:
                gen = self.generator.generate(closed_book_messages(q), max_new_tokens=self.config.max_new_tokens,
                                              stop=self.config.stop, return_router=True)
                token_ids, logprobs = list(gen.token_ids), list(gen.logprobs)
                text, router, prompt_tokens = gen.text, gen.router, gen.prompt_tokens
            timings.generation_ms = (time.perf_counter() - t) * 1000 + probe_ms

        answer = self._finish(q, text, token_ids, logprobs, hits, decision, timings, router, prompt_tokens)
        answer.timings.total_ms = (time.perf_counter() - started) * 1000
        if self.answer_cache is not None and metadata is None:
            self.answer_cache.put(key, answer.to_dict())
        return answer

    def _retrieve(self, ctx: PipelineGateContext, q: str, filters: Filters | None) -> tuple[list[Hit], bool]:
        """The k hits for `q`, and whether they came from the retrieval cache."""
        key = cache_key(q, self.index.version, self.config.k, self.config.search_mode,
                        filters.access_key() if filters else Filters().access_key())
        if self.retrieval_cache is not None:
            cached = self.retrieval_cache.get(key)
            if cached is not None:
                return [Hit(**h) for h in cached], True
        hits = ctx.retrieve(self.config.k)
        if self.retrieval_cache is not None:
            self.retrieval_cache.put(key, [h.to_dict() for h in hits])
        return hits, False

    def _passage_memory(self, hits: Sequence[Hit]):
        if self.config.fusion == "concat" or not hits or not has_retrieval_expert(self.generator):
            return None
        return self.generator.encode_passages([memory_text(hits)])

    def _finish(self, q: str, text: str, token_ids: list[int], logprobs: list[float], hits: list[Hit],
                decision: Decision, timings: Timings, router: Any, prompt_tokens: int) -> Answer:
        markers = [int(m) for m in _MARKER.findall(text)]
        clean = _MARKER.sub("", text).strip()
        cited: list[Citation] = []
        for n in dict.fromkeys(markers):  # in order of first use, once each
            if 1 <= n <= len(hits):  # only passages that were really retrieved
                cited.append(Citation(id=hits[n - 1].id, title=hits[n - 1].title, marker=n))
        supported = [i for i, h in enumerate(hits, 1) if supports(f"{h.title} {h.contents}", clean, q)]
        if not cited and supported:  # no marker: cite the passages that contain the answer
            cited = [Citation(id=hits[i - 1].id, title=hits[i - 1].title, marker=i) for i in supported]
        confidence = math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0
        abstained = (not clean) or (confidence < self.config.abstain_below and not supported)
        return Answer(
            question=q, text=ABSTAIN_TEXT if abstained else clean, retrieved=decision.retrieve,
            citations=[] if abstained else cited, confidence=confidence, abstained=abstained,
            gate={"decision": "retrieve" if decision.retrieve else "no_retrieve", "score": decision.score,
                  "stage": decision.stage, "policy": self.policy_name, "features": decision.features},
            timings=timings, tokens={"prompt": int(prompt_tokens), "generated": len(token_ids)},
            experts=expert_usage(router), passages=[h.to_dict() for h in hits], generated=clean,
            token_ids=list(token_ids),
        )


_STOPWORDS = frozenset(
    "a an the is are was were be been of in on at to for from by with and or as it its this that which who whom "
    "what when where why how i you he she they we his her their our not no yes also there here than then".split())


def supports(passage: str, answer: str, question: str) -> bool:
    """Does the passage back the answer? The answer's own content words (those not already in the question)
    must occur in the passage: "The official language of Brazil is Portuguese." needs "portuguese"."""
    if not answer:
        return False
    if contains_answer(passage, [answer]):
        return True
    asked = set(normalize_answer(question).split())
    novel = {w for w in normalize_answer(answer).split() if w not in asked and w not in _STOPWORDS}
    if not novel:
        return False
    present = set(normalize_answer(passage).split())
    return len(novel & present) >= max(1, math.ceil(len(novel) * 2 / 3))


def memory_text(hits: Sequence[Hit]) -> str:
    """What the retrieval expert reads for these hits: every passage, titled, in one memory."""
    return " ".join(f"{h.title}. {h.contents}" for h in hits)


def has_retrieval_expert(generator: Any) -> bool:
    model = getattr(generator, "model", None)
    return any(getattr(layer.mlp, "retrieval", None) is not None for layer in getattr(model, "layers", []))


def _mean_affinity(router: Any) -> float | None:
    vals = [float(a.retrieval_affinity.float().mean()) for a in (router or []) if a is not None
            and a.retrieval_affinity is not None]
    return float(np.mean(vals)) if vals else None


def _mean_router_entropy(router: Any) -> float | None:
    vals = []
    for a in router or []:
        if a is None:
            continue
        p = a.router_logits.float().softmax(-1)
        vals.append(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()))
    return float(np.mean(vals)) if vals else None


def expert_usage(router: Any) -> dict[str, Any]:
    """Per MoE layer: share of token-slots per expert; and the retrieval expert's mean share."""
    layers = {}
    retrieval_shares = []
    for i, a in enumerate(router or []):
        if a is None:
            continue
        counts = a.tokens_per_expert.float()
        share = (counts / counts.sum().clamp_min(1)).tolist()
        layers[str(i)] = [round(s, 4) for s in share]
        if a.retrieval_affinity is not None:
            retrieval_shares.append(share[-1])
    return {"layers": layers, "retrieval_expert_share": float(np.mean(retrieval_shares)) if retrieval_shares else None}
