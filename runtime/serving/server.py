"""`ortseq serve`: load the export, run the app under uvicorn, drain on SIGTERM and exit 0."""

from __future__ import annotations

import errno
import logging
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from ..errors import InvalidInputError
from ..model import Seq2SeqModel
from .app import create_app
from .batcher import BatchingConfig
from .schema import GRACEFUL_TIMEOUT_S, RequestLimits

logger = logging.getLogger("ortseq")


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    provider: str = "cpu"
    threads: int | None = None
    graceful_timeout_s: float = GRACEFUL_TIMEOUT_S
    max_connections: int = 256  # more concurrent connections get uvicorn's plain 503: bounds unqueued bodies too


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket bound to host:port, or InvalidInputError in one line (port taken, bad host).

    Bound before anything else so that a taken port is reported before the model loads and before any
    "ready" log line, which uvicorn would otherwise print before failing to bind."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidInputError(f"cannot listen on {host}:{port}: {exc}") from exc
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart while old ones linger
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise InvalidInputError(f"cannot listen on {host}:{port}: {reason}; choose another --port") from exc
    return sock


def serve(
    export_dir: Path,
    options: ServerOptions,
    limits: RequestLimits,
    batching: BatchingConfig,
    sock: socket.socket | None = None,
) -> None:
    """Blocks until SIGTERM/SIGINT. Bad export dirs and settings raise before the port is opened.
    sock: from bound_socket(options.host, options.port), bound by the caller (default: bound here)."""
    sock = sock or bound_socket(options.host, options.port)
    model = Seq2SeqModel.load(export_dir, provider=options.provider, threads=options.threads)
    model.tokenizer.read()  # every request has text: a bad tokenizer file fails here, before the port opens
    app = create_app(model, limits, batching)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        timeout_graceful_shutdown=options.graceful_timeout_s,
        limit_concurrency=options.max_connections,
        log_level="info",
        access_log=False,
    )
    # uvicorn drains on SIGTERM (stops accepting, finishes in-flight requests, runs the app's shutdown,
    # which empties the batch queue) and then re-raises the signal with the handler it found installed.
    # This handler makes that re-raise a no-op, so a drained server exits 0 instead of dying by SIGTERM.
    signal.signal(signal.SIGTERM, _drained)
    logger.info("serving %s on http://%s:%d", export_dir, options.host, options.port)
    uvicorn.Server(config).run(sockets=[sock])


def _drained(signum, frame) -> None:
    logger.info("drained after SIGTERM; exiting")
