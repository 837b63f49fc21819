"""`lemonslice serve`: the OpenAI-compatible HTTP API on FastAPI, streamed with SSE.

The model loads in a thread after the server starts (`/health` answers 503 until then). Each
request is validated, its prompt built, then it waits for a slot (a full queue answers 503)
and runs as a `Job`; its events become one JSON body or a stream of chunks. A client that
disconnects cancels its job, which frees the slot after the current step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from urllib.parse import unquote
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LemonsliceError
from .build import build_chat, build_completion
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body, new_id, now
from .service import Busy, Event, Job, ModelService, Slot

log = logging.getLogger(__name__)

__all__ = ["create_app"]

_OPEN = {"/health"}  # answers without the API key


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: Any = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _error(status: int, message: str, kind: str = "invalid_request_error", code: Any = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code), status_code=status)


def create_app(load: Callable[[], ModelService], *, api_key: str | None = None,
               default_thinking: bool = True) -> FastAPI:
    """The app; `load()` builds the model service in a thread once the server runs."""
    def _load() -> None:
        try:
            app.state.service = load()
        except Exception as e:  # noqa: BLE001  (reported by /health and every endpoint)
            log.exception("loading the model failed")
            app.state.load_error = str(e) or type(e).__name__

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=_load, name="lemonslice-load", daemon=True).start()
        yield
        if app.state.service is not None:
            app.state.service.close()

    app = FastAPI(title="lemonslice", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service, app.state.load_error = None, None
    app.state.tasks = set()
    metrics = Metrics()

    _install_errors(app, metrics, api_key)

    def service() -> ModelService:
        if app.state.load_error is not None:
            raise ApiError(500, f"the model failed to load: {app.state.load_error}", "server_error")
        if app.state.service is None:
            raise ApiError(503, "the model is loading", "server_error", "loading")
        return app.state.service

    @app.get("/health")
    async def health() -> JSONResponse:
        if app.state.load_error is not None:
            return JSONResponse({"status": "error", "error": app.state.load_error}, status_code=500)
        if app.state.service is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        s = app.state.service
        return JSONResponse({"status": "ok", "slots_idle": len(s.slots) - s.busy, "slots_busy": s.busy,
                             "queue": s.waiting})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((files("lemonslice.server") / "static" / "chat.html").read_text(encoding="utf-8"))

    _model_routes(app, service, metrics)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        s = service()
        job = await asyncio.to_thread(_built, build_chat, s, body, default_thinking)
        return await _answer(app, s, job, body, request, metrics, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        s = service()
        job = await asyncio.to_thread(_built, build_completion, s, body)
        return await _answer(app, s, job, body, request, metrics, chat=False)

    return app


def _model_routes(app: FastAPI, service: Callable[[], ModelService], metrics: Metrics) -> None:
    """What describes the model rather than running it: its id, metrics, its tokenizer."""

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        s = service()
        return {"object": "list", "data": [{"id": s.model_id, "object": "model", "created": int(s.started),
                                            "owned_by": "lemonslice"}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        s = app.state.service
        io = s.engine.residency.io_counters if s is not None and hasattr(s.engine, "residency") else None
        return Response(metrics.render(s, io), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        tok = service().tok
        return {"tokens": tok.encode(body.content, add_special=body.add_special, parse_special=body.parse_special)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        tok = service().tok
        if any(not 0 <= t < tok.n_vocab for t in body.tokens):
            raise ApiError(400, f"token ids must be in [0, {tok.n_vocab})")
        return {"content": tok.decode(body.tokens)}


def _built(build: Callable[..., Job], *args: Any) -> Job:
    try:
        return build(*args)
    except (LemonsliceError, ValueError) as e:
        raise ApiError(400, str(e)) from None


class _Guard:
    """The API key on every path but /health, and the request counter: plain ASGI, so that a
    handler still sees its client disconnect (Starlette's BaseHTTPMiddleware hides it)."""

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics):
        self.app, self.key, self.metrics = app, api_key, metrics

    def _allowed(self, scope: dict[str, Any]) -> bool:
        if self.key is None or scope["path"] in _OPEN:
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if scope["path"] == "/" and not token:  # a browser opening the page
            query = dict(p.partition("=")[::2] for p in scope.get("query_string", b"").decode().split("&"))
            token = unquote(query.get("key", ""))
        return secrets.compare_digest(token.encode(), self.key.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in _KNOWN else "other"
        if not self._allowed(scope):
            self.metrics.requests.labels(path, "401").inc()
            response = _error(401, "invalid or missing API key", "authentication_error", "invalid_api_key")
            return await response(scope, receive, send)
        status = {"code": 500}

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.requests.labels(path, str(status["code"])).inc()


def _install_errors(app: FastAPI, metrics: Metrics, api_key: str | None) -> None:
    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.kind, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = first.get("msg", "invalid request")
        return _error(400, f"{where}: {msg}" if where else msg)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))


_KNOWN = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize",
          "/detokenize"}


async def _answer(app: FastAPI, s: ModelService, job: Job, body: Any, request: Request, metrics: Metrics,
                  chat: bool) -> Response:
    """Queue `job` for a slot, run it, and answer with its events (JSON, or SSE when streamed)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    job.emit = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
    try:
        slot = await _slot(s, job, request)
    except Busy as e:
        return _error(503, str(e), "server_error", "busy")
    if slot is None:  # the client left while it waited in the queue
        return Response(status_code=499)
    task = asyncio.create_task(s.run(job, slot))
    app.state.tasks.add(task)
    task.add_done_callback(app.state.tasks.discard)
    reply = _Reply(new_id("chatcmpl" if chat else "cmpl"), s.model_id, chat)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(job, queue, reply, usage, metrics), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    events = []
    try:
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                    return Response(status_code=499)
                continue
            events.append(ev)
            if ev.kind in ("done", "error"):
                break
    except asyncio.CancelledError:
        job.cancel.set()
        raise
    if ev.kind == "error":
        return _error(500, ev.text, "server_error")
    _count(metrics, ev)
    return JSONResponse(reply.whole(events))


async def _slot(s: ModelService, job: Job, request: Request) -> Slot | None:
    """A slot for `job`, or None when the client disconnects while it waits (its queue place
    is given back at once)."""
    wait = asyncio.ensure_future(s.acquire(job.prompt.ids))
    while True:
        done, _ = await asyncio.wait({wait}, timeout=0.25)
        if done:
            return wait.result()
        if await request.is_disconnected():
            wait.cancel()
            try:
                slot = await wait
            except asyncio.CancelledError:
                return None
            await s.release(slot)  # it got one just before the cancel
            return None


async def _stream(job: Job, queue: asyncio.Queue[Event], reply: "_Reply", usage: bool,
                  metrics: Metrics) -> AsyncIterator[str]:
    try:
        yield _sse(reply.chunk({"role": "assistant", "content": ""} if reply.chat else {"text": ""}))
        while True:
            ev = await queue.get()
            if ev.kind == "error":
                yield _sse(error_body(ev.text, "server_error"))
                break
            if ev.kind == "done":
                assert ev.outcome is not None
                _count(metrics, ev)
                yield _sse(reply.chunk({} if reply.chat else {"text": ""}, ev.outcome.finish_reason))
                if usage:
                    yield _sse(reply.usage_chunk(ev.outcome))
                break
            yield _sse(reply.chunk(reply.delta(ev)))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a client gone mid-stream: free the slot after this step


def _count(metrics: Metrics, ev: Event) -> None:
    o = ev.outcome
    assert o is not None
    metrics.finished(o.prompt_tokens, o.cached_tokens, o.completion_tokens, o.prefill_tps, o.decode_tps)


def _sse(obj: dict[str, Any]) -> str:
    # ASCII escapes: U+2028 and friends would break clients that split lines like str.splitlines.
    return f"data: {json.dumps(obj)}\n\n"


class _Reply:
    """OpenAI's response shapes for one reply (chat or text completion)."""

    def __init__(self, rid: str, model: str, chat: bool):
        self.id, self.model, self.chat, self.created = rid, model, chat, now()

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def delta(self, ev: Event) -> dict[str, Any]:
        if not self.chat:
            return {"text": ev.text}
        if ev.kind == "reasoning":
            return {"reasoning_content": ev.text, "reasoning": ev.text}
        if ev.kind == "tool_call":
            assert ev.call is not None
            return {"tool_calls": [_call(ev.call, ev.index)]}
        return {"content": ev.text}

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._head("chat.completion.chunk") | {"choices": [choice]}
        choice = {"index": 0, "text": delta.get("text", ""), "logprobs": None, "finish_reason": finish}
        return self._head("text_completion") | {"choices": [choice]}

    def usage_chunk(self, o: Any) -> dict[str, Any]:
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {
            "choices": [], "usage": _usage(o)}

    def whole(self, events: list[Event]) -> dict[str, Any]:
        o = events[-1].outcome
        content = "".join(e.text for e in events if e.kind == "content")
        if not self.chat:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": o.finish_reason}
            return self._head("text_completion") | {"choices": [choice], "usage": _usage(o)}
        calls = [_call(e.call, e.index) for e in events if e.kind == "tool_call"]
        reasoning = "".join(e.text for e in events if e.kind == "reasoning")
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
        if reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": o.finish_reason}
        return self._head("chat.completion") | {"choices": [choice], "usage": _usage(o)}


def _call(call: Any, index: int) -> dict[str, Any]:
    return {"index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def _usage(o: Any) -> dict[str, Any]:
    return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
            "total_tokens": o.prompt_tokens + o.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": o.cached_tokens}}
