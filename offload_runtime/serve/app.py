"""The HTTP side: FastAPI routes in OpenAI's shapes over the engine worker.

    app = create_app(engine, ServeSettings(model_name="demo"))

A completion request is read (bounded in size), checked (protocol.py), tokenised off the event loop, admitted
if the batch and its queue have room (else 429 with Retry-After), and handed to the worker thread; its updates
come back as SSE chunks (`stream: true`) or as one JSON reply. A client that goes away cancels its request:
the worker drops its row before the next step.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..api.text import watch
from ..decode.request import Request as EngineRequest
from ..errors import ContextLengthError, OffloadError, UsageError
from .protocol import ApiError, CompletionSpec, ReplyHead, bad, error_body, parse_request, usage_body
from .worker import EngineWorker, Job, Update, WorkerStatus

log = logging.getLogger("offload_runtime.serve")
CLIENT_GONE = 499  # nginx's status for "the client closed the connection"; no client ever reads it


@dataclass(frozen=True)
class ServeSettings:
    model_name: str  # what /v1/models lists and requests must name (or leave out)
    api_key: str | None = None  # every path but /health needs "Authorization: Bearer <key>"
    max_queue: int = 16  # requests that may wait for a row beyond the batch; then 429
    max_request_bytes: int = 1 << 20
    log_prompts: bool = False


class Reply:
    """The event loop's end of one job: its updates in order. `done` once the last one has arrived."""

    def __init__(self, on_final: Callable[[], None]):
        self.updates: asyncio.Queue[Update] = asyncio.Queue()
        self.done = False
        self._on_final = on_final

    def deliver(self, update: Update) -> None:  # runs on the loop (call_soon_threadsafe)
        self.updates.put_nowait(update)
        if update.final and not self.done:
            self.done = True
            self._on_final()


class Server:
    """What the routes share: the engine, its worker, the admission count."""

    def __init__(self, engine: Any, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.capacity = engine.batch_size + settings.max_queue
        self.in_flight = 0  # admitted, not finished (running or queued); only the loop changes it
        self.rejected = 0
        self.created = int(time.time())
        self.worker: EngineWorker | None = None
        # One thread tokenises prompts and renders chat templates: off the loop, and never two at once.
        self._prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="offload-prepare")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = EngineWorker(self.engine, loop, log_prompts=self.settings.log_prompts)
        self.worker.start()

    def stopping(self) -> None:
        """The server was told to exit: end the requests in flight now (each gets a "shutting down" error and its
        stream its [DONE]), so their connections close within the graceful-shutdown time instead of being cut."""
        if self.worker is not None:
            self.worker.stop_soon()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    # --- admission

    def retry_after(self) -> str:
        # A row frees up about every (mean request time / batch size) seconds.
        mean = self.worker.status.mean_request_s if self.worker else 0.0
        return str(max(1, math.ceil(mean / self.engine.batch_size)))

    async def admit(self, spec: CompletionSpec, job_id: str, arrived: float) -> tuple[Job, Reply]:
        if self.worker is None or not self.worker.alive:
            raise ApiError(503, "the engine is not running (the server is starting or stopping); retry later",
                           type="server_error", code="unavailable", headers={"Retry-After": self.retry_after()})
        if self.in_flight >= self.capacity:
            self.rejected += 1
            raise ApiError(429, f"the server is busy: {self.engine.batch_size} requests are running and "
                                f"{self.settings.max_queue} waiting, the most it queues; retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": self.retry_after()})
        self.in_flight += 1  # held from here, so requests tokenising at the same time cannot overfill the queue
        try:
            loop = asyncio.get_running_loop()
            request = await loop.run_in_executor(self._prepare_pool, self._prepare, spec)
        except BaseException:
            self.in_flight -= 1
            raise
        text = self.engine.codec.stream(spec.stop)
        watch(request, text)
        reply = Reply(self._released)
        job = Job(job_id, request, text, reply.deliver, arrived,
                  prompt=spec.messages if spec.kind == "chat" else spec.prompt)
        self.worker.submit(job)
        return job, reply

    def _released(self) -> None:
        self.in_flight -= 1

    def _prepare(self, spec: CompletionSpec) -> EngineRequest:
        """Prompt ids and the engine's request (its sampling values checked there); runs in the prepare thread."""
        from jinja2 import TemplateError

        codec = self.engine.codec
        try:
            ids = codec.apply_chat_template(spec.messages) if spec.kind == "chat" else codec.encode(spec.prompt)
            return self.engine.new_request(ids, temperature=spec.temperature, top_p=spec.top_p,
                                           max_new_tokens=spec.max_tokens, seed=spec.seed,
                                           ignore_eos=spec.ignore_eos)
        except ContextLengthError as e:
            raise bad(str(e), param="messages" if spec.kind == "chat" else "prompt",
                      code="context_length_exceeded") from None
        except UsageError as e:
            raise bad(str(e)) from None
        except TemplateError as e:
            raise bad(f"the model's chat template refused these messages: {e}", param="messages") from None

    # --- a completion, whole or streamed

    async def complete(self, request: Request, kind: str) -> Response:
        arrived = time.perf_counter()
        body = await read_json(request, self.settings.max_request_bytes)
        spec = parse_request(body, kind, self.settings.model_name)
        head = ReplyHead(kind, ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12),
                         int(time.time()), self.settings.model_name)
        job, reply = await self.admit(spec, head.id, arrived)
        if spec.stream:
            return EventStream(self._chunks(reply, head, spec), lambda: self._forget(job, reply))
        return await self._whole(request, job, reply, head)

    def _forget(self, job: Job, reply: Reply) -> None:
        """The client is gone before its reply ended: free its row."""
        if not reply.done and self.worker is not None:
            self.worker.cancel(job)

    async def _whole(self, request: Request, job: Job, reply: Reply, head: ReplyHead) -> Response:
        gone = asyncio.ensure_future(_disconnected(request))
        pieces: list[str] = []
        try:
            while True:
                update = asyncio.ensure_future(reply.updates.get())
                await asyncio.wait({update, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not update.done():
                    update.cancel()
                    return Response(status_code=CLIENT_GONE)
                u = update.result()
                pieces.append(u.text)
                if u.failure is not None:
                    raise ApiError(u.failure.status, u.failure.message, type="server_error")
                if u.outcome is not None:
                    o = u.outcome
                    return JSONResponse(head.completion("".join(pieces), o.finish_reason,
                                                        usage_body(o.prompt_tokens, o.completion_tokens)))
        finally:
            gone.cancel()
            self._forget(job, reply)

    async def _chunks(self, reply: Reply, head: ReplyHead, spec: CompletionSpec) -> AsyncIterator[str]:
        usage = spec.include_usage
        if head.kind == "chat":
            yield sse(head.chunk(role=True, text="", include_usage=usage))
        while True:
            u = await reply.updates.get()
            if u.text:
                yield sse(head.chunk(text=u.text, include_usage=usage))
            if u.failure is not None:
                yield sse(error_body(u.failure.message, "server_error"))
                break
            if u.outcome is not None:
                o = u.outcome
                yield sse(head.chunk(finish_reason=o.finish_reason, include_usage=usage))
                if usage:
                    yield sse(head.chunk(final_usage=True, usage=usage_body(o.prompt_tokens, o.completion_tokens)))
                break
        yield "data: [DONE]\n\n"

    # --- status

    def health(self) -> JSONResponse:
        alive = self.worker is not None and self.worker.alive
        st = self.worker.status if self.worker is not None else WorkerStatus(alive=False)
        body = {"status": "ok" if alive else "unavailable", "model": self.settings.model_name,
                "speculative": self.engine.draft is not None, "offloaded": self.engine.offloaded,
                "batch_size": self.engine.batch_size, "running": st.running,
                "waiting": max(0, self.in_flight - st.running), "max_queue": self.settings.max_queue,
                "max_seq_len": self.engine.max_seq_len, "sweeps": st.sweeps,
                "completion_tokens": st.completion_tokens,
                "requests": {"finished": st.finished, "cancelled": st.cancelled, "failed": st.failed,
                             "rejected": self.rejected}}
        return JSONResponse(body, status_code=200 if alive else 503)

    def model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": self.created,
                "owned_by": "offload-runtime", "max_model_len": self.engine.max_seq_len}


class EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends: finished, the client gone (Starlette
    cancels the stream, or sending fails), or never started."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing (413) more than `limit` bytes before reading them all."""
    too_big = ApiError(413, f"the request body is larger than {limit} bytes, the most this server takes "
                            f"(--max-request-bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise too_big
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise bad(f"the request body is not valid JSON ({e})") from None


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class BearerAuth:
    """Every path but /health needs `Authorization: Bearer <key>`. The key's and the header's SHA-256 digests
    are compared with hmac.compare_digest: the time taken says nothing about the key, not even its length."""

    def __init__(self, app: ASGIApp, key: str | None):
        self.app = app
        self.digest = None if key is None else hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.digest is not None and scope["path"] != "/health":
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, token = given.partition(b" ")
            matches = hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.digest)
            if not (matches and scheme.lower() == b"bearer"):
                what = "wrong API key" if given else "no API key"
                response = JSONResponse(
                    error_body(f"{what}: send the header 'Authorization: Bearer <key>' with the key the server was "
                               f"started with (--api-key)", "invalid_request_error", code="invalid_api_key"),
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Any, settings: ServeSettings) -> FastAPI:
    """The OpenAI-compatible app over a loaded engine; its worker thread runs while the app does (lifespan)."""
    if engine.tokenizer is None:
        raise UsageError(f"{engine.name} ships no tokenizer; the server needs one to read prompts and write text")
    server = Server(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(server.stop)

    app = FastAPI(title="offload-runtime", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(BearerAuth, key=settings.api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        if e.status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, e.message)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(OffloadError)
    async def offload_error(request: Request, e: OffloadError) -> JSONResponse:
        return JSONResponse(error_body(str(e), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.complete(request, "text")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves "
                                f"{settings.model_name!r}", code="model_not_found")
        return server.model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        return server.health()

    return app
