"""The step scheduler: requests join and leave one running decode loop at every step (`--scheduler inflight`).

The same interface as the dynamic batcher (submit, run_in_worker, start, close), over
runtime/inflight.py's running set. One worker thread owns the model and loops: take new requests,
retire the rows of requests whose client left, admit waiting requests in arrival order while the row
budget allows (their encoder runs here, between two steps, at most ADMIT_SOURCE_TOKENS of input per
step while others run, so a long input delays running requests by one encoder pass, not more), run
one decoder step over every row, and answer the requests that finished. The oldest waiting request
is admitted first and nobody overtakes it: no starvation, and back-pressure (503) when the queue is full.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..inflight import InflightDecoder, RowBudget, RowRequest, open_inflight_decoder
from ..model import Seq2SeqModel
from ..search import SearchSettings
from .batcher import SCHEDULERS, BatchingConfig, DynamicBatcher, QueueFullError, ShuttingDownError
from .inference import Summary, summaries_of, summarize_rows
from .metrics import ServingMetrics

INFLIGHT = SCHEDULERS[1]
# Source tokens encoded per step while other requests run (the first waiting request is always admitted
# when it fits): bounds how long admissions hold up a step.
ADMIT_SOURCE_TOKENS = 512


def make_batcher(model: Seq2SeqModel, config: BatchingConfig, metrics: ServingMetrics):
    """The server's scheduler, as config.scheduler names it."""
    if config.scheduler == INFLIGHT:
        return InflightScheduler(model, config, metrics)
    return DynamicBatcher(lambda kwargs, rows: summarize_rows(model, kwargs, rows), config, metrics)


@dataclass(eq=False)
class _Job:
    """One HTTP request: one RowRequest per input; the future gets their summaries, in input order."""

    future: asyncio.Future
    rows: list[list[int]]
    requests: list[RowRequest]
    enqueued: float = field(default_factory=time.monotonic)
    pending: int = 0

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # cancelled: the client left (or the server failed it)


class InflightScheduler:
    def __init__(self, model: Seq2SeqModel, config: BatchingConfig, metrics: ServingMetrics):
        config.check()
        self.config, self._model, self._metrics = config, model, metrics
        sessions = model.sessions
        inflight = open_inflight_decoder(sessions, model.directory, sessions.device, None)
        self.decoder = InflightDecoder(sessions, inflight, RowBudget(config.max_rows, config.max_decoder_tokens))
        self._cond = threading.Condition()
        self._inbox: list[_Job] = []  # submitted, not yet seen by the worker
        self._calls: list[tuple[Callable, tuple, asyncio.Future]] = []
        self._waiting: list[RowRequest] = []  # the worker's FIFO of inputs not yet admitted
        self._waiting_jobs = 0  # jobs with an input not admitted yet (what max_queue bounds)
        self._closing = False
        self._phase_seconds: dict[str, float] = {}  # the decoder's totals last exported to the metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._work, name="ortseq-scheduler", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def close(self) -> None:
        """Stop accepting work, finish every queued and running request, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    def submit(self, settings: SearchSettings, generate_kwargs: dict, rows: list[list[int]]) -> asyncio.Future:
        """Queue one request's inputs; the future resolves to one Summary per input. Cancel it to withdraw."""
        if self._closing:
            raise ShuttingDownError("the server is shutting down")
        self.decoder.check(settings)
        with self._cond:
            if self._waiting_jobs + len(self._inbox) >= self.config.max_queue:
                raise QueueFullError(f"{self._waiting_jobs + len(self._inbox)} requests are already waiting")
            inputs = [np.asarray([row], dtype=np.int64) for row in rows]
            requests = [RowRequest(ids, np.ones_like(ids), settings) for ids in inputs]
            job = _Job(self._loop.create_future(), rows, requests, pending=len(rows))
            for request in requests:
                request.tag = job
            self._inbox.append(job)
            self._metrics.queue_depth.set(self._waiting_jobs + len(self._inbox))
            self._cond.notify()
        job.future.add_done_callback(lambda _: self._wake())  # a withdrawn job's rows go at the next step
        return job.future

    async def run_in_worker(self, function: Callable, *args):
        """Run function(*args) on the model's thread, between two steps."""
        future = self._loop.create_future()
        with self._cond:
            self._calls.append((function, args, future))
            self._cond.notify()
        return await future

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---------------------------------------------------------------- the worker thread

    def _work(self) -> None:
        self._warm_up()
        while True:
            with self._cond:
                while not (self._inbox or self._calls or self._waiting or self.decoder.running or self._closing):
                    self._cond.wait()
                if self._closing and not (self._inbox or self._calls or self._waiting or self.decoder.running):
                    return
                jobs, self._inbox = self._inbox, []
                calls, self._calls = self._calls, []
                for job in jobs:
                    self._waiting += job.requests
                    self._waiting_jobs += 1
            for function, args, future in calls:
                self._call(function, args, future)
            try:
                self._step()
            except Exception as exc:  # every running and waiting request fails; the loop carries on
                self._fail_all(exc)

    def _warm_up(self) -> None:
        """Two steps of a tiny greedy search, so the first client does not pay onnxruntime's first runs."""
        ids = np.asarray([self._model.tokenizer.token_ids(["Warm up."])[0]], dtype=np.int64)
        request = RowRequest(ids, np.ones_like(ids), self._model.settings(max_new_tokens=2, num_beams=1))
        self.decoder.admit(request)
        while request in self.decoder.running:
            self.decoder.step()

    def _step(self) -> None:
        self._retire_abandoned()
        admitting = time.monotonic()
        admitted = self._admit()
        if not self.decoder.running:
            return
        if admitted:
            self._metrics.admit_seconds.observe(time.monotonic() - admitting)
        rows, started = self.decoder.rows_in_use, time.monotonic()
        finished = self.decoder.step()
        metrics = self._metrics
        metrics.step_done(rows, admitted, len(finished), time.monotonic() - started)
        for phase, seconds in self.decoder.seconds.items():
            metrics.phase_seconds.labels(phase).inc(seconds - self._phase_seconds.get(phase, 0.0))
        self._phase_seconds = dict(self.decoder.seconds)
        for request in finished:
            self._finish(request)

    def _admit(self) -> int:
        """Admit waiting inputs in arrival order while they fit; returns how many."""
        admitted, encoded = 0, 0
        while self._waiting and (encoded < ADMIT_SOURCE_TOKENS or not self.decoder.running):
            request = self._waiting[0]
            job = request.tag
            if not self.decoder.admit(request):
                break  # the oldest waits for rows; nobody overtakes it
            self._waiting.pop(0)
            admitted += 1
            encoded += request.input_ids.shape[1]
            if request is job.requests[-1]:
                with self._cond:
                    self._waiting_jobs -= 1
                    self._metrics.queue_depth.set(self._waiting_jobs + len(self._inbox))
                self._metrics.queue_wait.observe(time.monotonic() - job.enqueued)
        return admitted

    def _retire_abandoned(self) -> None:
        gone = [request for request in self._waiting if request.tag.abandoned]
        if gone:
            jobs = {id(request.tag) for request in gone if request is request.tag.requests[-1]}
            self._waiting = [request for request in self._waiting if not request.tag.abandoned]
            with self._cond:
                self._waiting_jobs -= len(jobs)
        for request in [request for request in self.decoder.running if request.tag.abandoned]:
            self.decoder.retire(request)
            self._metrics.retired_abandoned.inc()

    def _finish(self, request: RowRequest) -> None:
        job: _Job = request.tag
        job.pending -= 1
        if job.pending == 0 and not job.abandoned:
            outputs = [r.output for r in job.requests]
            summaries = [summary for row, output in zip(job.rows, outputs) for summary in self._summaries(row, output)]
            self._metrics.generated_tokens.inc(sum(len(summary.output_ids) for summary in summaries))
            self._loop.call_soon_threadsafe(_resolve, job.future, summaries)

    def _summaries(self, row: list[int], output: np.ndarray) -> list[Summary]:
        return summaries_of(self._model, [row], output)

    def _call(self, function, args, future) -> None:
        try:
            result = function(*args)
        except Exception as exc:
            self._loop.call_soon_threadsafe(_fail, future, exc)
        else:
            self._loop.call_soon_threadsafe(_resolve, future, result)

    def _fail_all(self, exc: Exception) -> None:
        jobs = {id(r.tag): r.tag for r in [*self._waiting, *self.decoder.running]}
        for request in list(self.decoder.running):
            self.decoder.retire(request)
        self._waiting = []
        with self._cond:
            self._waiting_jobs = 0
        for job in jobs.values():
            self._loop.call_soon_threadsafe(_fail, job.future, exc)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
