"""The service core: who may ask, what they may see, and the work behind each endpoint. No HTTP here.

Three single-thread workers own what is not thread-safe: the answer engine (model + pipeline + its
index), a search worker (its own `Index`) and an ingest worker (index builds, one at a time). After a build
commits, the others reopen the index between requests, so every request reads one committed generation.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from expertrag.data.config import ChunkingConfig
from expertrag.data.types import Document
from expertrag.errors import ExpertRAGError, InputError
from expertrag.gate.policies import POLICIES, make_policy
from expertrag.pipeline.answer import User
from expertrag.pipeline.build import PipelineSettings, gate_dir, load_generator, wire_pipeline
from expertrag.pipeline.rag import AnswerRequest, ExpertRAG, validate_question
from expertrag.retrieval.builder import BuildReport, build_index
from expertrag.retrieval.index import Index
from expertrag.retrieval.types import MODES, Filters
from expertrag.serve.config import ServeConfig
from expertrag.serve.engine import AnswerEngine, Ticket
from expertrag.serve.keys import KeyStore, Principal, keys_path
from expertrag.serve.metrics import Metrics
from expertrag.serve.ratelimit import RateLimiter


class ServiceSettings(PipelineSettings, Protocol):
    chunking: ChunkingConfig
    serve: ServeConfig


class Unauthorized(ExpertRAGError):
    """No key, an unknown key or a revoked key (HTTP 401)."""


class Forbidden(ExpertRAGError):
    """A valid key without the right (HTTP 403): ingest, delete and key management need an admin key."""


class NotFound(ExpertRAGError):
    """Nothing the caller may see by that id (HTTP 404; also for what exists but is not theirs)."""


@dataclass
class DocumentView:
    id: str
    title: str
    passages: list[dict[str, Any]]


def open_index(index_dir: Path, settings: PipelineSettings) -> Index:
    """An index with every part loaded now, so later builds removing old generation files cannot hurt it.

    Not re-verified: the service checksums the index once at start, and every later generation is one its
    own ingest worker has just written and checksummed."""
    index = Index(index_dir, settings.retrieval, verify=False)
    _ = index.bm25, index.dense, index.embedder
    return index


class Service:
    def __init__(self, index_dir: str | Path, settings: ServiceSettings, *, generator: Any = None,
                 engine: Any = None):
        """`engine(service)`, when given, makes the answer engine instead of the in-process AnswerEngine
        (serve/ray_serve.py: answers from Ray Serve pipeline replicas)."""
        self.index_dir = Path(index_dir)
        self.settings = settings
        self.cfg: ServeConfig = settings.serve
        probe = Index(self.index_dir, settings.retrieval)  # fail now, clearly, on a missing or damaged index
        self.generation = probe.generation
        probe.close()
        self.keys = KeyStore(keys_path(self.index_dir, self.cfg.keys_file))
        self.limiter = RateLimiter(self.cfg.rate_limit_per_minute, self.cfg.rate_limit_burst)
        self.metrics = Metrics(self.cfg.recent_latencies)
        self.default_policy = settings.gate.policy
        self._policies: dict[str, Any] = {}
        self._policy_lock = threading.Lock()
        self.policy(self.default_policy)  # the default policy's artifacts must load before serving
        self._generator = generator
        self.engine = engine(self) if engine is not None else AnswerEngine(
            self._make_rag, queue_size=self.cfg.queue_size, batch_max=self.cfg.batch_max,
            batch_wait_ms=self.cfg.batch_wait_ms, on_batch=self.metrics.batch_size.observe,
            on_depth=self.metrics.queue_depth.set, on_cancelled=self.metrics.cancelled.inc)
        self._search = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="expertrag-search")
        self._ingest = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="expertrag-ingest")
        self._search_index: Index | None = None
        self.draining = False
        self.in_flight = 0  # requests being served (the event loop's thread only)

    # ---- life --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()

    def _make_rag(self) -> ExpertRAG:
        index = open_index(self.index_dir, self.settings)
        self.generation = index.generation
        generator = self._generator if self._generator is not None else load_generator(self.settings)
        self._tokenizer = getattr(generator, "tokenizer", None)
        # the index's domain experts (re-read when `expert add/retire` or `train router` changes them), their
        # gates and adapters, and the policy expert of the config's rules, as `expertrag ask` builds them
        return wire_pipeline(index, self.index_dir, generator, self.policy(self.default_policy),
                             self.default_policy, self.settings)

    def token_pieces(self, token_ids: list[int]) -> list[str]:
        """Each generated token's text (for chat `logprobs`); "" where the backend has no tokenizer."""
        tok = getattr(self, "_tokenizer", None)
        if tok is None:
            return ["" for _ in token_ids]
        return [tok.decode([t]) if t >= 0 else "" for t in token_ids]

    @property
    def ready(self) -> bool:
        return self.engine.ready.is_set() and self.engine.error is None

    def close(self) -> None:
        self.engine.stop()
        self._search.shutdown(wait=True)
        self._ingest.shutdown(wait=True)

    # ---- who asks -----------------------------------------------------------------------------------
    def authenticate(self, key: str | None) -> Principal:
        principal = self.keys.lookup(key)
        if principal is None:
            raise Unauthorized("a valid API key is required (Authorization: Bearer KEY)" if not key
                               else "unknown or revoked API key")
        return principal

    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.admin:
            raise Forbidden("this needs an admin key")

    @staticmethod
    def user_of(principal: Principal) -> User:
        """The pipeline's user: an admin key is the explicit all-groups switch; everyone else sees public
        passages and those of their own groups."""
        if principal.admin:
            return User(principal.name, (), all_groups=True)
        return User(principal.name, tuple(principal.groups))

    @staticmethod
    def filters_of(principal: Principal) -> Filters:
        return Filters(all_groups=True) if principal.admin else Filters(groups=tuple(principal.groups))

    def policy(self, name: str) -> Any:
        if name not in POLICIES:
            raise InputError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}", field="policy")
        with self._policy_lock:
            if name not in self._policies:
                try:
                    self._policies[name] = make_policy(name, self.settings.gate, gate_dir(self.index_dir))
                except ExpertRAGError as e:
                    raise InputError(f"policy {name!r} is not available on this index: {e}", field="policy") from None
            return self._policies[name]

    # ---- answers ------------------------------------------------------------------------------------
    def submit_answer(self, principal: Principal, question: str, *, policy: str | None = None,
                      k: int | None = None, max_tokens: int | None = None, on_event: Any = None) -> Ticket:
        if k is not None and not 1 <= k <= self.cfg.max_k:
            raise InputError(f"must be between 1 and {self.cfg.max_k}", field="k")
        if max_tokens is not None and not 1 <= max_tokens <= self.cfg.max_tokens_cap:
            raise InputError(f"must be between 1 and {self.cfg.max_tokens_cap}", field="max_tokens")
        try:
            question = validate_question(question, self.settings.pipeline.max_query_chars)
        except InputError as e:
            raise InputError(e.reason, field="question") from None
        pol = self.policy(policy) if policy else None
        request = AnswerRequest(question, self.user_of(principal), policy=pol, k=k, max_new_tokens=max_tokens,
                                on_event=on_event)
        return self.engine.submit(request)

    # ---- search and documents ---------------------------------------------------------------------
    def _on_search_thread(self, fn):
        def run():
            if self._search_index is None or self._search_index.generation != self.generation:
                if self._search_index is not None:
                    self._search_index.close()
                self._search_index = open_index(self.index_dir, self.settings)
            return fn(self._search_index)
        return self._search.submit(run)

    def search(self, principal: Principal, query: str, k: int, mode: str) -> concurrent.futures.Future:
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}", field="mode")
        if not 1 <= k <= self.cfg.max_k:
            raise InputError(f"must be between 1 and {self.cfg.max_k}", field="k")
        if not query.strip():
            raise InputError("is empty", field="query")
        filters = self.filters_of(principal)
        return self._on_search_thread(lambda index: index.search(query, k, mode, filters))

    def document(self, principal: Principal, doc_id: str) -> concurrent.futures.Future:
        filters = self.filters_of(principal)

        def fetch(index: Index) -> DocumentView:
            passages = index.document_passages(doc_id, filters)
            if not passages:
                raise NotFound(f"no document {doc_id!r}")
            return DocumentView(doc_id, passages[0].title, [h.to_dict() for h in passages])
        return self._on_search_thread(fetch)

    def add_documents(self, principal: Principal, documents: list[Document]) -> concurrent.futures.Future:
        self.require_admin(principal)
        return self._ingest.submit(self._build, documents, ())

    def delete_document(self, principal: Principal, doc_id: str) -> concurrent.futures.Future:
        self.require_admin(principal)
        return self._ingest.submit(self._build, [], (doc_id,))

    def _build(self, documents: list[Document], delete_ids: tuple[str, ...]) -> BuildReport:
        report = build_index(self.index_dir, documents, retrieval=self.settings.retrieval,
                             chunking=self.settings.chunking, delete_ids=delete_ids, progress=False)
        if delete_ids and report.missing_deletes:
            raise NotFound(f"no document {report.missing_deletes[0]!r}")
        self.generation = report.generation
        # the model thread swaps in the new generation between batches; wait so the caller reads its write
        self.engine.call(lambda rag: rag.set_index(open_index(self.index_dir, self.settings))).result()
        return report
