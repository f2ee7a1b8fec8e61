"""The HTTP layer: routes, auth, limits and error envelopes over `Service`. Thin by design: every
decision about what a caller may see is made in the service and, below it, inside retrieval."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertrag.data.readers import document_from_record
from expertrag.errors import ExpertRAGError, InputError
from expertrag.pipeline.answer import Answer
from expertrag.pipeline.rag import AnswerEvent, RequestCancelled
from expertrag.serve.engine import QueueFull, Ticket
from expertrag.serve.keys import Principal
from expertrag.serve.ratelimit import retry_after_header
from expertrag.serve.schemas import AnswerBody, ChatBody, DocumentsBody, SearchBody
from expertrag.serve.service import Forbidden, NotFound, Service, Unauthorized
from expertrag.text import json_safe

OPEN_PATHS = {"/", "/healthz", "/readyz", "/metrics", "/static/app.js", "/openapi.json", "/docs"}


class RateLimited(ExpertRAGError):
    def __init__(self, seconds: float):
        super().__init__(f"rate limit exceeded; retry in {retry_after_header(seconds)} s")
        self.seconds = seconds


def error_body(message: str, kind: str, field: str | None = None) -> dict[str, Any]:
    # OpenAI's error envelope, so its clients show the message.
    return {"error": {"message": message, "type": kind, "field": field}}


SNIPPET_CHARS = 240


def passage_views(passages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a client sees of retrieved passages (`Hit.to_dict()` records): id, title, a snippet, score."""
    return [{"id": p["id"], "title": p["title"], "snippet": p["contents"][:SNIPPET_CHARS], "score": p["score"],
             "doc_id": p.get("metadata", {}).get("doc_id")} for p in passages]


def answer_payload(answer: Answer) -> dict[str, Any]:
    by_id = {p["id"]: p for p in answer.passages}
    return json_safe({
        "question": answer.question, "text": answer.text, "retrieved": answer.retrieved,
        "abstained": answer.abstained, "confidence": answer.confidence,
        "citations": [{"id": c.id, "title": c.title, "marker": c.marker, "expert": c.expert,
                       "snippet": by_id.get(c.id, {}).get("contents", "")[:SNIPPET_CHARS]}
                      for c in answer.citations],
        "gate": {k: answer.gate.get(k) for k in ("decision", "score", "stage", "policy")},
        "passages": passage_views(answer.passages),
        "experts": answer.experts, "timings": vars(answer.timings), "tokens": answer.tokens,
        # domain experts (which ran, weights, why) and the policy expert's verdict
        "routing": answer.routing, "needs_review": answer.needs_review, "policy": answer.policy,
    })


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(json_safe(data), ensure_ascii=False)}\n\n".encode()


class _Limits:
    """Pure ASGI middleware: body size, draining, in-flight count and per-route metrics."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        svc, path = self.service, scope["path"]
        if svc.draining and path not in ("/healthz", "/readyz", "/metrics"):
            return await _send_json(send, 503, error_body("the server is shutting down", "unavailable"),
                                    {"retry-after": "5", "connection": "close"})
        limit = svc.cfg.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    return await _send_json(send, 400, error_body("bad Content-Length", "invalid_request"))
                if too_big:
                    return await _send_json(send, 413, error_body(
                        f"request body larger than {limit} bytes (serve.max_body_bytes)", "too_large"))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        status = {"code": 500}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        started = time.perf_counter()
        svc.in_flight += 1
        svc.metrics.in_flight.inc()
        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            await _send_json(send, 413, error_body(f"request body larger than {limit} bytes", "too_large"))
            status["code"] = 413
        finally:
            svc.in_flight -= 1
            svc.metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            svc.metrics.requests.labels(label, str(status["code"])).inc()
            svc.metrics.latency.labels(label).observe(time.perf_counter() - started)


class _BodyTooLarge(Exception):
    pass


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="ExpertRAG", version="0.1.0",
                  description="Adaptive retrieval-augmented generation: answers with citations, access control "
                              "per user group. Every /v1 route needs `Authorization: Bearer KEY`.")
    app.add_middleware(_Limits, service=service)
    app.state.service = service

    # ---- errors: one JSON envelope, the field named, never a traceback ---------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc) or None
        return JSONResponse(error_body(f"{field or 'body'}: {err.get('msg')}", "invalid_request", field), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "http_error"), exc.status_code, headers=exc.headers)

    @app.exception_handler(ExpertRAGError)
    async def _ours(request: Request, exc: ExpertRAGError):
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug: say so without leaking internals
        return JSONResponse(error_body(f"internal error ({type(exc).__name__})", "internal"), 500)

    # ---- who asks ----------------------------------------------------------------------------------
    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        who = service.authenticate(key.strip() if scheme.lower() == "bearer" else None)
        wait = service.limiter.acquire(who.name)
        if wait > 0:
            raise RateLimited(wait)
        return who

    # ---- answers -------------------------------------------------------------------------------------
    @app.post("/v1/answer", summary="Answer a question (JSON, or Server-Sent Events with stream: true)")
    async def answer(body: AnswerBody, request: Request, who: Principal = Depends(principal)):
        if body.stream:
            return await _stream_answer(service, request, who, body)
        ticket = service.submit_answer(who, body.question, policy=body.policy, k=body.k,
                                       max_tokens=body.max_tokens)
        result = await _await_ticket(service, request, ticket)
        service.metrics.observe_answer(result)
        return answer_payload(result)

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completions (the last user message is "
                                              "the question; ExpertRAG's extras are in `expertrag`)")
    async def chat(body: ChatBody, request: Request, who: Principal = Depends(principal)):
        if body.model is not None and body.model not in MODELS:
            raise NotFound(f"model '{body.model}' is not served here (GET /v1/models lists: {', '.join(MODELS)})")
        question = _last_user_text(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or "expertrag"
        if body.stream:
            return await _stream_chat(service, request, who, question, max_tokens, cid, created, model, body)
        ticket = service.submit_answer(who, question, max_tokens=max_tokens)
        result = await _await_ticket(service, request, ticket)
        service.metrics.observe_answer(result)
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": _finish_reason(service, result, max_tokens),
                         "logprobs": _logprobs(service, result, body)}],
            "usage": _usage(result),
            "expertrag": answer_payload(result),
        }

    @app.get("/v1/models", summary="The models /v1/chat/completions answers with (OpenAI's list format)")
    async def models(who: Principal = Depends(principal)):
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "expertrag"} for m in MODELS]}

    # ---- search and documents -------------------------------------------------------------------
    @app.post("/v1/search", summary="Search the passages the caller may see")
    async def search(body: SearchBody, who: Principal = Depends(principal)):
        hits = await asyncio.wrap_future(service.search(who, body.query, body.k, body.mode))
        return {"hits": json_safe(passage_views([h.to_dict() for h in hits]))}

    @app.get("/v1/documents/{doc_id:path}", summary="A document's passages (404 if the caller may not see it)")
    async def get_document(doc_id: str, who: Principal = Depends(principal)):
        doc = await asyncio.wrap_future(service.document(who, doc_id))
        return json_safe({"id": doc.id, "title": doc.title, "passages": doc.passages})

    @app.post("/v1/documents", summary="Add or update documents (admin); the index updates while serving")
    async def add_documents(body: DocumentsBody, who: Principal = Depends(principal)):
        service.require_admin(who)
        docs = _documents(body, service.cfg.max_documents)
        report = await asyncio.wrap_future(service.add_documents(who, docs))
        return {"generation": report.generation, "passages": report.passages, "documents": report.documents,
                "counts": report.counts, "embedded": report.embedded}

    @app.delete("/v1/documents/{doc_id:path}", summary="Delete a document (admin)")
    async def delete_document(doc_id: str, who: Principal = Depends(principal)):
        report = await asyncio.wrap_future(service.delete_document(who, doc_id))
        return {"deleted": doc_id, "generation": report.generation}

    # ---- operations ------------------------------------------------------------------------------
    @app.get("/healthz", summary="The process is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Model and index loaded")
    async def readyz():
        if service.engine.error is not None:
            return JSONResponse({"ready": False, "error": str(service.engine.error)}, 503)
        if not service.ready:
            return JSONResponse({"ready": False}, 503)
        return {"ready": True, "generation": service.generation}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        service.metrics.queue_depth.set(service.engine.depth())
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/v1/stats", summary="Live figures for the web page (retrieval rate, stages, experts, latency)")
    async def stats(who: Principal = Depends(principal)):
        return json_safe(service.metrics.summary())

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(files("expertrag.serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/static/app.js", include_in_schema=False)
    async def page_js():
        return Response(files("expertrag.serve").joinpath("static/app.js").read_text(encoding="utf-8"),
                        media_type="text/javascript")

    return app


def error_response(exc: ExpertRAGError) -> JSONResponse:
    status, name = next((v for kind, v in _STATUS.items() if isinstance(exc, kind)), (400, "error"))
    headers = {}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    elif isinstance(exc, RateLimited):
        headers["retry-after"] = retry_after_header(exc.seconds)
    elif status == 503:
        headers["retry-after"] = "1"
    field = exc.field if isinstance(exc, InputError) else None
    message = exc.reason if field else str(exc)
    return JSONResponse(error_body(message, name, field), status, headers=headers)


class _Timeout(ExpertRAGError):
    pass


# our errors -> (HTTP status, error type), most specific first (InputError last: others may subclass it)
_STATUS: dict[type, tuple[int, str]] = {
    Unauthorized: (401, "unauthorized"), Forbidden: (403, "forbidden"), NotFound: (404, "not_found"),
    RateLimited: (429, "rate_limited"), QueueFull: (503, "overloaded"), _Timeout: (504, "timeout"),
    RequestCancelled: (499, "cancelled"), InputError: (400, "invalid_request"),
}


def _last_user_text(body: ChatBody) -> str:
    for m in reversed(body.messages):
        if m.role == "user":
            if isinstance(m.content, str):
                return m.content
            if isinstance(m.content, list):  # content parts: keep the text ones
                return " ".join(str(p.get("text", "")) for p in m.content if p.get("type") == "text")
    raise InputError("no user message", field="messages")


def _documents(body: DocumentsBody, most: int):
    if (body.documents is None) == (body.text is None):
        raise InputError("give either documents or text", field="documents")
    if body.text is not None:
        if not body.id:
            raise InputError("a text needs an id", field="id")
        records = [{"id": body.id, "title": body.title, "contents": body.text, "metadata": body.metadata}]
        prefix = ""
    else:
        if len(body.documents) > most:
            raise InputError(f"at most {most} documents per request (serve.max_documents)", field="documents")
        records = [d.model_dump() for d in body.documents]
        prefix = "documents"
    docs, seen = [], set()
    for i, rec in enumerate(records):
        rec = {k: v for k, v in rec.items() if v is not None}
        try:
            doc = document_from_record(rec, "request", i)
        except InputError as e:
            where = f"{prefix}[{i}]." if prefix else ""
            raise InputError(e.reason, field=f"{where}{e.field}" if e.field else prefix or None) from None
        if doc.id in seen:
            raise InputError(f"document id {doc.id!r} appears twice", field=f"{prefix}[{i}].id")
        seen.add(doc.id)
        docs.append(doc)
    return docs


async def _await_ticket(service: Service, request: Request, ticket: Ticket) -> Answer:
    """The answer, cancelling the work if the client disconnects and failing with 504 after the timeout."""
    fut = asyncio.wrap_future(ticket.future)

    async def watch():
        while not fut.done():
            if await request.is_disconnected():
                ticket.cancel()
                return
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        return await asyncio.wait_for(asyncio.shield(fut), service.cfg.request_timeout_s)
    except TimeoutError:
        ticket.cancel()
        raise _Timeout(f"no answer within {service.cfg.request_timeout_s:.0f} s (serve.request_timeout_s)") from None
    finally:
        watcher.cancel()


def _event_pipe(loop: asyncio.AbstractEventLoop):
    """An asyncio queue the model thread can feed (`put` is thread-safe)."""
    q: asyncio.Queue = asyncio.Queue()

    def put(event: AnswerEvent) -> None:
        loop.call_soon_threadsafe(q.put_nowait, event)
    return q, put


async def _events(service: Service, request: Request, ticket: Ticket, q: asyncio.Queue
                  ) -> AsyncIterator[AnswerEvent | BaseException]:
    fut = asyncio.wrap_future(ticket.future)
    deadline = time.monotonic() + service.cfg.request_timeout_s
    try:
        while True:
            if time.monotonic() > deadline:
                ticket.cancel()
                yield _Timeout("no answer within the request timeout")
                return
            try:
                event = await asyncio.wait_for(q.get(), 0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    ticket.cancel()
                    return
                if fut.done() and q.empty():
                    exc = fut.exception()
                    if exc is not None:
                        yield exc
                    return
                continue
            yield event
            if event.kind == "answer":
                return
    finally:  # the client went away (the stream was closed) or we are done
        if not fut.done():
            ticket.cancel()


async def _stream_answer(service: Service, request: Request, who: Principal, body: AnswerBody):
    q, put = _event_pipe(asyncio.get_running_loop())
    ticket = service.submit_answer(who, body.question, policy=body.policy, k=body.k, max_tokens=body.max_tokens,
                                   on_event=put)

    async def stream():
        async for ev in _events(service, request, ticket, q):
            if isinstance(ev, BaseException):
                yield sse("error", _error_data(ev))
                return
            if ev.kind == "answer":
                service.metrics.observe_answer(ev.data["answer"])
                yield sse("answer", answer_payload(ev.data["answer"]))
            elif ev.kind == "passages":
                yield sse("passages", {"passages": passage_views(ev.data["passages"])})
            else:
                yield sse(ev.kind, ev.data)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def _stream_chat(service: Service, request: Request, who: Principal, question: str, max_tokens: int | None,
                       cid: str, created: int, model: str, body: ChatBody):
    q, put = _event_pipe(asyncio.get_running_loop())
    ticket = service.submit_answer(who, question, max_tokens=max_tokens, on_event=put)

    def chunk(delta: dict, finish: str | None = None, extra: dict | None = None, logprobs: Any = None,
              usage: Any = None) -> bytes:
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
        if extra is not None:
            out["expertrag"] = extra
        if usage is not None:
            out["usage"] = usage
        return f"data: {json.dumps(json_safe(out), ensure_ascii=False)}\n\n".encode()

    async def stream():
        yield chunk({"role": "assistant", "content": ""})
        async for ev in _events(service, request, ticket, q):
            if isinstance(ev, BaseException):
                yield f"data: {json.dumps(_error_data(ev))}\n\n".encode()
                break
            if ev.kind == "token":
                yield chunk({"content": ev.data["text"]})
            elif ev.kind == "answer":
                # The deltas are the model's own words ([n] markers included); the final answer (markers
                # resolved to citations, abstention) travels in the extra field of the last chunk.
                # Every token's log-prob rides on this last chunk: the deltas are text pieces, not tokens.
                answer = ev.data["answer"]
                service.metrics.observe_answer(answer)
                yield chunk({}, _finish_reason(service, answer, max_tokens), answer_payload(answer),
                            _logprobs(service, answer, body), _usage(answer))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


MODELS = ("expertrag",)  # the names /v1/chat/completions accepts (any other is a 404, as OpenAI does)


def _usage(a: Answer) -> dict[str, int]:
    return {"prompt_tokens": a.tokens["prompt"], "completion_tokens": a.tokens["generated"],
            "total_tokens": a.tokens["prompt"] + a.tokens["generated"]}


def _finish_reason(service: Service, a: Answer, max_tokens: int | None) -> str:
    limit = max_tokens or service.settings.pipeline.max_new_tokens
    return "length" if a.tokens["generated"] >= limit else "stop"


def _logprobs(service: Service, a: Answer, body: ChatBody) -> dict[str, Any] | None:
    """OpenAI's `logprobs.content` for the generated tokens (the model's own, before an abstention replaced
    the text); `top_logprobs` holds only the chosen token: our decoder keeps no top-k alternatives."""
    if not body.logprobs:
        return None
    out = []
    for piece, lp in zip(service.token_pieces(a.token_ids), a.logprobs, strict=False):
        entry = {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}
        out.append({**entry, "top_logprobs": [entry] if body.top_logprobs else []})
    return {"content": out}


def _error_data(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ExpertRAGError):
        resp = error_response(exc)
        return json.loads(resp.body)
    return error_body(f"internal error ({type(exc).__name__})", "internal")
