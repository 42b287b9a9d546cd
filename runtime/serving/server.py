"""`ortseq serve`: load the export, run the app under uvicorn, drain on SIGTERM and exit 0."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from ortseq.runtime.model import Seq2SeqModel
from ortseq.runtime.serving.app import create_app
from ortseq.runtime.serving.batcher import BatchingConfig
from ortseq.runtime.serving.schema import RequestLimits

logger = logging.getLogger("ortseq")


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    provider: str = "cpu"
    threads: int | None = None
    graceful_timeout_s: float = 60.0  # on SIGTERM, in-flight requests get this long to finish
    max_connections: int = 256  # more concurrent connections get uvicorn's plain 503: bounds unqueued bodies too


def serve(export_dir: Path, options: ServerOptions, limits: RequestLimits, batching: BatchingConfig) -> None:
    """Blocks until SIGTERM/SIGINT. Bad export dirs and settings raise before the port is opened."""
    model = Seq2SeqModel.load(export_dir, provider=options.provider, threads=options.threads)
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
    uvicorn.Server(config).run()


def _drained(signum, frame) -> None:
    logger.info("drained after SIGTERM; exiting")
