"""The FastAPI app: POST /v1/summarize, GET /healthz, /readyz, /metrics, and JSON errors that say what to fix.

Every error response has the same shape (`ErrorResponse`): {"error": {"type", "message", "fields"}}.
Requests cannot name files: the export directory is fixed when the server starts.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from ..errors import InvalidInputError
from ..model import Seq2SeqModel
from .batcher import BatchingConfig, QueueFullError, ShuttingDownError
from .inference import Summary, summarize_rows
from .metrics import ServingMetrics
from .scheduler import make_batcher
from .schema import (
    ErrorResponse,
    RequestLimits,
    SummarizeRequest,
    SummarizeResponse,
    check_input_lengths,
    checked_settings,
    generation_kwargs,
)

logger = logging.getLogger("ortseq")

MAX_BODY_BYTES = 1 << 20
# A refused body is still read (and dropped) up to this many bytes, so that an ordinary client, which sends
# the whole body before it reads the answer, gets the 413 JSON instead of a broken pipe. Above it: closed.
DRAIN_LIMIT_FACTOR = 16
RETRY_AFTER_S = 1
SUMMARIZE_PATH = "/v1/summarize"
KNOWN_PATHS = (SUMMARIZE_PATH, "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")
CLIENT_CLOSED_REQUEST = 499  # nginx's code for "the client left": logged and counted, never read by anyone


class NotReadyError(Exception):
    """The model is still warming up (503)."""


def server_settings(
    model: Seq2SeqModel, limits: RequestLimits | None, batching: BatchingConfig | None
) -> tuple[RequestLimits, BatchingConfig]:
    """The limits resolved against the model, and the batching; InvalidInputError names a setting that
    cannot be honoured (callers check before they open a port or start replicas)."""
    limits = (limits or RequestLimits()).resolved(model)
    batching = batching or BatchingConfig()
    batching.check()
    if limits.max_inputs > batching.max_batch_size:
        raise InvalidInputError(
            f"max_inputs ({limits.max_inputs}) must not exceed max_batch_size ({batching.max_batch_size}): "
            "a request is never split over generate calls"
        )
    return limits, batching


def create_app(
    model: Seq2SeqModel,
    limits: RequestLimits | None = None,
    batching: BatchingConfig | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    limits, batching = server_settings(model, limits, batching)
    metrics = ServingMetrics()
    batcher = make_batcher(model, batching, metrics)
    warm_up: dict[str, asyncio.Task] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        warm_up["task"] = asyncio.create_task(batcher.run_in_worker(_warm_up, model))
        yield
        logger.info("draining: finishing queued requests")
        await batcher.close()

    def check_ready() -> None:
        task = warm_up.get("task")
        if task is None or not task.done():
            raise NotReadyError("the model is still warming up")
        if task.cancelled() or task.exception() is not None:
            raise NotReadyError(f"the model's warm-up failed ({task.exception()!r}); see the server log")

    app = FastAPI(
        title="ortseq",
        summary="Summarize texts with an exported seq2seq model (ONNX Runtime)",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's Swagger and ReDoc pages load their scripts from a CDN: blank offline
        redoc_url=None,
    )
    app.state.metrics, app.state.batcher, app.state.limits = metrics, batcher, limits
    _add_error_handlers(app, metrics)
    app.add_middleware(RequestAccounting, metrics=metrics, max_body_bytes=max_body_bytes)

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz", summary="The model is loaded and warmed up", responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict:
        check_ready()
        return {"status": "ready", "model": model.manifest.source, "family": model.manifest.family}

    @app.get("/docs", summary="This API, as a self-contained page", response_class=HTMLResponse)
    async def docs() -> HTMLResponse:
        return HTMLResponse(api_page(app.openapi()))

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=ServingMetrics.CONTENT_TYPE)

    @app.post(
        SUMMARIZE_PATH,
        summary="Summarize texts",
        response_model=SummarizeResponse,
        responses={status: {"model": ErrorResponse} for status in (400, 411, 413, 415, 422, 503)},
    )
    async def summarize(body: SummarizeRequest, request: Request):
        check_ready()
        settings = checked_settings(body, model, limits)
        rows = await asyncio.to_thread(model.tokenizer.token_ids, body.inputs)
        check_input_lengths([len(row) for row in rows], limits)
        summaries = await _unless_client_leaves(batcher.submit(settings, generation_kwargs(body), rows), request)
        if summaries is None:
            metrics.errors.labels("client_disconnected").inc()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return SummarizeResponse(
            summaries=[summary.text for summary in summaries],
            input_tokens=[summary.input_tokens for summary in summaries],
            output_tokens=[len(summary.output_ids) for summary in summaries],
        )

    return app


def api_page(openapi: dict) -> str:
    """An HTML page listing the endpoints and the request/response schemas: no script, nothing fetched."""
    rows = "".join(
        f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
        f"<td>{html.escape(operation.get('summary', ''))}</td></tr>"
        for path, operations in openapi["paths"].items()
        for method, operation in operations.items()
    )
    schemas = html.escape(json.dumps(openapi.get("components", {}).get("schemas", {}), indent=2))
    title = html.escape(openapi["info"]["title"])
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title} API</title></head><body>"
        f"<h1>{title} API</h1><p>{html.escape(openapi['info'].get('summary', ''))}. "
        f"The machine-readable description is at <a href='/openapi.json'>/openapi.json</a>.</p>"
        f"<table border='1' cellpadding='4'><tr><th>method</th><th>path</th><th>what</th></tr>{rows}</table>"
        f"<h2>Schemas</h2><pre>{schemas}</pre></body></html>"
    )


def _warm_up(model: Seq2SeqModel) -> None:
    """One short generate call, so the first client does not pay for onnxruntime's first-run setup."""
    summarize_rows(model, {"max_new_tokens": 2}, model.tokenizer.token_ids(["Warm up."]))
    logger.info("model warmed up: ready")


async def _unless_client_leaves(future: asyncio.Future, request: Request) -> list[Summary] | None:
    """The job's summaries, or None if the client disconnected first (the job is then withdrawn)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
        return future.result() if future.done() else None
    finally:
        gone.cancel()
        future.cancel()  # no-op when done; otherwise the batcher drops the job before running it


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def error_response(status: int, kind: str, message: str, fields: list[str] | None = None, **headers) -> JSONResponse:
    body = {"error": {"type": kind, "message": message, "fields": fields or []}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _add_error_handlers(app: FastAPI, metrics: ServingMetrics) -> None:
    def failed(status: int, kind: str, message: str, fields: list[str] | None = None, **headers) -> JSONResponse:
        metrics.errors.labels(kind).inc()
        return error_response(status, kind, message, fields, **headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type")
        if content_type is not None and not _is_json(content_type):  # FastAPI parses only JSON bodies as JSON
            return failed(
                415,
                "unsupported_media_type",
                f"the body was sent as {content_type.split(';')[0].strip() or 'an empty content type'}: "
                "send a JSON object with the header Content-Type: application/json",
            )
        errors = exc.errors()
        if any(error["type"] == "json_invalid" for error in errors):
            return failed(400, "invalid_json", "the request body is not valid JSON: send a JSON object")
        fields = [_describe(error) for error in errors]
        return failed(422, "invalid_request", f"the request does not match the schema: {'; '.join(fields)}", fields)

    @app.exception_handler(InvalidInputError)
    async def invalid_input(request: Request, exc: InvalidInputError) -> JSONResponse:
        return failed(422, "invalid_request", str(exc))

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        message = f"the server is at capacity ({exc}): retry after {RETRY_AFTER_S} s"
        return failed(503, "queue_full", message, **{"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(NotReadyError)
    @app.exception_handler(ShuttingDownError)
    async def not_ready(request: Request, exc: Exception) -> JSONResponse:
        return failed(503, "not_ready", f"{exc}: retry after {RETRY_AFTER_S} s", **{"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request")
        message = f"{exc.detail}: {request.method} {request.url.path}; the API is described at /openapi.json"
        return failed(exc.status_code, kind, message, **(exc.headers or {}))  # a 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=exc)
        return failed(500, "internal", f"internal error ({type(exc).__name__}); the server log has the details")


HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed"}


def _is_json(content_type: str) -> bool:
    """application/json or application/SOMETHING+json, parameters (charset) aside: what FastAPI reads as JSON."""
    main, _, sub = content_type.split(";")[0].strip().lower().partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def _describe(error: dict) -> str:
    """One pydantic error as 'where: what', with the allowed names for an unknown parameter. Inputs are
    counted from 1 ("input 2"), as in every other message and on the command line."""
    loc = [part for part in error["loc"] if part != "body"]
    if loc[:1] == ["inputs"] and len(loc) > 1 and isinstance(loc[1], int):
        loc = [f"input {loc[1] + 1}", *loc[2:]]
    where = ".".join(str(part) for part in loc) or "body"
    if error["type"] == "extra_forbidden":
        model = SummarizeRequest if len(error["loc"]) == 2 else SummarizeRequest.model_fields["parameters"].annotation
        return f"{where}: unknown field; allowed: {', '.join(model.model_fields)}"
    if error["type"] == "missing":
        return f"{where}: required"
    return f"{where}: {error['msg']} (got {error.get('input')!r})"


class RequestAccounting:
    """ASGI middleware: counts requests by path and status, times summarize requests, and refuses
    bodies over max_body_bytes (413) or without a Content-Length (411) before the app parses them
    (the body is read and dropped first, up to a bound, so that the client can read the refusal)."""

    def __init__(self, app, metrics: ServingMetrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), {}

        async def send_noting_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await _drain(receive, DRAIN_LIMIT_FACTOR * self.max_body_bytes)
            await refusal(scope, receive, send_noting_status)
        else:
            await self.app(scope, receive, send_noting_status)
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        self.metrics.requests.labels(path, str(status.get("code", CLIENT_CLOSED_REQUEST))).inc()
        if path == SUMMARIZE_PATH:
            self.metrics.latency.observe(time.monotonic() - started)

    def _refusal(self, scope) -> JSONResponse | None:
        if scope["method"] != "POST":
            return None
        length = dict(scope["headers"]).get(b"content-length")
        if length is None:
            self.metrics.errors.labels("too_large").inc()
            return error_response(411, "too_large", "send the body with a Content-Length header")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            self.metrics.errors.labels("too_large").inc()
            return error_response(
                413, "too_large", f"the body is over {self.max_body_bytes} bytes: send fewer or shorter inputs"
            )
        return None


async def _drain(receive, limit: int) -> None:
    """Read and drop the request body, at most about limit bytes of it."""
    received = 0
    while received <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
