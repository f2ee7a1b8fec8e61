"""`ExpertRAG.answer`: decide whether to retrieve, retrieve if so, generate, cite, and say how sure.

One question's way (see DESIGN.md): the policy asks the question's `PipelineGateContext` for what it
needs (query-only features cost one index lookup; the closed-book probe costs a short draft). When the
decision is "no retrieval" and a probe ran, the answer continues the probe's draft from its KV cache, so
the no-retrieval path pays for the draft once. Retrieval reuses the BM25 and dense rankings the fast gate
already computed.

With domain experts, the question is routed first; then each chosen expert decides retrieve/skip with its
own gate (experts/gates.py; none: the pipeline's policy, decided once for all of them), answers with its
own LoRA adapter where the backend can apply one (experts/adapter.py `AdapterBank`), and a question routed
to a `sensitive` expert goes through the policy expert whatever the rules found.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from expertrag.answers import contains_answer, normalize_answer
from expertrag.errors import ExpertRAGError, InputError
from expertrag.experts.fusion import ExpertCandidate, fuse
from expertrag.experts.gates import ExpertGates, record_error
from expertrag.experts.live import DomainMap, ExpertState, LiveExperts
from expertrag.experts.policy import PolicyExpert, Screening
from expertrag.experts.policy_config import PolicyConfig
from expertrag.experts.registry import ExpertRecord, RegistrySnapshot
from expertrag.experts.router import Route, RoutingSettings, boost_order, route
from expertrag.gate.config import GateConfig
from expertrag.gate.features import query_features, retrieval_features, time_features
from expertrag.gate.policies.base import Policy
from expertrag.gate.requirements import check_policy
from expertrag.gate.types import Decision, Probe
from expertrag.model.backend import Generator, RouterStats, TokenEvent
from expertrag.model.prompts import closed_book_messages, memory_text, open_book_messages
from expertrag.pipeline.answer import Answer, Citation, Timings, User
from expertrag.pipeline.cache import LRUCache, cache_key
from expertrag.pipeline.config import PipelineConfig
from expertrag.retrieval.index import Index
from expertrag.retrieval.types import Filters, Hit

ABSTAIN_TEXT = "I don't know."
AUDIT_FILE = "audit.jsonl"  # the policy expert's audit log, inside the index folder unless policy.audit_path
log = logging.getLogger(__name__)


@dataclass
class AnswerEvent:
    """What a streaming caller receives, in order: "decision" (the gate's), "passages" (when it
    retrieves), "token" (text as it is generated, any number), "answer" (the final `Answer`)."""

    kind: str
    data: dict[str, Any]


@dataclass
class AnswerRequest:
    """One question for `ExpertRAG.answer_many`. policy: a policy object to use instead of the pipeline's;
    k / max_new_tokens: per-request overrides of the pipeline config; on_event: receive `AnswerEvent`s;
    cancelled: polled while generating, True stops this request's decoding."""

    question: str
    user: User | None = None
    metadata: dict[str, Any] | None = None
    policy: Any = None
    k: int | None = None
    max_new_tokens: int | None = None
    on_event: Callable[[AnswerEvent], None] | None = None
    cancelled: Callable[[], bool] | None = None


class _Cancelled(Exception):
    """Raised from a token callback to stop decoding when every caller of a batch has gone."""


class RequestCancelled(ExpertRAGError):
    """In place of an answer whose caller cancelled it while it was being generated."""


@dataclass(eq=False)  # compared by identity: field-wise equality would compare KV caches
class _Job:
    """One request between its gate decision and its answer."""

    question: str
    config: PipelineConfig
    decision: Decision
    policy_name: str
    started: float
    timings: Timings
    cache_key: str | None = None
    on_event: Callable[[AnswerEvent], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    hits: list[Hit] = field(default_factory=list)
    messages: Any = None  # the prompt of a fresh generation
    memory: Any = None  # passage memory for the retrieval expert
    draft: Any = None  # the probe's Generation, continued instead of a fresh prompt
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    router: RouterStats | None = None
    prompt_tokens: int = 0
    error: Exception | None = None
    route: Route | None = None  # domain-expert routing (None: the index has no domain experts)
    state: ExpertState | None = None  # the registry + router this question started on
    expert: ExpertRecord | None = None  # the expert this job answers as
    weight: float = 1.0
    branches: list[_Job] = field(default_factory=list)  # one job per expert when several answer
    screening: Screening | None = None  # the policy expert's verdict, when it screens
    plan: _Plan | None = None  # a routed job's expert: its gate's decision, adapter
    adapter: str | None = None  # the AdapterBank key its generation runs under (None: the base model)

    @property
    def holds_tokens(self) -> bool:
        """cite_only: the text may only stand with a citation, known once it is complete, so it is not
        streamed token by token (the final text comes as one token event before the answer)."""
        return self.screening is not None and self.screening.action == "cite_only"

    def emit(self, event: AnswerEvent) -> None:
        if self.on_event is not None and not (event.kind == "token" and self.holds_tokens):
            self.on_event(event)

    def cancelled(self) -> bool:
        return self.is_cancelled is not None and self.is_cancelled()


@dataclass(eq=False)
class _Plan:
    """One chosen expert of a routed question, before generation: its settings, its gate's decision
    (and the context that decided it, reused by retrieval), and the adapter it answers with."""

    expert: ExpertRecord
    weight: float
    config: PipelineConfig
    gate: str  # what decided: the expert's `gate`, the pipeline's policy name, or "policy-expert" (cite_only)
    decision: Decision
    ctx: PipelineGateContext | None = None  # the expert's own gate context (None: the question's)
    adapter: str | None = None  # AdapterBank key, when applied
    adapter_note: str | None = None  # why the expert's adapter was not applied

    def to_dict(self) -> dict[str, Any]:
        d = self.decision
        return {"gate": self.gate, "decision": "retrieve" if d.retrieve else "no_retrieve",
                "score": round(float(d.score), 4), "stage": d.stage, "policy": d.policy,
                "adapter": self.expert.adapter, "adapter_applied": self.adapter is not None,
                **({"adapter_note": self.adapter_note} if self.adapter_note else {})}


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

    def __init__(self, rag: ExpertRAG, question: str, metadata: dict[str, Any], filters: Filters | None,
                 config: PipelineConfig | None = None, embedding: np.ndarray | None = None):
        self.rag = rag
        self.config = config or rag.config  # this question's settings (a request may override k)
        self.question = question
        self.metadata = metadata
        self.filters = filters
        self._allowed: np.ndarray | None = None
        self._rankings: tuple[list, list] | None = None
        self._features: dict[str, float] | None = None
        self._embedding: np.ndarray | None = embedding  # the policy expert's classifier may have computed it
        self._probe: Probe | None = None
        self._samples: dict[tuple[int, float, int], list[str]] = {}
        self._samples_ms: dict[tuple[int, float, int], float] = {}
        self.samples_ms = 0.0  # sampled drafts (gate sample consistency)
        self.retrieval_ms = 0.0  # ranking work done for the gate, reusable by retrieval
        self.adapter: str | None = None  # an expert's context probes with the expert's adapter

    @classmethod
    def many(cls, rag: ExpertRAG, items: Sequence[tuple[str, dict[str, Any]]], batch_size: int = 64
             ) -> list[PipelineGateContext]:
        """Unfiltered contexts for many (question, metadata) pairs, their embeddings and rankings computed in
        batches (one encoder call and one dense search per batch): the same values `rankings()` would
        compute one question at a time, for gate training and evaluation over thousands of labels."""
        out: list[PipelineGateContext] = []
        index = rag.index
        depth = max(rag.config.k, index.config.candidates)
        allowed = index.allowed(None)
        for i in range(0, len(items), batch_size):
            part = items[i:i + batch_size]
            t = time.perf_counter()
            vectors = index.embedder.encode([q for q, _ in part])
            sparse, dense = index.component_rankings([q for q, _ in part], depth, allowed, query_vectors=vectors)
            ms = (time.perf_counter() - t) * 1000 / max(len(part), 1)
            for j, (q, meta) in enumerate(part):
                ctx = cls(rag, q, meta, None, embedding=vectors[j])
                ctx._allowed, ctx._rankings, ctx.retrieval_ms = allowed, (sparse[j], dense[j]), ms
                out.append(ctx)
        return out

    def query_embedding(self) -> np.ndarray:
        if self._embedding is None:
            self._embedding = self.rag.index.embedder.encode([self.question])[0]
        return self._embedding

    def rankings(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """(bm25, dense) rankings of rowids at the fusion depth, computed once: the gate's query features
        read their top hits and retrieval fuses them, so a retrieving answer pays for one index lookup."""
        if self._rankings is None:
            t = time.perf_counter()
            index = self.rag.index
            depth = max(self.config.k, index.config.candidates)
            self._allowed = index.allowed(self.filters)
            sparse, dense = index.component_rankings([self.question], depth, self._allowed,
                                                     query_vectors=self.query_embedding()[None, :])
            self._rankings = (sparse[0], dense[0])
            self.retrieval_ms += (time.perf_counter() - t) * 1000
        return self._rankings

    def query_features(self) -> dict[str, float]:
        """Query-only features: gate.features' query, retrieval-evidence and time features (a gate reads
        the names its FeatureSpec lists; the evidence costs a few vocabulary lookups, no search)."""
        if self._features is None:
            bm25, dense = self.rankings()
            top_b, top_d = self.rag.index.hits([bm25[:5], dense[:5]], self._allowed)
            self._features = {**query_features(self.question, top_b, top_d),
                              **retrieval_features(self.question, top_b, top_d, self.rag.index.bm25),
                              **time_features(self.question)}
        return self._features

    def probe(self) -> Probe:
        if self._probe is None:
            self._probe = self.rag.probe(self.question, adapter=self.adapter)
        return self._probe

    def set_probe(self, probe: Probe) -> None:
        """A probe computed elsewhere for this question (batched, or read off a label's trace)."""
        self._probe = probe

    def samples(self, n: int, temperature: float, seed: int) -> list[str]:
        key = (int(n), float(temperature), int(seed))
        if key not in self._samples:
            t = time.perf_counter()
            self._samples[key] = self.rag.sample_drafts([self.question], n, temperature, seed)[0]
            self._samples_ms[key] = (time.perf_counter() - t) * 1000
            self.samples_ms += self._samples_ms[key]
        return self._samples[key]

    def samples_cost_ms(self, n: int, temperature: float, seed: int) -> float:
        """What computing these samples took (0 when they were set from outside or not computed)."""
        return self._samples_ms.get((int(n), float(temperature), int(seed)), 0.0)

    def set_samples(self, n: int, temperature: float, seed: int, texts: list[str]) -> None:
        self._samples[(int(n), float(temperature), int(seed))] = list(texts)

    @property
    def probed(self) -> Probe | None:
        return self._probe

    def retrieve(self, k: int) -> list[Hit]:
        bm25, dense = self.rankings()
        ranked = self.rag.index.fuse(bm25, dense, k, self.config.search_mode)
        return self.rag.index.hits([ranked], self._allowed)[0]


class ExpertRAG:
    """The orchestrator: owns the index, the generator, the policy, timings and caches."""

    def __init__(self, index: Index, generator: Generator, policy: Policy, config: PipelineConfig | None = None,
                 policy_name: str | None = None, experts: LiveExperts | None = None,
                 screen: PolicyExpert | None = None, gate_config: GateConfig | None = None,
                 expert_policy: PolicyExpert | None = None):
        """gate_config: what experts' own gates are built with (their learned artifacts default to
        INDEX/gate); expert_policy: the policy expert for questions routed to sensitive experts when `screen`
        is None (default: one without rules, auditing to INDEX/audit.jsonl)."""
        self.index = index
        # domain experts of the index (registry + router), re-read when they change; None: no routing
        self.experts = experts
        self.routing_settings = RoutingSettings()
        self._domain_map: DomainMap | None = None
        self.screen = screen  # the policy expert (experts/policy.py); None = no rules, nothing screened
        self._expert_policy = expert_policy
        self.generator = generator
        # experts' learned gates read the index's gate folder by default, as the pipeline's policy does
        # (pipeline.build.GATE_DIR; build imports this module, so the name is not imported from there)
        self.gates = ExpertGates(experts.registry.dir, gate_config, Path(index.dir) / "gate",
                                 generator.capabilities) if experts is not None else None
        # domain adapters kept on the generator's model; None: no experts, or a backend that cannot take them
        self.adapters = None
        self._adapter_warned: set[tuple[str, int]] = set()
        if experts is not None and generator.capabilities.adapters:
            from expertrag.experts.adapter import bank_for  # torch: only for the native backend

            self.adapters = bank_for(generator)
        elif experts is not None:
            self._warn_adapters(experts.current().snapshot)
        self.policy = policy
        self.policy_name = policy_name or getattr(policy, "name", type(policy).__name__)
        # a policy needing a signal this backend cannot give fails here, naming both, not mid-answer
        check_policy(policy, generator.capabilities, self.policy_name)
        self.config = config or PipelineConfig()
        path = self.config.cache_path
        self.answer_cache = LRUCache(self.config.answer_cache_size, path, "answers") \
            if self.config.answer_cache_size else None
        self.retrieval_cache = LRUCache(self.config.retrieval_cache_size, path, "retrieval") \
            if self.config.retrieval_cache_size else None

    def set_index(self, index: Index) -> None:
        """Answer from another generation of the index from now on (the old one is closed)."""
        old, self.index = self.index, index
        if old is not index:
            old.close()

    # ---- adapters --------------------------------------------------------------------------------------
    def model_as(self, adapter: str | None):
        """The block runs on the base model (None) or with the AdapterBank's adapter `adapter`; with a bank,
        every generation goes through here, holding its lock (the active adapter is shared model state)."""
        return self.adapters.use(adapter) if self.adapters is not None else contextlib.nullcontext()

    def _warn_adapters(self, snapshot: RegistrySnapshot) -> None:
        """Say once per expert (start-up, and each expert added later) that this backend answers without
        its adapter; the answers record `adapter_applied: false` too."""
        why = self._no_adapters_reason()
        for e in snapshot.active:
            if e.adapter is not None and (e.name, e.version) not in self._adapter_warned:
                self._adapter_warned.add((e.name, e.version))
                log.warning("expert %r has a LoRA adapter (%s) but %s: its questions are answered without it",
                            e.name, e.adapter, why)

    def _no_adapters_reason(self) -> str:
        base = getattr(self.generator, "base_adapter", None)  # model.adapter (pipeline/build.py)
        if base is not None:
            return f"the model already carries model.adapter {base!r} (one adapter at a time)"
        return f"the {self.generator.capabilities.backend} backend cannot apply LoRA adapters"

    def _adapter_for(self, expert: ExpertRecord, snapshot: RegistrySnapshot) -> tuple[str | None, str | None]:
        """(AdapterBank key, None), or (None, why not) for an expert with an adapter; (None, None) without."""
        if expert.adapter is None:
            return None, None
        if self.adapters is None:
            self._warn_adapters(snapshot)
            return None, self._no_adapters_reason()
        from expertrag.experts.adapter import AdapterError

        try:
            return self.adapters.load(self.experts.registry.dir / expert.adapter), None
        except AdapterError as e:  # a broken folder is the record's problem: say which record
            raise record_error(expert, snapshot, "adapter", str(e)) from None

    def _sensitive_policy(self) -> PolicyExpert:
        """The policy expert for questions routed to sensitive experts: the screening one when rules are
        configured, else one without rules (audited beside the index)."""
        if self.screen is not None:
            return self.screen
        if self._expert_policy is None:
            from expertrag.experts.audit import AuditLog

            self._expert_policy = PolicyExpert(PolicyConfig(), audit=AuditLog(Path(self.index.dir) / AUDIT_FILE))
        return self._expert_policy

    # ---- the closed-book probe -----------------------------------------------------------------------
    def _probe_layers(self) -> list[int] | None:
        if not self.generator.capabilities.hidden_states:
            return None
        return list(self.config.probe_layers or [self.config.probe_layer])

    def probe(self, question: str, adapter: str | None = None) -> Probe:
        """The closed-book draft, by the base model or with an expert's adapter (its gate's probe)."""
        t = time.perf_counter()
        with self.model_as(adapter):
            g = self.generator.generate(
                closed_book_messages(question), max_new_tokens=self.config.probe_tokens, stop=self.config.stop,
                hidden_layers=self._probe_layers(), return_router=True, router_span=question,
            )
        return _probe_of(g, (time.perf_counter() - t) * 1000)

    def probe_many(self, questions: Sequence[str], *, hidden: bool = True, batch_size: int | None = None
                   ) -> list[Probe]:
        """The probes of several questions, batched where that gives the same probes as `probe` one by one:
        a dense model on a backend that batches (left padding; equal up to float rounding). An MoE model
        shares one router output over a batch and a backend without batching gets one call each.
        `hidden=False` skips the hidden states (a gate that does not read them)."""
        caps = self.generator.capabilities
        layers = self._probe_layers() if hidden else None
        size = batch_size or self.config.probe_batch_size
        if not caps.batched or caps.batch_shares_router or caps.router_stats or size <= 1 or len(questions) <= 1:
            return [self.probe(q) for q in questions]
        out: list[Probe] = []
        for i in range(0, len(questions), size):
            part = list(questions[i:i + size])
            t = time.perf_counter()
            kw = {"hidden_layers": layers} if layers else {}
            with self.model_as(None):  # the base model, under the adapter bank's lock where there is one
                gens = self.generator.generate_batch([closed_book_messages(q) for q in part],
                                                     max_new_tokens=self.config.probe_tokens, stop=self.config.stop,
                                                     **kw)
            ms = (time.perf_counter() - t) * 1000 / len(part)  # each row's share of the batch
            out += [_probe_of(g, ms, keep_draft=False) for g in gens]
        return out

    def sample_drafts(self, questions: Sequence[str], n: int, temperature: float, seed: int,
                      batch_rows: int = 1) -> list[list[str]]:
        with self.model_as(None):  # the base model, under the adapter bank's lock where there is one
            return self._sample_drafts(questions, n, temperature, seed, batch_rows)

    def _sample_drafts(self, questions: Sequence[str], n: int, temperature: float, seed: int,
                       batch_rows: int = 1) -> list[list[str]]:
        """n sampled closed-book drafts (probe_tokens long) per question, seeded: the gate's sample
        consistency. Where the backend batches (dense model), the n copies of a question's prompt are one
        batch, one prompt forward's worth of wall time; `batch_rows` > n packs the copies of several
        questions into one batch (gate training: more rows per forward on CPU). Else n calls with seeds
        seed, seed + 1, ... Reproducible for a fixed backend, batch layout and seed; a question's samples
        depend on its batch's layout (one random stream per batch), not their distribution."""
        caps = self.generator.capabilities
        if not questions or n <= 0:
            return [[] for _ in questions]
        if not (caps.batched and not caps.batch_shares_router and n > 1):
            return [[self.generator.generate(closed_book_messages(q), max_new_tokens=self.config.probe_tokens,
                                             stop=self.config.stop, temperature=temperature, seed=seed + i).text
                     for i in range(n)] for q in questions]
        per = max(1, batch_rows // n)  # questions per batch
        out: list[list[str]] = []
        for i in range(0, len(questions), per):
            part = questions[i:i + per]
            gens = self.generator.generate_batch([closed_book_messages(q) for q in part for _ in range(n)],
                                                 max_new_tokens=self.config.probe_tokens, stop=self.config.stop,
                                                 temperature=temperature, seed=seed)
            out += [[g.text for g in gens[j * n:(j + 1) * n]] for j in range(len(part))]
        return out

    # ---- answering -------------------------------------------------------------------------------------
    def answer(self, question: str, user: User | None = None, metadata: dict[str, Any] | None = None, *,
               policy: Any = None, k: int | None = None, max_new_tokens: int | None = None,
               on_event: Callable[[AnswerEvent], None] | None = None) -> Answer:
        """Answer one question (see `answer_many` for the arguments)."""
        request = AnswerRequest(question, user, metadata, policy=policy, k=k, max_new_tokens=max_new_tokens,
                                on_event=on_event)
        result = self.answer_many([request])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def answer_many(self, requests: Sequence[AnswerRequest]) -> list[Answer | Exception]:
        """Answer several questions, batching their generation where it is exact to do so.

        Each request is gated and retrieved on its own (the gate's probe is per question); the fresh
        generations that follow (open-book answers, closed-book answers without a draft) run as one
        left-padded batch on a dense model (the same tokens as one at a time, up to float rounding). A request's bad input comes back as its `InputError` in place
        of its answer and does not disturb the others."""
        jobs: list[_Job | Answer | Exception] = []
        for req in requests:
            try:
                jobs.append(self._begin(req))
            except InputError as e:
                jobs.append(e)
            else:
                if isinstance(jobs[-1], _Job) and jobs[-1].cancelled():
                    jobs[-1].error = RequestCancelled("the caller went away before generation")
        pending = [b for j in jobs if isinstance(j, _Job) for b in (j.branches or [j]) if j.error is None]
        self._generate(pending)
        out: list[Answer | Exception] = []
        for j in jobs:
            if not isinstance(j, _Job):
                out.append(j)
                continue
            error = j.error or next((b.error for b in j.branches if b.error is not None), None)
            if error is not None:
                out.append(error)
                continue
            answer = self._finish_routed(j) if j.branches else self._finish(
                j.question, j.text, j.token_ids, j.logprobs, j.hits, j.decision, j.timings, j.router,
                j.prompt_tokens, policy_name=j.policy_name, screening=j.screening)
            if j.route is not None and not j.branches:
                answer.routing = self._routing_record(j, [j], None)
                for c in answer.citations:
                    c.expert = j.expert.name
            total = (time.perf_counter() - j.started) * 1000
            answer.timings.total_ms = total
            answer.timings.other_ms = max(total - answer.timings.parts_ms(), 0.0)
            if self.answer_cache is not None and j.cache_key is not None:
                self.answer_cache.put(j.cache_key, answer.to_dict())
            if j.holds_tokens and j.on_event is not None:
                j.on_event(AnswerEvent("token", {"text": answer.text}))
            j.emit(AnswerEvent("answer", {"answer": answer}))
            out.append(answer)
        return out

    @staticmethod
    def filters_for(user: User | None) -> Filters:
        """The retrieval filter of a caller. Fail closed: no user = public passages only; every passage
        needs the explicit administrator switch `User(..., all_groups=True)`."""
        if user is None:
            return Filters()
        return Filters(groups=tuple(user.groups), all_groups=user.all_groups)

    def _begin(self, req: AnswerRequest) -> _Job | Answer:
        """Everything before generation: validate, answer cache, gate decision, retrieval, the prompt."""
        started = time.perf_counter()
        cfg = self.config
        overrides = {name: v for name, v in (("k", req.k), ("max_new_tokens", req.max_new_tokens)) if v is not None}
        if overrides:
            cfg = PipelineConfig.model_validate({**cfg.model_dump(), **overrides})
        policy = req.policy if req.policy is not None else self.policy
        policy_name = self.policy_name if req.policy is None else getattr(policy, "name", type(policy).__name__)
        if req.policy is not None:
            check_policy(policy, self.generator.capabilities, policy_name)
        q = validate_question(req.question, cfg.max_query_chars)
        # The policy expert screens before anything else sees the question (caches included): a refused
        # question ends here, and from here on `q` is the redacted question only.
        screening = self.screen.screen(q, user=req.user.name if req.user else None) if self.screen else None
        if screening is not None and screening.action == "refuse":
            return self._refusal(screening, started, req.on_event)
        if screening is not None:
            q = screening.text
        filters = self.filters_for(req.user)
        state = self.experts.current() if self.experts is not None else None
        if state is not None and not state.routing:
            state = None  # no domain expert: answer exactly as without a registry
        key = None
        if self.answer_cache is not None and req.metadata is None:
            rules = [self.screen.fingerprint] if self.screen is not None else []  # keys unchanged without rules
            key = cache_key(q, self.index.version, policy_name, cfg.model_dump(), filters.access_key(),
                            *([state.key] if state is not None else []), *rules)
            cached = self.answer_cache.get(key)
            if cached is not None:
                answer = Answer.from_dict(cached)
                ms = (time.perf_counter() - started) * 1000
                answer.timings = Timings(other_ms=ms, total_ms=ms, cache="answer")
                routed_to = [m["rule"].split(":", 1)[1] for m in answer.policy.get("matches", [])
                             if m.get("kind") == "expert"]
                if routed_to:  # audited each time it is asked, as the rules' matches are (screen above)
                    self._sensitive_policy().escalate(screening, q, routed_to, original=req.question,
                                                      user=req.user.name if req.user else None)
                if req.on_event is not None:
                    req.on_event(AnswerEvent("decision", {"gate": answer.gate}))
                    if answer.retrieved:
                        req.on_event(AnswerEvent("passages", {"passages": answer.passages}))
                    req.on_event(AnswerEvent("token", {"text": answer.text}))
                    req.on_event(AnswerEvent("answer", {"answer": answer}))
                return answer

        ctx = PipelineGateContext(self, q, dict(req.metadata or {}), filters, cfg,
                                  embedding=screening.embedding if screening is not None else None)
        t = time.perf_counter()
        chosen = self._route(ctx, state, req.user) if state is not None else None
        sensitive = [e.name for e, _ in chosen.experts if e.sensitive] if chosen is not None else []
        if sensitive:
            # a sensitive expert's questions go through the policy expert even when no rule matched them
            screening = self._sensitive_policy().escalate(screening, q, sensitive, original=req.question,
                                                           user=req.user.name if req.user else None)
            if screening.action == "refuse":
                return self._refusal(screening, started, req.on_event)
        forced = None
        if screening is not None and screening.action == "cite_only":
            # an answer that may only stand with citations needs passages: the gate is not asked
            forced = Decision(retrieve=True, score=1.0, stage="policy", policy="policy-expert")
        plans: list[_Plan] = []
        if chosen is not None:
            plans = self._plan(ctx, chosen, state, cfg, filters, policy, policy_name, forced)
            decision = plans[0].decision
            if len(plans) > 1 and any(p.decision.retrieve != decision.retrieve for p in plans):
                # the answer retrieved when any of its experts did (each expert's own decision: routing)
                decision = replace(decision, retrieve=True)
        else:
            decision = forced or policy.decide(ctx)
        decide_ms = (time.perf_counter() - t) * 1000  # routing + the gate(s)
        contexts = [ctx, *(p.ctx for p in plans if p.ctx is not None)]
        probe = ctx.probed
        probe_ms = sum(c.probed.ms for c in contexts if c.probed is not None)
        ranked_for_gate_ms = sum(c.retrieval_ms for c in contexts)  # index lookups the router and gates triggered
        job = _Job(question=q, config=cfg, decision=decision, policy_name=policy_name, started=started,
                   cache_key=key, on_event=req.on_event, is_cancelled=req.cancelled, screening=screening,
                   timings=Timings(gate_ms=max(decide_ms - probe_ms - ranked_for_gate_ms, 0.0), probe_ms=probe_ms),
                   route=chosen, state=state)
        gate_event = {"decision": "retrieve" if decision.retrieve else "no_retrieve", "score": decision.score,
                      "stage": decision.stage, "policy": policy_name}
        if chosen is not None:
            job.expert, job.weight = chosen.experts[0]
            gate_event["experts"] = [{"expert": p.expert.name, **p.to_dict()} for p in plans]
        job.emit(AnswerEvent("decision", {"gate": gate_event}))
        if chosen is not None:
            t = time.perf_counter()
            self._prepare_routed(job, ctx, filters, plans)
            if decision.retrieve:
                job.timings.retrieval_ms = (time.perf_counter() - t) * 1000 + ranked_for_gate_ms
                job.emit(AnswerEvent("passages", {"passages": [
                    {**h.to_dict(), "expert": b.expert.name} for b in (job.branches or [job]) for h in b.hits]}))
            else:
                job.timings.gate_ms += ranked_for_gate_ms  # query features were gate work, not retrieval
        elif decision.retrieve:
            t = time.perf_counter()
            job.hits, cached = self._retrieve(ctx, q, filters, cfg)
            if cached:
                job.timings.cache = "retrieval"
            # the lookups the gate already paid for are retrieval work too (its rankings are reused)
            job.timings.retrieval_ms = (time.perf_counter() - t) * 1000 + ranked_for_gate_ms
            job.emit(AnswerEvent("passages", {"passages": [h.to_dict() for h in job.hits]}))
            job.messages, job.memory = self.open_book_inputs(q, job.hits, cfg)
        else:
            job.timings.gate_ms += ranked_for_gate_ms  # query features were gate work, not retrieval
            if probe is not None:
                job.draft = probe.draft
            else:
                job.messages = closed_book_messages(q)
        return job

    # ---- domain experts ------------------------------------------------------------------------------
    def _route(self, ctx: PipelineGateContext, state: ExpertState, user: User | None) -> Route:
        """Pick the expert(s) for this question. The fast layer reads the query embedding (computed
        once: the gate and dense retrieval use the same vector); the refining layer reads the domains of
        the top hits of the caller's global ranking, which the gate's query features compute anyway."""
        if self._domain_map is None or self._domain_map.generation != self.index.generation:
            self._domain_map = DomainMap(self.index)
        return route_question(self.index, self._domain_map, ctx, state, user, self.routing_settings)

    def _plan(self, ctx: PipelineGateContext, chosen: Route, state: ExpertState, cfg: PipelineConfig,
              filters: Filters, policy: Any, policy_name: str, forced: Decision | None) -> list[_Plan]:
        """Each chosen expert's settings, adapter and retrieval decision. An expert without its own gate
        takes the pipeline policy's decision on the question's context (decided once for all of them:
        without expert gates this is exactly the unrouted decision); one with a gate decides on its own
        context: its domain's partition, and a probe drafted with its adapter."""
        plans, shared = [], None
        for e, w in chosen.experts:
            ecfg = _expert_config(cfg, e)
            own = self.gates.policy(e, state.snapshot) if self.gates is not None else None
            adapter, note = self._adapter_for(e, state.snapshot)
            plan = _Plan(expert=e, weight=w, config=ecfg, decision=forced, adapter=adapter, adapter_note=note,
                         gate="policy-expert" if forced is not None else e.gate or policy_name)
            if forced is None and own is None:
                if shared is None:
                    shared = policy.decide(ctx)
                plan.decision = shared
            elif forced is None:
                plan.ctx = self._expert_context(ctx, e, ecfg, filters, chosen.scope, adapter)
                plan.decision = own.decide(plan.ctx)
            plans.append(plan)
        return plans

    def _expert_context(self, ctx: PipelineGateContext, expert: ExpertRecord, cfg: PipelineConfig,
                        filters: Filters, scope: str, adapter: str | None) -> PipelineGateContext:
        """The gate context of one expert: what its retrieval would search (its domain; the caller's global
        ranking for the general expert or a "boost" route, shared with the question's context), the question's
        one embedding, and probes drafted with the expert's adapter."""
        if expert.domain is None or scope == "boost":
            f = filters
        else:
            f = Filters(domains=(expert.domain,), groups=filters.groups, all_groups=filters.all_groups)
        ectx = PipelineGateContext(self, ctx.question, ctx.metadata, f, cfg, embedding=ctx.query_embedding())
        cand = self.index.config.candidates
        if f is filters and max(cfg.k, cand) <= max(ctx.config.k, cand):
            ectx._rankings, ectx._allowed = ctx.rankings(), ctx._allowed  # the same search: not run twice
            ectx._features = ctx._features
        ectx.adapter = adapter
        return ectx

    def _prepare_routed(self, job: _Job, ctx: PipelineGateContext, filters: Filters, plans: list[_Plan]) -> None:
        """Each chosen expert that retrieves does so from its own domain (inside the caller's access), with
        its own k and mode; one that skips answers closed-book (continuing the probe's draft when it was
        drafted with that expert's adapter). Several experts: one branch job each, generated separately and
        fused at the end."""
        if len(plans) > 1 and all(p.ctx is None and p.adapter is None and not p.decision.retrieve for p in plans):
            plans = plans[:1]  # nobody retrieves, none has its own gate or adapter: one closed-book answer
        jobs = [job] if len(plans) == 1 else [
            _Job(question=job.question, config=job.config, decision=p.decision, policy_name=job.policy_name,
                 started=job.started, timings=Timings(), is_cancelled=job.is_cancelled, route=job.route,
                 state=job.state, expert=p.expert, weight=p.weight) for p in plans]
        cached_any = False
        for b, p in zip(jobs, plans, strict=True):
            cfg = b.config = p.config
            b.plan, b.adapter = p, p.adapter
            if not p.decision.retrieve:
                pctx = p.ctx or ctx
                if len(jobs) == 1 and pctx.probed is not None and pctx.adapter == b.adapter:
                    b.draft = pctx.probed.draft
                else:
                    b.messages = self._with_prompt(closed_book_messages(job.question), b.expert)
                continue
            domain = b.expert.domain
            if domain is not None and job.route.scope == "boost" and cfg.search_mode == "hybrid":
                # the caller's global ranking (the gate's), in-domain hits lifted by the route's confidence
                b.hits = self._boosted_hits(ctx, domain, job.state.router.domain_boost * job.route.confidence,
                                            cfg.k)
            else:
                if p.ctx is not None and (domain is None or job.route.scope != "boost"):
                    ectx, f = p.ctx, p.ctx.filters  # what the expert's gate already ranked
                elif domain is None and cfg is job.config:
                    ectx, f = ctx, filters  # the general expert: what the gate already ranked
                else:
                    f = Filters(domains=(domain,) if domain is not None else None,
                                groups=filters.groups, all_groups=filters.all_groups)
                    ectx = PipelineGateContext(self, job.question, ctx.metadata, f, cfg)
                    ectx._embedding = ctx.query_embedding()  # one embedding per question, whatever the experts
                b.hits, cached = self._retrieve(ectx, job.question, f, cfg)
                cached_any = cached_any or cached
            messages, b.memory = self.open_book_inputs(job.question, b.hits, cfg)
            b.messages = self._with_prompt(messages, b.expert)
        if cached_any:
            job.timings.cache = "retrieval"
        if len(jobs) > 1:
            job.branches = jobs

    def _boosted_hits(self, ctx: PipelineGateContext, domain: str, boost: float, k: int) -> list[Hit]:
        bm25, dense = ctx.rankings()
        ranked = self.index.fuse(bm25, dense, max(k, self.index.config.candidates), "hybrid")
        doms = self._domain_map.domains([r for r, _ in ranked])
        order = boost_order(np.array([sc for _, sc in ranked]), doms, domain, boost)
        return self.index.hits([[ranked[j] for j in order[:k]]], ctx._allowed)[0]

    @staticmethod
    def _with_prompt(messages: list[dict[str, str]], expert: ExpertRecord | None) -> list[dict[str, str]]:
        """The expert's system prompt goes before the pipeline's own instructions (kept: they define the
        answer format and citation markers the rest of the pipeline relies on)."""
        if expert is None or not expert.system_prompt or not messages or messages[0]["role"] != "system":
            return messages
        return [{"role": "system", "content": f"{expert.system_prompt}\n{messages[0]['content']}"}, *messages[1:]]

    def _routing_record(self, job: _Job, branches: Sequence[_Job], contributions: list[dict] | None
                        ) -> dict[str, Any]:
        r = job.route
        out = {"registry_version": job.state.snapshot.version,
               "router": job.state.router.digest[:12] if job.state.router is not None else None, **r.to_dict()}
        if contributions is None:
            contributions = [{"expert": b.expert.name, "weight": round(b.weight, 4), "chosen": True}
                             for b in branches]
        for c, b in zip(contributions, branches, strict=True):
            c["passage_ids"] = [h.id for h in b.hits]
            if b.plan is not None:  # each expert's own retrieval decision and whether its adapter ran
                c.update(b.plan.to_dict())
        out["contributions"] = contributions
        out["adapter_applied"] = any(b.adapter is not None for b in branches)
        out["fusion"] = "single" if len(branches) == 1 else None
        return out

    def _finish_routed(self, job: _Job) -> Answer:
        """Several experts answered: finish each on its own evidence, fuse, and cite each passage as the
        expert that supplied it (markers renumbered over the answer's concatenated passage list)."""
        parts = [self._finish(job.question, b.text, b.token_ids, b.logprobs, b.hits, b.decision, b.timings,
                              b.router, b.prompt_tokens, policy_name=job.policy_name, screening=job.screening)
                 for b in job.branches]
        cands = [ExpertCandidate(
            expert=b.expert.name, weight=b.weight, text=a.generated, confidence=a.confidence, abstained=a.abstained,
            supported=sum(supports(f"{h.title} {h.contents}", a.generated, job.question) for h in b.hits),
            passages=len(b.hits), citations=a.citations) for a, b in zip(parts, job.branches, strict=True)]
        fused = fuse(cands)
        answer = parts[fused.chosen]
        offsets, passages, n = [], [], 0
        for b in job.branches:
            offsets.append(n)
            passages += [h.to_dict() for h in b.hits]
            n += len(b.hits)
        citations = []
        for i in ([fused.chosen] + [i for i in fused.agreeing if i != fused.chosen]):
            for c in parts[i].citations:
                citations.append(Citation(id=c.id, title=c.title, marker=c.marker + offsets[i],
                                          expert=cands[i].expert))
        answer.citations = [] if answer.abstained else citations
        answer.passages = passages
        answer.retrieved = job.decision.retrieve  # any expert retrieved (each one's decision: routing)
        answer.gate = {**answer.gate, "decision": "retrieve" if job.decision.retrieve else "no_retrieve"}
        t = job.timings
        t.generation_ms = sum(b.timings.generation_ms for b in job.branches)
        answer.timings = t
        answer.tokens = {"prompt": sum(a.tokens["prompt"] for a in parts),
                         "generated": sum(a.tokens["generated"] for a in parts)}
        answer.routing = self._routing_record(job, job.branches, fused.describe(cands))
        answer.routing["fusion"] = fused.mode
        job.emit(AnswerEvent("token", {"text": answer.text}))  # branches do not stream: the fused text
        return answer

    def _refusal(self, screening: Screening, started: float,
                 on_event: Callable[[AnswerEvent], None] | None) -> Answer:
        """The answer to a question the policy expert refuses: nothing retrieved, nothing generated."""
        ms = (time.perf_counter() - started) * 1000
        gate = {"decision": "refused", "score": 1.0, "stage": "policy", "policy": "policy-expert"}
        text = self._sensitive_policy().config.refusal_text  # the screening policy expert, when there is one
        answer = Answer(question=screening.text, text=f"{text} ({screening.reason})", retrieved=False,
                        abstained=True, gate=gate, timings=Timings(other_ms=ms, total_ms=ms),
                        needs_review=True, policy=screening.to_dict())
        if on_event is not None:
            on_event(AnswerEvent("decision", {"gate": gate}))
            on_event(AnswerEvent("token", {"text": answer.text}))
            on_event(AnswerEvent("answer", {"answer": answer}))
        return answer

    def _generate(self, jobs: Sequence[_Job]) -> None:
        """Generate for every job: continuations of drafts one by one, fresh prompts batched."""
        jobs = [j for j in jobs if j.error is None]
        # Our MoE shares one router output over a batch (MoEAux sums over rows) and a passage memory layout is
        # per call, so only memory-free prompts of a backend with per-row router outputs batch.
        caps = self.generator.capabilities
        can_batch = caps.batched and not caps.batch_shares_router
        groups: dict[int, list[_Job]] = {}
        singles: list[list[_Job]] = []
        for j in jobs:
            if can_batch and j.draft is None and j.memory is None:
                # one batch runs under one adapter: jobs of different experts' adapters do not share one
                groups.setdefault((j.config.max_new_tokens, j.adapter), []).append(j)
            else:
                singles.append([j])
        for group in [*groups.values(), *singles]:
            try:
                if group[0].draft is not None:
                    self._continue_draft(group[0])
                else:
                    self._generate_fresh(group)
            except _Cancelled:
                for j in group:
                    j.error = RequestCancelled("the caller went away; decoding stopped")

    def _generate_fresh(self, group: Sequence[_Job]) -> None:
        with self.model_as(group[0].adapter):
            self._generate_fresh_as(group)

    def _generate_fresh_as(self, group: Sequence[_Job]) -> None:
        cfg = group[0].config
        t = time.perf_counter()

        on_token = self._token_sink(group)
        if len(group) == 1:
            j = group[0]
            gens = [self.generator.generate(j.messages, max_new_tokens=cfg.max_new_tokens, stop=cfg.stop,
                                            passages=j.memory, return_router=True,
                                            on_token=on_token)]
        else:
            gens = self.generator.generate_batch([j.messages for j in group], max_new_tokens=cfg.max_new_tokens,
                                                 stop=cfg.stop, return_router=True,
                                                 on_token=on_token)
        ms = (time.perf_counter() - t) * 1000  # each row waited for the whole batch
        for j, g in zip(group, gens, strict=True):
            j.timings.generation_ms = ms
            j.token_ids, j.logprobs, j.text = list(g.token_ids), list(g.logprobs), g.text
            j.router, j.prompt_tokens = g.router_stats, g.prompt_tokens

    @staticmethod
    def _token_sink(group: Sequence[_Job]) -> Callable[[TokenEvent], None] | None:
        """The token callback of one generate call over `group` (row i is group[i]): streams each row's
        text to its caller and stops decoding once every caller has gone; None when nobody streams."""
        if not any(j.on_event is not None for j in group):
            return None

        def on_token(ev: TokenEvent) -> None:
            if all(j.cancelled() for j in group):
                raise _Cancelled
            if ev.text:
                group[ev.row].emit(AnswerEvent("token", {"text": ev.text}))
        return on_token

    def _continue_draft(self, j: _Job) -> None:
        """Continue the probe's draft from its KV cache: nothing recomputed. The draft's own time stays in
        probe_ms, so the parts of Timings partition the total."""
        t = time.perf_counter()
        first = j.draft
        j.token_ids, j.logprobs, j.text = list(first.token_ids), list(first.logprobs), first.text
        if first.text:
            j.emit(AnswerEvent("token", {"text": first.text}))
        rest_budget = j.config.max_new_tokens - len(first.token_ids)
        if first.finish_reason == "length" and rest_budget > 0:
            with self.model_as(j.adapter):  # the draft's KV cache was computed with this adapter (or none)
                more = self.generator.generate(None, state=first.state, max_new_tokens=rest_budget,
                                               stop=j.config.stop, on_token=self._token_sink([j]))
            j.token_ids += list(more.token_ids)
            j.logprobs += list(more.logprobs)
            j.text = first.text + more.text  # byte-level BPE: pieces decode independently
        j.router, j.prompt_tokens = first.router_stats, first.prompt_tokens
        j.timings.generation_ms = (time.perf_counter() - t) * 1000

    def _retrieve(self, ctx: PipelineGateContext, q: str, filters: Filters, cfg: PipelineConfig
                  ) -> tuple[list[Hit], bool]:
        """The k hits for `q`, and whether they came from the retrieval cache (keyed by the caller's
        groups: hits computed for one group are never served to another)."""
        key = cache_key(q, self.index.version, cfg.k, cfg.search_mode, filters.access_key(),
                        *([list(filters.domains)] if filters.domains is not None else []))
        if self.retrieval_cache is not None:
            cached = self.retrieval_cache.get(key)
            if cached is not None:
                return [Hit(**h) for h in cached], True
        hits = ctx.retrieve(cfg.k)
        if self.retrieval_cache is not None:
            self.retrieval_cache.put(key, [h.to_dict() for h in hits])
        return hits, False

    def open_book_inputs(self, question: str, hits: Sequence[Hit], cfg: PipelineConfig | None = None):
        """(prompt messages, retrieval-expert memory or None) of an open-book answer under `cfg.fusion`:
        concat = passages in the prompt only; expert = the closed-book prompt, passages only in the memory;
        both = both. A model without a retrieval expert always gets concat (it has no memory to read)."""
        cfg = cfg or self.config
        expert = has_retrieval_expert(self.generator)
        messages = (closed_book_messages(question) if cfg.fusion == "expert" and expert
                    else open_book_messages(question, hits, cfg.passage_max_chars))
        if cfg.fusion == "concat" or not hits or not expert:
            return messages, None
        return messages, self.generator.encode_passages([memory_text(hits)])

    def _finish(self, q: str, text: str, token_ids: list[int], logprobs: list[float], hits: list[Hit],
                decision: Decision, timings: Timings, router: RouterStats | None, prompt_tokens: int, *,
                policy_name: str | None = None, screening: Screening | None = None) -> Answer:
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
        if screening is not None and screening.action == "cite_only" and not cited:
            abstained = True  # the policy expert's cite_only: no citation, no answer
        flagged = screening is not None and screening.flagged
        return Answer(
            question=q, text=ABSTAIN_TEXT if abstained else clean, retrieved=decision.retrieve,
            citations=[] if abstained else cited, confidence=confidence, abstained=abstained,
            gate={"decision": "retrieve" if decision.retrieve else "no_retrieve", "score": decision.score,
                  "stage": decision.stage, "policy": policy_name or self.policy_name, "features": decision.features},
            timings=timings, tokens={"prompt": int(prompt_tokens), "generated": len(token_ids)},
            experts=expert_usage(router), passages=[h.to_dict() for h in hits], generated=clean,
            token_ids=list(token_ids), logprobs=[float(x) for x in logprobs],
            needs_review=flagged, policy=screening.to_dict() if flagged else {},
        )


def route_question(index: Index, dmap: DomainMap, ctx: PipelineGateContext, state: ExpertState,
                   user: User | None, settings: RoutingSettings) -> Route:
    """The two-layer route of one question (`ExpertRAG._route`), also what `serve --ray`'s ingress computes
    to pick the expert deployment that answers: the same code, so both pick the same expert."""

    def hit_domains() -> list[str | None]:
        bm25, dense = ctx.rankings()
        return dmap.domains([r for r, _ in index.fuse(bm25, dense, settings.depth, "hybrid")])

    groups, all_groups = (tuple(user.groups), user.all_groups) if user is not None else ((), False)
    embedding = ctx.query_embedding() if state.router is not None else None
    return route(state.snapshot, state.router, embedding, groups=groups, all_groups=all_groups,
                 metadata=ctx.metadata, hit_domains=hit_domains, settings=settings)


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


def has_retrieval_expert(generator: Generator) -> bool:
    return generator.capabilities.passage_memory


def _expert_config(cfg: PipelineConfig, expert: ExpertRecord | None) -> PipelineConfig:
    """The question's config with the expert's retrieval settings (the same object when it has none)."""
    if expert is None or (expert.k is None and expert.mode is None):
        return cfg
    update = {n: v for n, v in (("k", expert.k), ("search_mode", expert.mode)) if v is not None}
    return cfg.model_copy(update=update)


def _router_summary(stats: RouterStats | None) -> dict[str, float | None] | None:
    if stats is None:
        return None
    return {"retrieval_affinity": stats.mean_retrieval_affinity, "router_entropy": stats.mean_entropy,
            "router_agreement": stats.top_expert_agreement}


def _probe_of(g: Any, ms: float, keep_draft: bool = True) -> Probe:
    """A generation of the closed-book prompt as the gate's Probe. Router statistics: `router_stats` as the
    backend counts them (Probe doc); the question-only ones from `question_router_stats`, or from
    `router_stats` itself where the backend already counted only the question (span "question")."""
    stats = g.router_stats
    q_stats = g.question_router_stats or (stats if stats is not None and stats.span == "question" else None)
    return Probe(
        text=g.text, token_ids=list(g.token_ids), logprobs=list(g.logprobs), entropies=list(g.entropies),
        hidden=_as_vector(g.hidden),
        retrieval_affinity=stats.mean_retrieval_affinity if stats else None,
        router_entropy=stats.mean_entropy if stats else None,
        router_agreement=stats.top_expert_agreement if stats else None,
        question_router=_router_summary(q_stats),
        draft=g if keep_draft else None, ms=ms,
    )


def _as_vector(hidden: Any) -> np.ndarray | None:
    """A backend's hidden state (tensor or array) as one flat float32 vector."""
    if hidden is None:
        return None
    if hasattr(hidden, "detach"):  # a torch tensor (bf16 has no numpy dtype: go through float32)
        hidden = hidden.detach().float().cpu().numpy()
    return np.asarray(hidden, dtype=np.float32).reshape(-1)


def expert_usage(router: RouterStats | None) -> dict[str, Any]:
    """Per MoE layer: share of token-slots per expert; and the retrieval expert's mean share."""
    if router is None:
        return {"layers": {}, "retrieval_expert_share": None}
    layers = {str(i): [round(s, 4) for s in share] for i, share in router.usage.items()}
    shares = [router.usage[i][-1] for i, s in router.layers.items() if s.retrieval_affinity is not None
              and i in router.usage]
    return {"layers": layers, "retrieval_expert_share": float(np.mean(shares)) if shares else None}
