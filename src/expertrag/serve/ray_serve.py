"""`expertrag serve --ray` (issue 17): the same HTTP API, the pipeline behind Ray Serve deployments.

```
HTTP -> Ray Serve proxy -> "ingress" deployment (1 replica): the FastAPI app of serve/app.py, unchanged
           Service: keys, rate limits, access control, search and ingest workers, metrics  (as in-process)
           its answer engine is RayAnswerEngine: each answer goes to a handle of ...
        -> "pipeline" deployment (serve.ray.replicas, or serve.ray.autoscaling min..max): each replica
           loads the model + index once and answers with the in-process AnswerEngine (one model thread,
           batches of concurrent answers), so an answer is exactly what `expertrag serve` gives
```
Only what the model does moves: authentication, the user's groups (sent as the pipeline's `User`, so the
access filter still runs inside retrieval), policy checks and request limits stay in the ingress, in
Service's own code. Streaming answers travel as a Ray Serve streaming call (one AnswerEvent per item); a
client that goes away cancels the call, which cancels the replica's decoding.

Index updates: ingest runs in the ingress (one replica, so builds never race); each answer carries the
generation the ingress has committed, and a pipeline replica that is behind opens it before answering
(between batches, on its model thread), so a caller reads its own write whichever replica answers.

Not done yet: one deployment per domain expert (experts are routed inside the pipeline, so a busy expert
scales with the whole pipeline, not alone); /metrics counts the ingress only (batch sizes of the replicas
are not gathered).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from expertrag.errors import ExpertRAGError, InputError
from expertrag.pipeline.rag import AnswerRequest, RequestCancelled
from expertrag.serve.engine import QueueFull, Ticket

APP_NAME = "expertrag"
INSTALL_HINT = "pip install -e '.[ray]'"
POLL_S = 0.25  # how often a waiting ingress thread looks at its ticket's cancel flag


def require_serve():
    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError as e:
        raise ExpertRAGError(f"--ray needs Ray Serve, which is not installed ({e.name}): {INSTALL_HINT}") from None
    return serve


def _cause(e: BaseException) -> BaseException:
    """The replica's own error (QueueFull, InputError, RequestCancelled...) rather than Ray's wrapper, so the
    app maps it to the same HTTP status as in-process."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


# ---------------------------------------------------------------------------------- pipeline replica


class PipelineReplica:
    """A pipeline deployment replica: the in-process Service's answer engine (model thread, batching),
    built by Service itself so the pipeline is the one `expertrag serve` builds."""

    def __init__(self, index_dir: str, settings: Any, threads: int = 1):
        import torch

        from expertrag.serve.service import Service

        torch.set_num_threads(threads)  # the replica owns serve.ray.cpus_per_replica CPUs of the cluster
        self.service = Service(index_dir, settings)
        self.service.start()
        self.service.engine.ready.wait()
        if self.service.engine.error is not None:  # Serve reports the replica as failed, with this reason
            raise ExpertRAGError(f"the model could not be loaded: {self.service.engine.error}")
        self._reopen = asyncio.Lock()

    async def _catch_up(self, generation: int) -> None:
        from expertrag.serve.service import open_index

        svc = self.service
        async with self._reopen:
            if svc.generation < generation:
                await asyncio.wrap_future(svc.engine.call(
                    lambda rag: rag.set_index(open_index(svc.index_dir, svc.settings))))
                svc.generation = max(generation, svc.generation)

    async def _submit(self, req: dict, on_event: Any = None) -> Ticket:
        await self._catch_up(req["generation"])
        pol = self.service.policy(req["policy"]) if req["policy"] else None
        return self.service.engine.submit(AnswerRequest(req["question"], req["user"], policy=pol, k=req["k"],
                                                        max_new_tokens=req["max_new_tokens"], on_event=on_event))

    async def answer(self, req: dict):
        ticket = await self._submit(req)
        try:
            return await asyncio.shield(asyncio.wrap_future(ticket.future))
        except asyncio.CancelledError:  # the ingress cancelled the call: its client went away
            ticket.cancel()
            raise

    async def answer_stream(self, req: dict):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        ticket = await self._submit(req, on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        fut = asyncio.wrap_future(ticket.future)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), POLL_S)
                except TimeoutError:
                    if fut.done() and events.empty():
                        if fut.exception() is not None:
                            raise fut.exception() from None
                        return
                    continue
                yield event
                if event.kind == "answer":
                    return
        finally:  # cancelled, or the ingress stopped reading
            if not fut.done():
                ticket.cancel()


# ----------------------------------------------------------------------------------- ingress side


class RayAnswerEngine:
    """The ingress Service's answer engine: AnswerEngine's interface (submit, call, depth, ready, error), the
    work done by the pipeline deployment. One thread per answer in flight waits on the Ray call, so the
    app's event loop never blocks; the count in flight is bounded by serve.queue_size, as the queue is."""

    def __init__(self, service: Any, handle: Any):
        self.service, self.handle = service, handle
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._limit = service.cfg.queue_size
        self._pool = concurrent.futures.ThreadPoolExecutor(self._limit, thread_name_prefix="expertrag-ray")
        self._lock = threading.Lock()
        self._in_flight = 0

    def start(self) -> None:
        self.ready.set()  # Serve starts the ingress only once the pipeline replicas are up

    def stop(self, timeout: float = 30.0) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def depth(self) -> int:
        return self._in_flight

    def call(self, fn) -> concurrent.futures.Future:
        # the only control work is "open the new generation" after an ingest: replicas do it themselves before
        # the first answer that names a newer generation (see _payload), so there is nothing to run here
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(None)
        return done

    def submit(self, request: AnswerRequest) -> Ticket:
        with self._lock:
            if self._in_flight >= self._limit:
                raise QueueFull(f"the answer queue is full ({self._limit} waiting); try again shortly")
            self._in_flight += 1
        ticket = Ticket(request)
        request.cancelled = ticket.cancelled.is_set
        self._pool.submit(self._run, ticket)
        return ticket

    def _payload(self, request: AnswerRequest) -> dict:
        return {"question": request.question, "user": request.user, "k": request.k,
                "max_new_tokens": request.max_new_tokens,
                "policy": getattr(request.policy, "name", None) if request.policy is not None else None,
                "generation": self.service.generation}

    def _run(self, ticket: Ticket) -> None:
        request = ticket.request
        try:
            if request.on_event is None:
                response = self.handle.answer.remote(self._payload(request))
                while True:
                    try:
                        ticket.future.set_result(response.result(timeout_s=POLL_S))
                        return
                    except TimeoutError:
                        if ticket.cancelled.is_set():
                            response.cancel()
                            raise RequestCancelled("the caller went away") from None
            else:
                stream = self.handle.options(stream=True).answer_stream.remote(self._payload(request))
                answer = None
                for event in stream:
                    if ticket.cancelled.is_set():
                        stream.cancel()
                        raise RequestCancelled("the caller went away")
                    request.on_event(event)
                    if event.kind == "answer":
                        answer = event.data["answer"]
                if answer is None:
                    raise ExpertRAGError("the pipeline replica ended the stream without an answer")
                ticket.future.set_result(answer)
        except BaseException as e:  # noqa: BLE001 (every failure goes to the caller, as AnswerEngine does)
            if not ticket.future.done():
                ticket.future.set_exception(_cause(e))
        finally:
            with self._lock:
                self._in_flight -= 1


class IngressReplica:
    """The ingress deployment replica: Service (keys, limits, access, search, ingest) + the FastAPI app."""

    def __init__(self, index_dir: str, settings: Any, pipeline: Any):
        import torch

        from expertrag.serve.service import Service

        torch.set_num_threads(settings.serve.ray.threads_per_replica)  # the search worker's embedder
        self.service = Service(index_dir, settings, engine=lambda svc: RayAnswerEngine(svc, pipeline))
        self.service.start()

    def __serve_build_asgi_app__(self):
        from expertrag.serve.app import create_app

        return create_app(self.service)

    def __del__(self):
        self.service.close()


def scaling_options(settings: Any) -> dict[str, Any]:
    """The pipeline deployment's replica options from serve.ray."""
    rc = settings.serve.ray
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": rc.cpus_per_replica},
                            "max_ongoing_requests": rc.max_ongoing_requests}
    if rc.autoscaling is not None:
        a = rc.autoscaling
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "initial_replicas": max(a.min_replicas, 1),
                                      "target_ongoing_requests": a.target_ongoing_requests}
    else:
        opts["num_replicas"] = rc.replicas
    return opts


def build_app(index_dir: str | Path, settings: Any):
    """The Serve application: ingress bound to a pipeline deployment handle."""
    serve = require_serve()
    index_dir = str(Path(index_dir).resolve())  # replicas run in other working directories
    pipeline = serve.deployment(PipelineReplica, name="pipeline", **scaling_options(settings))
    # the ingress takes no CPU of its own: it waits on the pipeline, its search/ingest work is brief. Serve's
    # default of 5 requests at once per replica would queue the sixth HTTP request (a long stream holds its
    # slot) at the proxy; the service's own limits (serve.queue_size, rate limits) are what should refuse
    ingress = serve.deployment(serve.ingress()(IngressReplica), name="ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=max(256, 4 * settings.serve.queue_size))
    return ingress.bind(index_dir, settings, pipeline.bind(index_dir, settings, settings.serve.ray.threads_per_replica))


def check_index(index_dir: Path, settings: Any) -> None:
    """Fail here, in one line, on what every replica would fail on (missing index, missing gate artifacts)."""
    from expertrag.gate.policies import make_policy
    from expertrag.pipeline.build import gate_dir
    from expertrag.retrieval.index import Index

    Index(index_dir, settings.retrieval).close()
    make_policy(settings.gate.policy, settings.gate, gate_dir(index_dir))


def run_on_ray(index_dir: Path, settings: Any, host: str, port: int, address: str | None = None) -> None:
    """`expertrag serve --ray`: start (or join) the cluster, deploy, serve until SIGTERM/Ctrl-C, shut down."""
    from expertrag.retrieval.ray_build import ray_session

    serve = require_serve()
    if port == 0:
        raise InputError("--ray needs a fixed --port (Ray Serve's proxy binds it; 0 would not be known)")
    check_index(index_dir, settings)
    stop = threading.Event()
    with ray_session(address):
        # after ray.init, which installs its own SIGTERM handler (log and die): ours shuts Serve down first
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        serve.start(http_options={"host": host, "port": port})
        try:
            print(f"expertrag: deploying {index_dir} on Ray Serve (loading the model in each replica)",
                  file=sys.stderr, flush=True)
            serve.run(build_app(index_dir, settings), name=APP_NAME, route_prefix="/")
            print(f"expertrag: serving on http://{host}:{port} (Ray Serve; Ctrl-C or SIGTERM stops)",
                  file=sys.stderr, flush=True)
            stop.wait()
        finally:
            serve.shutdown()  # drains the replicas (Serve's graceful shutdown), then removes them
