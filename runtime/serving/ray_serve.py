"""ortseq's HTTP API as a Ray Serve deployment: `ortseq serve DIR --replicas N`, or in your own Serve config
`import_path: ortseq.runtime.serving.ray_serve:app_builder` with `args: {export_dir: ..., replicas: ...}`.

Each replica is the single-process server's FastAPI app (same routes, schema, limits, dynamic batcher and
error responses) around its own model, so answers equal `ortseq serve`'s; Ray Serve's proxy spreads
requests over the replicas. /metrics and /readyz answer for the replica that got the request.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import asdict
from pathlib import Path

from ..errors import InvalidInputError
from ..ray_batch import import_ray, ray_log_options, start_local_ray
from .batcher import BatchingConfig
from .schema import GRACEFUL_TIMEOUT_S, RequestLimits

logger = logging.getLogger("ortseq")
APP_NAME = "ortseq"
STOPPING_POLL_S = 0.25  # how often a stopping replica looks whether its requests are done (Ray's default: 2 s)

ray = import_ray()
from ray import serve  # noqa: E402  (after import_ray, which turns a missing Ray into a usage error)
from ray.serve.schema import LoggingConfig  # noqa: E402


@serve.deployment
@serve.ingress()
class OrtseqDeployment:
    """One replica: loads the export once and serves ortseq's FastAPI app over it."""

    def __init__(self, export_dir: str, provider: str, threads: int | None, limits: dict, batching: dict):
        from ..model import Seq2SeqModel

        self.model = Seq2SeqModel.load(export_dir, provider=provider, threads=threads)
        self.limits, self.batching = RequestLimits(**limits), BatchingConfig(**batching)

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.model, self.limits, self.batching)


def build_app(
    export_dir: str | Path,
    replicas: int = 1,
    provider: str = "cpu",
    threads: int | None = None,
    limits: RequestLimits | None = None,
    batching: BatchingConfig | None = None,
    graceful_timeout_s: float = GRACEFUL_TIMEOUT_S,
):
    """The deployment bound to an export: pass it to serve.run. A replica being stopped takes no new
    requests and finishes those it has, queued ones too, for up to graceful_timeout_s."""
    if replicas < 1:
        raise InvalidInputError(f"replicas must be at least 1, got {replicas}")
    deployment = OrtseqDeployment.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": threads or 1, "num_gpus": int(provider == "cuda")},
        graceful_shutdown_timeout_s=graceful_timeout_s,
        graceful_shutdown_wait_loop_s=STOPPING_POLL_S,
    )
    limits, batching = limits or RequestLimits(), batching or BatchingConfig()
    return deployment.bind(str(export_dir), provider, threads, asdict(limits), asdict(batching))


def app_builder(args: dict):
    """For Ray Serve configs and `serve run`: export_dir (required), replicas, provider, threads, and the
    limits and batching settings of `ortseq serve` by their field names (max_batch_size, max_inputs, ...)."""
    args = dict(args)
    if "export_dir" not in args:
        raise InvalidInputError("app_builder needs export_dir")
    fields = {name: args.pop(name) for name in list(args) if name in RequestLimits.__dataclass_fields__}
    limits = RequestLimits(**{name: _number(value) for name, value in fields.items()})
    fields = {name: args.pop(name) for name in list(args) if name in BatchingConfig.__dataclass_fields__}
    batching = BatchingConfig(**{name: _number(value) for name, value in fields.items()})
    export_dir = args.pop("export_dir")
    replicas, provider = int(args.pop("replicas", 1)), args.pop("provider", "cpu")
    threads = args.pop("threads", None)
    if args:
        raise InvalidInputError(f"app_builder: unknown arguments {sorted(args)}")
    return build_app(export_dir, replicas, provider, None if threads is None else int(threads), limits, batching)


def _number(value):
    """`serve run ... max_wait_ms=5` passes strings: numbers as numbers, the rest (scheduler=inflight) unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        return value


def serve_on_ray(
    export_dir: Path,
    host: str,
    port: int,
    replicas: int,
    provider: str = "cpu",
    threads: int | None = None,
    limits: RequestLimits | None = None,
    batching: BatchingConfig | None = None,
    address: str | None = None,
    graceful_timeout_s: float = GRACEFUL_TIMEOUT_S,
    verbose: bool = False,
) -> None:
    """Blocks until SIGTERM/SIGINT, then drains: the application is deleted first, its replicas finishing
    the requests they hold (up to graceful_timeout_s) while Ray Serve's proxy is still there to answer
    them, and only then is Serve shut down. Without an address (nor RAY_ADDRESS), starts a local Ray bound
    to 127.0.0.1. Ray's and Ray Serve's own log lines (its controller, proxy and replicas) show only with
    verbose; no access log, as `ortseq serve` without --replicas."""
    from ..model import Seq2SeqModel
    from .app import server_settings

    probe = Seq2SeqModel.load(export_dir, threads=1)  # a bad export or setting fails here, before Ray starts
    probe.tokenizer.read()
    server_settings(probe, limits, batching)
    del probe
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **ray_log_options(verbose))
    else:
        start_local_ray(ray, num_cpus=max(os.cpu_count() or 1, replicas * (threads or 1)), verbose=verbose)
    stop = threading.Event()
    # ray.init installs a SIGTERM handler that exits at once: ours replaces it before the port opens
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve_logs = LoggingConfig(log_level="INFO" if verbose else "WARNING", enable_access_log=False)
        logging.getLogger("ray.serve").setLevel(serve_logs.log_level)  # this process's part of Serve
        serve.start(http_options={"host": host, "port": port}, logging_config=serve_logs)
        app = build_app(export_dir, replicas, provider, threads, limits, batching, graceful_timeout_s)
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=serve_logs)
        logger.info("serving %s on http://%s:%d with %d Ray Serve replicas", export_dir, host, port, replicas)
        signal.signal(signal.SIGINT, lambda *_: stop.set())  # before this, Ctrl-C interrupts the start at once
        while not stop.wait(1.0):  # a timed wait, so the main thread gets to run the handlers
            pass
        logger.info("draining: the replicas finish the requests they hold (at most %g s)", graceful_timeout_s)
        serve.delete(APP_NAME)  # blocks until every replica has stopped
        serve.shutdown()  # before the delete, it would take the proxy and every open connection with it
        logger.info("drained; exiting")
    finally:
        ray.shutdown()
