"""The answer engine: one thread owns the model and the pipeline; requests reach it through a bounded queue.

The event loop never runs torch. Answers that arrive together are taken as one batch (up to `batch_max`,
waiting at most `batch_wait_ms` for it to fill) and answered by `ExpertRAG.answer_many`, which batches
their generation. Control work (swapping in a new index generation) runs on the same thread between
batches, so a question never sees two generations.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from expertrag.errors import ExpertRAGError
from expertrag.pipeline.rag import AnswerRequest, ExpertRAG, RequestCancelled

log = logging.getLogger("expertrag.serve")


class QueueFull(ExpertRAGError):
    """The engine's queue is full: the caller should try again later (HTTP 503)."""


@dataclass
class Ticket:
    """A request in the engine. `cancel()` when its caller goes away; `future` resolves to the Answer."""

    request: AnswerRequest
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Control:
    fn: Callable[[ExpertRAG], Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


_STOP = object()


class AnswerEngine:
    def __init__(self, make_rag: Callable[[], ExpertRAG], *, queue_size: int, batch_max: int,
                 batch_wait_ms: float, on_batch: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None, on_cancelled: Callable[[], None] | None = None):
        self._make_rag = make_rag
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._control: queue.Queue = queue.Queue()
        self.batch_max, self.batch_wait = batch_max, batch_wait_ms / 1000
        self._on_batch, self._on_depth, self._on_cancelled = on_batch, on_depth, on_cancelled
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="expertrag-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: AnswerRequest) -> Ticket:
        if self.error is not None:
            raise ExpertRAGError(f"the model could not be loaded: {self.error}")
        ticket = Ticket(request)
        request.cancelled = ticket.cancelled.is_set
        try:
            self._queue.put_nowait(ticket)
        except queue.Full:
            raise QueueFull(f"the answer queue is full ({self._queue.maxsize} waiting); try again shortly") from None
        self._depth()
        return ticket

    def call(self, fn: Callable[[ExpertRAG], Any]) -> concurrent.futures.Future:
        """Run `fn(rag)` on the model thread between batches."""
        if self.error is not None:
            raise ExpertRAGError(f"the model could not be loaded: {self.error}")
        c = _Control(fn)
        self._control.put(c)
        self._queue.put(None)  # wake the worker (a None item only means "look at the control queue")
        return c.future

    def depth(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(self._queue.qsize())

    # ---- the model thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            rag = self._make_rag()
        except BaseException as e:  # reported by /readyz and by every request
            self.error = e
            log.exception("the model could not be loaded")
            self.ready.set()
            self._fail_all(e)
            return
        self.ready.set()
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            self._run_controls(rag)
            if item is None:
                continue
            batch = [item]
            deadline = time.perf_counter() + self.batch_wait
            stop = False
            while len(batch) < self.batch_max:
                remaining = deadline - time.perf_counter()
                try:
                    nxt = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                if nxt is not None:
                    batch.append(nxt)
                elif not self._control.empty():
                    break  # control work waits for no batch
            self._depth()
            self._answer(rag, batch)
            self._run_controls(rag)
            if stop:
                break
        self._fail_all(ExpertRAGError("the service is shutting down"))

    def _run_controls(self, rag: ExpertRAG) -> None:
        for c in _drain(self._control):
            try:
                c.future.set_result(c.fn(rag))
            except BaseException as e:
                c.future.set_exception(e)

    def _answer(self, rag: ExpertRAG, batch: list[Ticket]) -> None:
        live = []
        for t in batch:
            if t.cancelled.is_set():
                self._cancelled()
                t.future.set_exception(RequestCancelled("the caller went away while it waited"))
            else:
                live.append(t)
        if not live:
            return
        if self._on_batch is not None:
            self._on_batch(len(live))
        try:
            results = rag.answer_many([t.request for t in live])
        except BaseException as e:  # a bug: every caller of this batch gets it (HTTP 500), the engine goes on
            log.exception("answering a batch failed")
            for t in live:
                t.future.set_exception(e)
            return
        for t, r in zip(live, results, strict=True):
            if isinstance(r, RequestCancelled):
                self._cancelled()
            if isinstance(r, BaseException):
                t.future.set_exception(r)
            else:
                t.future.set_result(r)

    def _cancelled(self) -> None:
        if self._on_cancelled is not None:
            self._on_cancelled()

    def _fail_all(self, error: BaseException) -> None:
        for item in _drain(self._queue):
            if isinstance(item, Ticket) and not item.future.done():
                item.future.set_exception(error)
        for c in _drain(self._control):
            c.future.set_exception(error)


def _drain(q: queue.Queue):
    """Take what `q` holds now, without waiting."""
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return
