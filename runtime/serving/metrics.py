"""The server's Prometheus metrics, in a registry of their own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

ERROR_KINDS = (
    "invalid_json",  # the body is not JSON
    "invalid_request",  # wrong types, unknown or out-of-range parameters, empty or too many or too long inputs
    "too_large",  # the body is over the size limit (or has no Content-Length)
    "queue_full",  # 503: the queue is at its bound
    "not_ready",  # 503: still warming up, or shutting down
    "client_disconnected",  # the client left before its summaries were ready
    "not_found",  # unknown path or method
    "internal",  # a bug or a runtime failure: 500
)


class ServingMetrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ortseq_requests", "HTTP requests by path and status code", ["path", "code"], registry=self.registry
        )
        self.errors = Counter("ortseq_errors", "Failed requests by kind", ["kind"], registry=self.registry)
        for kind in ERROR_KINDS:  # every kind is exported from the start, at 0
            self.errors.labels(kind)
        self.queue_depth = Gauge("ortseq_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.running_rows = Gauge(
            "ortseq_running_batch_rows", "Inputs in the generate call now running (0: idle)", registry=self.registry
        )
        self.latency = Histogram(
            "ortseq_request_latency_seconds",
            "Time from a summarize request's arrival to its response",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ortseq_batch_size", "Inputs merged into one generate call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.batch_seconds = Histogram(
            "ortseq_batch_seconds", "Time of one generate call", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.generated_tokens = Counter("ortseq_generated_tokens", "Tokens generated", registry=self.registry)
        self.tokens_per_second = Gauge(
            "ortseq_tokens_per_second",
            "Generated tokens per second of the latest generate call",
            registry=self.registry,
        )

        # the in-flight scheduler (runtime/serving/scheduler.py): one decoder step over the running rows
        self.steps = Counter(
            "ortseq_scheduler_steps", "Decoder steps of the in-flight scheduler", registry=self.registry
        )
        self.step_seconds = Histogram(
            "ortseq_step_seconds", "Time of one in-flight decoder step", buckets=STEP_BUCKETS, registry=self.registry
        )
        self.step_rows = Histogram(
            "ortseq_step_rows",
            "Decoder rows (beams) in one in-flight step",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.admit_seconds = Histogram(
            "ortseq_admit_seconds",
            "Time of the admissions (encoder runs) between two in-flight steps: how long they hold running rows",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.admitted = Counter(
            "ortseq_admitted_inputs", "Inputs admitted into the running set", registry=self.registry
        )
        self.retired = Counter(
            "ortseq_retired_inputs", "Inputs that finished and left the running set", registry=self.registry
        )
        self.retired_abandoned = Counter(
            "ortseq_abandoned_inputs", "Inputs retired because their client left", registry=self.registry
        )
        self.phase_seconds = Counter(
            "ortseq_scheduler_seconds",
            "Time of the in-flight scheduler's work by phase: encoder (admissions), decoder (steps), search (host)",
            ["phase"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "ortseq_queue_wait_seconds",
            "Time from a request's arrival to the admission of its last input",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def step_done(self, rows: int, admitted: int, retired: int, seconds: float) -> None:
        """One in-flight step: the rows it ran, the inputs admitted before it and retired after it."""
        self.steps.inc()
        self.step_seconds.observe(seconds)
        self.step_rows.observe(rows)
        self.running_rows.set(rows)
        self.admitted.inc(admitted)
        self.retired.inc(retired)

    def batch_done(self, rows: int, seconds: float, tokens: int) -> None:
        self.batch_size.observe(rows)
        self.batch_seconds.observe(seconds)
        self.generated_tokens.inc(tokens)
        self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
