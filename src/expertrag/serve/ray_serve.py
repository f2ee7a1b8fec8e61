"""`expertrag serve --ray` (issue 17): the same HTTP API, the pipeline behind Ray Serve deployments.

```
HTTP -> Ray Serve proxy -> "ingress" deployment (1 replica): the FastAPI app of serve/app.py, unchanged
           Service: keys, rate limits, access control, search and ingest workers, metrics  (as in-process)
           its answer engine is RayAnswerEngine: it routes each question (ExpertDispatch) and sends it to ...
        -> "pipeline" deployment (serve.ray.replicas, or serve.ray.autoscaling min..max): the general expert,
           and every question when the index has no domain expert with a deployment
        -> "expert-NAME" deployment, one Serve application per active domain expert (expertrag-expert-NAME;
           serve.ray.experts.NAME or serve.ray.expert_default: replicas or autoscaling): its questions
   every pipeline or expert replica loads the model + index once and answers with the in-process
   AnswerEngine (one model thread, batches of concurrent answers), so an answer is exactly what
   `expertrag serve` gives
```
Only what the model does moves: authentication, the user's groups (sent as the pipeline's `User`, so the
access filter still runs inside retrieval), policy checks and request limits stay in the ingress, in
Service's own code. Streaming answers travel as a Ray Serve streaming call (one AnswerEvent per item); a
client that goes away cancels the call, which cancels the replica's decoding.

Domain experts: the ingress routes with the pipeline's own `route_question` (registry, router, the caller's
rankings on the ingress's search index) and picks the top expert's deployment. That replica runs the whole
pipeline (policy screening, routing again, the experts' gates and adapters, retrieval in the domain,
generation, fusion of several experts), so the dispatch only decides where the work runs, never what the
answer is: a question the ingress would route differently (a redacting policy rule changes the question
first) still gets the in-process answer. A question routed to several experts goes to its top expert's
deployment, which answers every branch. Each expert replica holds the whole index, not only its domain's
passages (a partitioned index per expert is not built). No routing work at all while no expert deployment
runs. Experts added or retired at run time: `sync_experts` (run by `run_on_ray` every serve.ray.expert_poll_s)
deploys or deletes their applications, each its own, so nothing else is redeployed; the ingress sees the
running ones within expert_poll_s (ExpertHandles) and until then, or for an expert with `replicas: 0`, the
pipeline deployment answers (counted as a fallback in /metrics).

Index updates: ingest runs in the ingress (one replica, so builds never race); each answer carries the
generation the ingress has committed, and a pipeline or expert replica that is behind opens it before
answering (between batches, on its model thread), so a caller reads its own write whichever replica answers.

/metrics is the ingress's registry: the service's usual series, plus the answers sent to each deployment
(`expertrag_ray_dispatched_total{deployment}`), fallbacks per expert and the running expert deployments.
Not gathered: the replicas' own batch sizes and queue depths (each replica keeps them in its own Service;
a handle call reaches one replica that Serve picks, so collecting them needs every replica's actor or Ray's
metrics export, neither wired here). The ingress's `expertrag_batch_size` therefore stays empty under --ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from expertrag.errors import ExpertRAGError, InputError
from expertrag.experts.registry import GENERAL
from expertrag.pipeline.rag import AnswerRequest, RequestCancelled
from expertrag.serve.engine import QueueFull, Ticket

APP_NAME = "expertrag"
EXPERT_APP_PREFIX = f"{APP_NAME}-expert-"  # one Serve application per domain expert: expertrag-expert-NAME
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

    def __init__(self, service: Any, handle: Any, expert_handles: Any = None):
        """`expert_handles()`: {expert name: handle} of the expert deployments running now (None: none)."""
        from prometheus_client import Counter

        self.service, self.handle = service, handle
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._limit = service.cfg.queue_size
        self._pool = concurrent.futures.ThreadPoolExecutor(self._limit, thread_name_prefix="expertrag-ray")
        self._lock = threading.Lock()
        self._in_flight = 0
        self.dispatch = ExpertDispatch(service, expert_handles) if expert_handles is not None else None
        # what the ingress can count itself: the replicas' own batch sizes are not gathered (see the docstring)
        self.dispatched = Counter("expertrag_ray_dispatched_total", "answers sent to each Ray Serve deployment "
                                  "(pipeline, or expert-NAME)", ["deployment"], registry=service.metrics.registry)
        self.fallbacks = Counter("expertrag_ray_expert_fallback_total", "answers routed to a domain expert whose "
                                 "deployment was not running (answered by the pipeline deployment)", ["expert"],
                                 registry=service.metrics.registry)
        if expert_handles is not None:
            service.metrics.registry.register(_RunningExperts(expert_handles))

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

    def _target(self, request: AnswerRequest) -> Any:
        """The deployment that answers: the routed expert's own, else the pipeline (general expert, no domain
        experts, or an expert whose deployment is not running: created later, removed, or replicas: 0)."""
        if self.dispatch is not None:
            name, handle = self.dispatch.pick(request)
            if handle is not None:
                self.dispatched.labels(f"expert-{name}").inc()
                return handle
            if name is not None:
                self.fallbacks.labels(name).inc()
        self.dispatched.labels("pipeline").inc()
        return self.handle

    def _run(self, ticket: Ticket) -> None:
        request = ticket.request
        try:
            handle = self._target(request)
            if request.on_event is None:
                response = handle.answer.remote(self._payload(request))
                while True:
                    try:
                        ticket.future.set_result(response.result(timeout_s=POLL_S))
                        return
                    except TimeoutError:
                        if ticket.cancelled.is_set():
                            response.cancel()
                            raise RequestCancelled("the caller went away") from None
            else:
                stream = handle.options(stream=True).answer_stream.remote(self._payload(request))
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


class ExpertDispatch:
    """Which expert's deployment answers a question. The ingress routes it with the pipeline's own two-layer
    router (`route_question`: same registry, router and rankings, on the ingress's search index and thread),
    and the question goes to the top expert's deployment. That replica runs the whole pipeline (screening,
    routing, the experts' gates, retrieval, generation, fusion), so the answer is what `expertrag serve` gives
    whichever deployment computed it: the dispatch only decides where the work runs. A question routed to
    several experts goes to its top expert's deployment, which answers all its branches."""

    def __init__(self, service: Any, handles: Any):
        from expertrag.experts.live import LiveExperts
        from expertrag.experts.router import RoutingSettings

        self.service, self._handles = service, handles
        self.live = LiveExperts(service.index_dir)
        self.routing = RoutingSettings()  # what ExpertRAG routes with
        self._dmap = None

    def pick(self, request: AnswerRequest) -> tuple[str | None, Any]:
        """(routed expert, its deployment's handle or None); (None, None) for the general expert."""
        state = self.live.current()
        if not state.routing:
            return None, None  # no domain expert: answered exactly as without a registry
        running = self._handles()
        if not running:
            return None, None  # nothing to dispatch to: skip the routing work
        name = self.service._on_search_thread(lambda index: self._route(index, state, request)).result()
        return (name, running.get(name)) if name != GENERAL else (None, None)

    def _route(self, index: Any, state: Any, request: AnswerRequest) -> str:
        from types import SimpleNamespace

        from expertrag.experts.live import DomainMap
        from expertrag.pipeline.config import PipelineConfig
        from expertrag.pipeline.rag import ExpertRAG, PipelineGateContext, route_question

        if self._dmap is None or self._dmap.generation != index.generation:
            self._dmap = DomainMap(index)
        cfg = self.service.settings.pipeline
        if request.k is not None:  # the ranking depth follows k, as the pipeline's does
            cfg = PipelineConfig.model_validate({**cfg.model_dump(), "k": request.k})
        view = SimpleNamespace(index=index, config=cfg)  # what a gate context reads of its pipeline
        ctx = PipelineGateContext(view, request.question, dict(request.metadata or {}),
                                  ExpertRAG.filters_for(request.user), cfg)
        return route_question(index, self._dmap, ctx, state, request.user, self.routing).experts[0][0].name


class _RunningExperts:
    """/metrics: the expert deployments the ingress sends questions to now (1 per running expert)."""

    def __init__(self, handles: Any):
        self.handles = handles

    def describe(self):
        return []  # no fixed series: they follow the registry

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("expertrag_ray_expert_deployment_running", "domain experts whose own Ray Serve "
                              "deployment is running and receives their questions", labels=["expert"])
        for name in sorted(self.handles()):
            g.add_metric([name], 1)
        yield g


class ExpertHandles:
    """{expert name: handle} of the expert applications Serve reports RUNNING, refreshed every
    serve.ray.expert_poll_s on a thread of its own (a request never waits on the controller)."""

    def __init__(self, poll_s: float):
        self.poll_s = poll_s
        self._running: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="expertrag-ray-experts", daemon=True)
        self._thread.start()

    def __call__(self) -> dict[str, Any]:
        return self._running

    def refresh(self) -> None:
        serve = require_serve()
        apps = serve.status().applications
        running = {}
        for app, st in apps.items():
            if app.startswith(EXPERT_APP_PREFIX) and st.status == "RUNNING":
                name = app[len(EXPERT_APP_PREFIX):]
                running[name] = self._running.get(name) or serve.get_app_handle(app)
        self._running = running  # one assignment: readers see the old dict or the new one

    def _loop(self) -> None:
        import logging

        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 (the controller busy or restarting: keep the last view, try again)
                logging.getLogger("expertrag.serve").warning("could not read the expert deployments", exc_info=True)
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()


class IngressReplica:
    """The ingress deployment replica: Service (keys, limits, access, search, ingest) + the FastAPI app."""

    def __init__(self, index_dir: str, settings: Any, pipeline: Any):
        import torch

        from expertrag.serve.service import Service

        torch.set_num_threads(settings.serve.ray.threads_per_replica)  # the search worker's embedder
        self.experts = ExpertHandles(settings.serve.ray.expert_poll_s)
        self.service = Service(index_dir, settings, engine=lambda svc: RayAnswerEngine(svc, pipeline, self.experts))
        self.service.start()

    def __serve_build_asgi_app__(self):
        from expertrag.serve.app import create_app

        return create_app(self.service)

    def __del__(self):
        self.experts.stop()
        self.service.close()


def _options(replicas: int, autoscaling: Any, cpus: float, max_ongoing: int) -> dict[str, Any]:
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus}, "max_ongoing_requests": max_ongoing}
    if autoscaling is not None:
        a = autoscaling
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "initial_replicas": max(a.min_replicas, 1),
                                      "target_ongoing_requests": a.target_ongoing_requests}
    else:
        opts["num_replicas"] = replicas
    return opts


def scaling_options(settings: Any) -> dict[str, Any]:
    """The pipeline deployment's replica options from serve.ray."""
    rc = settings.serve.ray
    return _options(rc.replicas, rc.autoscaling, rc.cpus_per_replica, rc.max_ongoing_requests)


def expert_scaling_options(settings: Any, name: str) -> dict[str, Any] | None:
    """Expert `name`'s deployment options (serve.ray.experts.NAME, else serve.ray.expert_default; unset CPU
    and request limits from serve.ray); None when it has no deployment of its own (replicas: 0)."""
    rc = settings.serve.ray
    e = rc.expert(name)
    if not e.deployed:
        return None
    return _options(e.replicas, e.autoscaling, e.cpus_per_replica or rc.cpus_per_replica,
                    e.max_ongoing_requests or rc.max_ongoing_requests)


def expert_app_name(name: str) -> str:
    return EXPERT_APP_PREFIX + name


def build_expert_app(index_dir: str | Path, settings: Any, name: str):
    """Expert `name`'s Serve application: one deployment of full pipeline replicas (the ingress sends it the
    questions routed to `name`). An application of its own, so it is created and removed at run time without
    redeploying the ingress or the other experts."""
    serve = require_serve()
    opts = expert_scaling_options(settings, name)
    if opts is None:
        raise InputError(f"expert {name!r} has serve.ray replicas: 0 (no deployment of its own)",
                         field=f"serve.ray.experts.{name}")
    dep = serve.deployment(PipelineReplica, name=f"expert-{name}", **opts)
    return dep.bind(str(Path(index_dir).resolve()), settings, settings.serve.ray.threads_per_replica)


def wanted_experts(index_dir: str | Path, settings: Any) -> list[str]:
    """The active domain experts of the index's registry that get a deployment of their own."""
    from expertrag.experts.registry import ExpertRegistry

    snap = ExpertRegistry(index_dir).snapshot()
    return [e.name for e in snap.domain_experts if settings.serve.ray.expert(e.name).deployed]


def _start(app: Any, name: str, route_prefix: str | None) -> None:
    """Deploy without waiting for the replicas, so several applications load their models at once."""
    serve = require_serve()
    run = getattr(serve, "_run", None)  # Ray Serve's non-blocking form of serve.run
    if run is None:
        serve.run(app, name=name, route_prefix=route_prefix)
    else:
        run(app, name=name, route_prefix=route_prefix, _blocking=False)


def _wait_running(apps: list[str], timeout_s: float = 900.0) -> dict[str, str]:
    """Wait until each application runs or fails; {app: why} for those that failed (or did not start)."""
    import time

    serve = require_serve()
    pending, failed = set(apps), {}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        status = serve.status().applications
        for app in list(pending):
            st = status.get(app)
            if st is not None and st.status == "RUNNING":
                pending.discard(app)
            elif st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                failed[app] = st.message or str(st.status)
                pending.discard(app)
        if pending:
            time.sleep(0.5)
    failed.update({app: f"not running after {timeout_s:.0f} s" for app in pending})
    return failed


def sync_experts(index_dir: str | Path, settings: Any, log: Any = None, *, also: tuple[str, ...] = ()
                 ) -> dict[str, list[str]]:
    """Make the expert applications match the registry: deploy those of experts added (and wait until they
    run, together with the applications in `also`), remove those of experts retired (Serve drains them
    first). An expert whose deployment fails to start is reported, removed and left to the pipeline
    deployment, which answers its questions meanwhile; it is tried again at the next sync."""
    serve = require_serve()
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    wanted = set(wanted_experts(index_dir, settings))
    have = {a[len(EXPERT_APP_PREFIX):] for a in serve.status().applications if a.startswith(EXPERT_APP_PREFIX)}
    removed = sorted(have - wanted)
    for name in removed:
        serve.delete(expert_app_name(name))
        say(f"expertrag: expert {name!r} is retired or has no deployment of its own now: its deployment was removed")
    new = sorted(wanted - have)
    for name in new:
        _start(build_expert_app(index_dir, settings, name), expert_app_name(name), None)
    failed = _wait_running([*also, *map(expert_app_name, new)])
    for app, why in failed.items():
        if app in also:
            raise ExpertRAGError(f"the {app!r} application did not start: {why}")
        name = app[len(EXPERT_APP_PREFIX):]
        say(f"expertrag: expert {name!r}: its deployment did not start ({why}); the pipeline answers it")
        with contextlib.suppress(Exception):
            serve.delete(app)
    added = [n for n in new if expert_app_name(n) not in failed]
    for name in added:
        say(f"expertrag: expert {name!r} deployed ({expert_scaling_options(settings, name)})")
    return {"added": added, "removed": removed, "failed": sorted(a[len(EXPERT_APP_PREFIX):] for a in failed)}


def deploy(index_dir: str | Path, settings: Any, log: Any = None) -> dict[str, list[str]]:
    """The main application (ingress + pipeline) on "/" and one application per domain expert, their
    replicas started together; returns when all run (an expert that fails is reported, see sync_experts)."""
    _start(build_app(index_dir, settings), APP_NAME, "/")
    return sync_experts(index_dir, settings, log, also=(APP_NAME,))


def undeploy() -> None:
    """Remove the expert applications and the main one (the other applications of the cluster are left)."""
    serve = require_serve()
    for app in list(serve.status().applications):
        if app == APP_NAME or app.startswith(EXPERT_APP_PREFIX):
            serve.delete(app)


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
            deploy(index_dir, settings)
            print(f"expertrag: serving on http://{host}:{port} (Ray Serve; Ctrl-C or SIGTERM stops)",
                  file=sys.stderr, flush=True)
            # experts added or retired while serving get (or lose) their deployment within expert_poll_s
            while not stop.wait(settings.serve.ray.expert_poll_s):
                try:
                    sync_experts(index_dir, settings)
                except Exception as e:  # noqa: BLE001 (a registry edited by hand, a busy controller: keep serving)
                    print(f"expertrag: the expert deployments could not be updated: {e}", file=sys.stderr,
                          flush=True)
        finally:
            serve.shutdown()  # drains the replicas (Serve's graceful shutdown), then removes them
