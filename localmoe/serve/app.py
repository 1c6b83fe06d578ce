"""The OpenAI-compatible HTTP app (FastAPI on uvicorn): routes, errors, API key, loading.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models
    GET /health   GET /metrics   GET /v1/localmoe/stats

One model; generations run one at a time through a bounded FIFO queue (queue.py). Every error is
an OpenAI-shaped JSON body (schemas.APIError); nothing answers with a traceback. See docs/serve.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import LocalMoEError
from ..runtime import Runtime
from . import generation
from .generation import Defaults, Prepared, Result
from .metrics import CONTENT_TYPE, ServerMetrics
from .queue import Job, ModelQueue, QueueFull
from .schemas import APIError, ChatRequest, CompletionRequest, parse_body

log = logging.getLogger("localmoe.serve")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/v1/localmoe/stats")


@dataclass
class ServeConfig:
    model_id: str
    api_key: str | None = None
    queue: int = 16  # requests that may wait while one runs
    max_body: int = 4 << 20  # bytes of request body
    defaults: Defaults = field(default_factory=Defaults)


class ServerState:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.runtime: Runtime | None = None
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self.load_step: tuple[str, int, int] | None = None  # the loader's progress: (what, done, total)
        self.created = int(time.time())
        self.queue = ModelQueue(config.queue)
        self.metrics = ServerMetrics(
            lambda: self.runtime.stats() if self.runtime is not None else None,
            self.queue.depth,
            self.queue.running,
            config.queue,
        )


def model_id_for(path: str) -> str:
    name = os.path.basename(path)
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def create_app(
    loader: Callable[[], Runtime], config: ServeConfig, on_load_error: Callable[[str], None] | None = None
) -> FastAPI:
    """The app; `loader` opens the model on a background thread once the server starts (until it
    returns, /health answers 503, with the load's current step where the loader takes a
    `progress(what, done, total)` argument). `on_load_error(message)` hears a load that failed."""
    state = ServerState(config)

    def record_step(what: str, done: int, total: int) -> None:
        state.load_step = (what, done, total)

    def load() -> None:
        start = time.monotonic()
        try:
            state.runtime = (
                loader(progress=record_step) if "progress" in inspect.signature(loader).parameters else loader()
            )
            state.load_seconds = time.monotonic() - start
            log.info("model %s loaded in %.1f s", config.model_id, state.load_seconds)
        except LocalMoEError as exc:
            state.load_error = str(exc)
        except Exception as exc:  # the model file or the machine, not the request
            state.load_error = f"loading the model failed ({type(exc).__name__}: {exc})"
        if state.load_error is not None and on_load_error is not None:
            on_load_error(state.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=load, name="localmoe-load", daemon=True)
        thread.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.queue.close)
            thread.join(timeout=60)
            if state.runtime is not None:
                state.runtime.close()

    app = FastAPI(title="localmoe", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.localmoe = state
    _install_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=state.metrics)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = hmac.compare_digest(given.strip().encode(), config.api_key.encode()) and scheme.lower() == "bearer"
        if not ok:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer KEY'" if not header else "incorrect API key provided",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def runtime() -> Runtime:
        if state.runtime is None:
            if state.load_error is not None:
                raise APIError(
                    503, f"the model failed to load: {state.load_error}", type="server_error", code="model_load_failed"
                )
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                type="server_error",
                code="model_loading",
                headers={"Retry-After": "1"},
            )
        return state.runtime

    def check_model(name: str | None) -> None:
        if name is not None and name not in (config.model_id, config.model_id + ".gguf"):
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server has '{config.model_id}'",
                param="model",
                code="model_not_found",
            )

    async def read_body(request: Request) -> bytes:
        limit = config.max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413, f"the request body is {int(declared)} bytes; the limit is {limit}", code="request_too_large"
            )
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise APIError(413, f"the request body is over the {limit}-byte limit", code="request_too_large")
        except ClientDisconnect:
            raise APIError(
                400, "the client disconnected while sending the request", code="client_disconnected"
            ) from None
        return bytes(body)

    async def submit(request: Request, prompt: Any, req: Any, kind: str) -> Response:
        rt = runtime()
        check_model(req.model)
        prep: Prepared = await run_in_threadpool(generation.prepare, rt, prompt, req, config.defaults)
        job = Job(asyncio.get_running_loop(), lambda job: generation.run(job, rt, prep, state.metrics))
        try:
            state.queue.submit(job)
        except QueueFull as exc:
            prep.iterator.close()
            raise APIError(
                429,
                (
                    f"the server is busy: {state.queue.capacity} requests are already waiting; retry in "
                    f"{exc.retry_after} s"
                ),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "created": int(time.time()), "model": config.model_id}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _JobStream(
                job,
                _sse(job, kind, meta, prep, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await _wait(request, job)
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(_full_body(kind, meta, prep, result))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        runtime()
        req = parse_body(await read_body(request), ChatRequest)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return await submit(request, messages, req, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        runtime()
        req = parse_body(await read_body(request), CompletionRequest)
        return await submit(request, req.text(), req, "text")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request)
        entry: dict[str, Any] = {
            "id": config.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "localmoe",
        }
        rt = state.runtime
        if rt is not None:
            spec = rt.spec
            entry["meta"] = {
                "architecture": spec.arch.name,
                "n_ctx": rt.n_ctx,
                "n_vocab": spec.n_vocab,
                "n_layer": spec.n_layer,
                "n_expert": spec.n_expert,
                "n_expert_used": spec.n_expert_used,
                "device": rt.device.type,
                "gpu_budget": rt.gpu_budget,
                "policy": rt.policy,
                "on_miss": rt.on_miss,
            }
        return JSONResponse({"object": "list", "data": [entry]})

    @app.get("/health")
    async def health() -> Response:
        if state.runtime is not None:
            return JSONResponse({"status": "ok"})
        if state.load_error is not None:
            return JSONResponse({"status": "error", "message": state.load_error}, status_code=503)
        step = state.load_step
        body = {"status": "loading"} | (
            {"step": step[0], "done": step[1], "total": step[2]} if step is not None else {}
        )
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        authorize(request)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/localmoe/stats")
    async def stats(request: Request) -> Response:
        authorize(request)
        return JSONResponse(runtime().stats().as_dict())

    return app


# -- responses ------------------------------------------------------------------------------------
def _usage(prep: Prepared, result: Result) -> dict[str, int]:
    return {
        "prompt_tokens": prep.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": prep.prompt_tokens + result.completion_tokens,
    }


def _full_body(kind: str, meta: dict[str, Any], prep: Prepared, result: Result) -> dict[str, Any]:
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "finish_reason": result.finish_reason,
            "logprobs": None,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        obj = "text_completion"
    return {
        **meta,
        "object": obj,
        "choices": [choice],
        "usage": _usage(prep, result),
        "timings": result.timings,
        "moe": result.moe,
    }


def _sse_data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _sse(job: Job, kind: str, meta: dict[str, Any], prep: Prepared, include_usage: bool) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
        if kind == "chat":
            d: dict[str, Any] = (
                {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
            )
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return {**meta, "object": obj, "choices": [choice]}

    if kind == "chat":
        yield _sse_data(chunk(None, first=True))
    while True:
        event, payload = await job.events.get()
        if event == "delta":
            yield _sse_data(chunk(payload))
        elif event == "end":
            result: Result = payload
            yield _sse_data(chunk(None, result.finish_reason) | {"timings": result.timings, "moe": result.moe})
            if include_usage:
                yield _sse_data({**meta, "object": obj, "choices": [], "usage": _usage(prep, result)})
            yield b"data: [DONE]\n\n"
            return
        elif event == "error":
            yield _sse_data(_internal(payload).body())
            yield b"data: [DONE]\n\n"
            return
        else:  # cancelled
            return


class _JobStream(StreamingResponse):
    """An SSE response whose generation is cancelled when the client disconnects (Starlette
    cancels the body iterator then) or when the response ends any other way."""

    def __init__(self, job: Job, content: AsyncIterator[bytes], **kw: Any):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            self.job.cancel()


async def _wait(request: Request, job: Job) -> Result | None:
    """A non-streamed request's result; None if the client disconnected first (the job is cancelled)."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        while True:
            event, payload = await job.events.get()
            if event == "end":
                return payload
            if event == "error":
                raise _internal(payload)
            if event == "cancelled":
                return None
    finally:
        watcher.cancel()
        job.cancel()


def _internal(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, LocalMoEError):
        return APIError(400, str(exc), code="invalid_value")
    log.error("generation failed", exc_info=exc)
    return APIError(
        500, f"the generation failed ({type(exc).__name__}: {exc})", type="server_error", code="internal_error"
    )


# -- errors and request counting ------------------------------------------------------------------
def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = (
            f"no endpoint {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        )
        return JSONResponse(
            APIError(exc.status_code, message, code=code).body(),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def local_error(request: Request, exc: LocalMoEError) -> Response:
        e = APIError(400, str(exc), code="invalid_value")
        return JSONResponse(e.body(), status_code=400)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        e = APIError(500, f"internal error ({type(exc).__name__})", type="server_error", code="internal_error")
        return JSONResponse(e.body(), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(LocalMoEError, local_error)
    app.add_exception_handler(Exception, unexpected)


class _CountRequests:
    """ASGI middleware: count every answer by endpoint and status code (unknown paths as 'other')."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
