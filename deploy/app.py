"""The HTTP app (FastAPI): OpenAI-compatible routes, a health route and the live page.

    app = create_app(local_backend(ServeConfig()))   # in-process (tests, ``uvicorn``)
    # deploy.serve_app wraps the same factory in a Ray Serve deployment (``serve.ingress``)

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /`` (the page). Every error is OpenAI's JSON error object: 400 for bad input
(invalid JSON, wrong types, empty messages, options out of range, over-long prompts), 401 for a
missing or wrong API key, 404 for an unknown model or route, 413 for an oversized body, 429 with
``Retry-After`` when the host's queue is full, 503 when the host is gone. Bodies are parsed as JSON
only.
"""

from __future__ import annotations

import secrets
from contextlib import aclosing
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cache_service.errors import ConfigError, HogwildError
from cluster.host import HostBusyError
from deploy.backend import ServeBackend, SessionOptions
from deploy.page import page_html
from deploy.schema import ChatCompletionRequest, CompletionRequest, HogwildFields, error_body
from deploy.stream import OpenAIFormat, session_events, sse


class APIError(Exception):
    """An error answered as OpenAI's JSON error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.code, self.param), self.status,
                            headers=self.headers)


def create_app(backend: ServeBackend, *, watch_disconnect: bool = True) -> FastAPI:
    """The app over a started backend (the backend's owner closes it). ``watch_disconnect``: poll
    the request for a client disconnect while its session runs (plain ASGI servers tell a waiting
    request nothing else); Serve cancels a request whose client left by itself, so its deployment
    turns this off."""
    app = FastAPI(title="Hogwild! Inference", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.state.watch_disconnect = watch_disconnect
    _errors(app, backend)
    app.add_middleware(_BodyLimit, limit=backend.config.max_body_bytes)
    auth = [Depends(_authorize(backend))]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html(backend.model_id, backend.config))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": backend.model_id, **backend.stats()}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(backend)]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> dict:
        _check_model(backend, model_id)
        return _model_card(backend)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        return await _complete(backend, body, body.problem(), "chat", request)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _complete(backend, body, body.problem(), "completion", request)

    return app


async def _complete(backend: ServeBackend, body: HogwildFields, problem: str, kind: str, request: Request) -> Any:
    _check_model(backend, body.model)
    options = SessionOptions(workers=body.workers, layout=body.layout, mode=body.mode, max_steps=body.budget,
                             check_every=body.check_every, max_step_tokens=body.max_step_tokens,
                             temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    handle = backend.submit(problem, options)  # ConfigError / HostBusyError: answered by the handlers
    fmt = OpenAIFormat(kind, backend.model_id, body.stop)
    if body.stream:
        usage = body.stream_options is None or body.stream_options.include_usage
        return StreamingResponse(_stream(backend, handle, fmt, usage, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async with aclosing(session_events(handle, _disconnected(request), backend.cancel)) as batches:
        async for batch in batches:
            for event in batch:
                fmt.chunks(event)  # keeps the prompt size and the finisher for the response
    if not handle.done.is_set():  # the client left
        return JSONResponse(error_body("the client disconnected", "invalid_request_error"), 499)
    return JSONResponse(fmt.response(handle.builder.result()))


async def _stream(backend: ServeBackend, handle, fmt: OpenAIFormat, usage: bool, request: Request):
    """SSE: the chunks of each batch of events in one write, then the finish, usage and [DONE]."""
    try:
        async with aclosing(session_events(handle, _disconnected(request), backend.cancel)) as batches:
            async for batch in batches:
                text = "".join(sse(chunk) for event in batch for chunk in fmt.chunks(event))
                if text:
                    yield text
        if not handle.done.is_set():
            return  # the client left; the session is cancelled
        final = fmt.final(handle.builder.result())
        yield "".join(sse(chunk) for chunk in (final if usage else final[:1]))
    except HogwildError as err:  # the session failed on the host (not the client's doing)
        yield sse(error_body(f"the session failed: {err}", "server_error", "session_failed"))
    yield sse("[DONE]")


def _disconnected(request: Request):
    return request.is_disconnected if request.app.state.watch_disconnect else None


def _model_card(backend: ServeBackend) -> dict:
    return {"id": backend.model_id, "object": "model", "created": 0, "owned_by": "hogwild",
            "max_workers": backend.config.max_workers, "max_context": backend.info.max_context}


def _check_model(backend: ServeBackend, model: str | None) -> None:
    if not backend.knows(model):
        raise APIError(404, f"the model {model!r} does not exist here; this server serves {backend.model_id!r} "
                       "(GET /v1/models)", code="model_not_found", param="model")


def _authorize(backend: ServeBackend):
    async def check(request: Request) -> None:
        key = backend.config.key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return check


def _errors(app: FastAPI, backend: ServeBackend) -> None:
    retry = {"Retry-After": str(backend.config.retry_after_s)}

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if err.status_code == 404 else None
        return APIError(err.status_code, str(err.detail), code=kind, headers=dict(err.headers or {})).response()

    @app.exception_handler(HostBusyError)
    async def busy(_: Request, err: HostBusyError) -> JSONResponse:
        return APIError(429, str(err), "rate_limit_error", "server_busy", headers=retry).response()

    @app.exception_handler(ConfigError)
    async def bad_option(_: Request, err: ConfigError) -> JSONResponse:
        code = "context_length_exceeded" if "context" in str(err) or "characters" in str(err) else "invalid_value"
        return APIError(400, str(err), code=code).response()

    @app.exception_handler(HogwildError)
    async def unavailable(_: Request, err: HogwildError) -> JSONResponse:
        return APIError(503, f"the server cannot take sessions now: {err}", "server_error", "unavailable",
                        headers=retry).response()

    @app.exception_handler(_BodyTooLarge)
    async def too_large(_: Request, err: _BodyTooLarge) -> JSONResponse:
        return APIError(413, str(err), code="request_too_large").response()


def _validation_error(errors: list[dict]) -> APIError:
    """The first problem pydantic found, as one readable line naming the field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return APIError(400, "the body is not valid JSON: " + str(first.get("ctx", {}).get("error", "")).strip(),
                        code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "unknown field (see the API's fields in the README)"
    if first.get("type") == "missing" and not loc:
        message = "the body must be a JSON object"
    where = f"{field}: " if field else ""
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{where}{message}{more}", code="invalid_value", param=field)


class _BodyTooLarge(HogwildError):
    pass


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused (413) before it is parsed."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge(f"the request body is over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, send) -> None:
        body = APIError(413, f"the request body is over {self.limit} bytes", code="request_too_large").response()
        await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})

