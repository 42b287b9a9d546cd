"""Dynamic batching: concurrent requests with equal generation settings share one generate call.

Pure asyncio plus one worker thread that owns the model (onnxruntime already uses every core for
one call, so running two calls at once would only make both slower). The event loop keeps a bounded
FIFO queue of jobs (one job = one request's token rows). The oldest job decides the next batch: every
queued job with the same resolved settings joins it, up to max_batch_size rows; the batch runs when it
is full or when the oldest job has waited max_wait_ms. Jobs with other settings keep their place, so
nobody starves. A job whose client has gone (its future cancelled) is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import InvalidInputError
from ..search import SearchSettings
from .inference import Summary
from .metrics import ServingMetrics

RunBatch = Callable[[dict, list[list[int]]], list[Summary]]  # (generate kwargs, token rows) -> a Summary per row


# "dynamic": this module; "inflight": runtime/serving/scheduler.py (needs an export made with --inflight)
SCHEDULERS = ("dynamic", "inflight")


class QueueFullError(Exception):
    """The queue holds max_queue requests already: the client should retry later (503)."""


class ShuttingDownError(Exception):
    """The server is draining its queue before exiting and accepts no new work (503)."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 16  # rows (inputs) per generate call
    max_wait_ms: float = 10.0  # how long the oldest request may wait for others to join it
    max_queue: int = 64  # requests waiting; one more gets QueueFullError
    scheduler: str = SCHEDULERS[0]  # SCHEDULERS; "inflight" reads the two below
    max_rows: int = 64  # decoder rows (beams) the in-flight running set holds
    max_decoder_tokens: int = 256  # cache slots per row: the longest max_length - 1 it admits

    def check(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or not self.max_wait_ms >= 0:
            raise InvalidInputError(
                f"max_batch_size and max_queue must be at least 1 and max_wait_ms at least 0, got {self}"
            )
        if self.scheduler not in SCHEDULERS:
            raise InvalidInputError(f"unknown scheduler {self.scheduler!r}; choose one of {list(SCHEDULERS)}")
        if self.max_rows < 1 or self.max_decoder_tokens < 1:
            raise InvalidInputError(f"max_rows and max_decoder_tokens must be at least 1, got {self}")


@dataclass(eq=False)  # a job is itself: compared by identity
class Job:
    settings: SearchSettings  # resolved: jobs are compatible when these are equal
    generate_kwargs: dict
    rows: list[list[int]]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(self, run_batch: RunBatch, config: BatchingConfig, metrics: ServingMetrics):
        config.check()
        self.config = config
        self._run_batch = run_batch
        self._metrics = metrics
        self._queue: list[Job] = []
        self._arrival = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ortseq-model")
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ortseq-batcher")

    async def close(self) -> None:
        """Stop accepting work, finish every queued job, then stop the worker thread."""
        self._closing = True
        self._arrival.set()
        if self._task is not None:
            await self._task
        self._worker.shutdown(wait=True)

    def submit(self, settings: SearchSettings, generate_kwargs: dict, rows: list[list[int]]) -> asyncio.Future:
        """Queue one request's rows; the future resolves to one Summary per row. Cancel it to withdraw."""
        if self._closing:
            raise ShuttingDownError("the server is shutting down")
        if len(rows) > self.config.max_batch_size:
            raise InvalidInputError(f"{len(rows)} inputs exceed the batch size of {self.config.max_batch_size}")
        self._drop_abandoned()
        if len(self._queue) >= self.config.max_queue:
            raise QueueFullError(f"{len(self._queue)} requests are already waiting")
        job = Job(settings, generate_kwargs, rows, asyncio.get_running_loop().create_future())
        job.future.add_done_callback(lambda _: self._drop_abandoned())  # a withdrawn job leaves the queue at once
        self._queue.append(job)
        self._metrics.queue_depth.set(len(self._queue))
        self._arrival.set()
        return job.future

    async def run_in_worker(self, function: Callable, *args):
        """Run function(*args) on the model's thread (after whatever runs there now)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    async def _loop(self) -> None:
        while True:
            self._drop_abandoned()
            if not self._queue:
                if self._closing:
                    return
                self._arrival.clear()
                await self._arrival.wait()
                continue
            batch = await self._collect()
            if batch:
                await self._run(batch)

    async def _collect(self) -> list[Job]:
        """Wait (at most until the oldest job's deadline) for a full batch of jobs compatible with the oldest."""
        deadline = self._queue[0].enqueued + self.config.max_wait_ms / 1000
        while True:
            self._drop_abandoned()
            if not self._queue:
                return []
            batch, full = self._compatible_with_oldest()
            remaining = deadline - time.monotonic()
            if full or remaining <= 0 or self._closing:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        self._queue = [job for job in self._queue if job not in batch]
        self._metrics.queue_depth.set(len(self._queue))
        return batch

    def _compatible_with_oldest(self) -> tuple[list[Job], bool]:
        """Queued jobs with the oldest job's settings, in FIFO order, that fit in one batch; and whether
        the batch is full (no room for the next compatible job, or exactly max_batch_size rows)."""
        settings, room = self._queue[0].settings, self.config.max_batch_size
        batch: list[Job] = []
        for job in self._queue:
            if job.settings != settings:
                continue
            if len(job.rows) > room:
                return batch, True
            batch.append(job)
            room -= len(job.rows)
        return batch, room == 0

    async def _run(self, batch: list[Job]) -> None:
        rows = [row for job in batch for row in job.rows]
        started = time.monotonic()
        self._metrics.running_rows.set(len(rows))
        try:
            summaries = await self.run_in_worker(self._run_batch, batch[0].generate_kwargs, rows)
        except Exception as exc:  # the jobs' requests fail; the loop carries on with the next batch
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self._metrics.running_rows.set(0)
        tokens = sum(len(summary.output_ids) for summary in summaries)
        self._metrics.batch_done(len(rows), time.monotonic() - started, tokens)
        start = 0
        for job in batch:
            if not job.future.done():  # a client that left meanwhile gets nothing
                job.future.set_result(summaries[start : start + len(job.rows)])
            start += len(job.rows)

    def _drop_abandoned(self) -> None:
        if any(job.future.done() for job in self._queue):
            self._queue = [job for job in self._queue if not job.future.done()]
            self._metrics.queue_depth.set(len(self._queue))
