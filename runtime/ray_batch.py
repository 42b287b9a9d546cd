"""`ortseq batch` on Ray Data: a pool of actors, each loading the export once, summarizes length-grouped
batches; the driver appends each finished batch to the output (see runtime/batch.py for the bookkeeping).

A killed actor is restarted and its batch retried by Ray (Ray Data's actor pools default max_restarts and
max_task_retries to -1); the driver
writes each id at most once whatever Ray delivers. Without an address (and no RAY_ADDRESS) a local Ray
is started on this machine, bound to 127.0.0.1.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..graphs.manifest import LOOP_ENGINE
from .batch import (
    BlockWriter,
    Document,
    Progress,
    Rejected,
    Result,
    append_block,
    check_distinct_files,
    check_something_to_do,
    length_grouped,
    make_plan,
    read_inputs,
    recover_output,
    write_errors,
)
from .errors import InvalidInputError
from .model import Seq2SeqModel

logger = logging.getLogger("ortseq")

RAY_MISSING = "this needs Ray: pip install 'ortseq[ray]'"
LENGTH_WINDOW_BATCHES = 64  # documents are length-sorted within windows of this many batches


def import_ray():
    """ray, or InvalidInputError (exit 2) saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise InvalidInputError(f"{RAY_MISSING} ({exc.name} is missing)") from exc
    return ray


def ray_log_options(verbose: bool) -> dict:
    """ray.init's logging keywords: what the workers print reaches this terminal only with -v (Ray's own
    notices in this process are hidden with the libraries' other output: runtime/library_output.py)."""
    return {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": verbose}


# Ray reads this when it is imported; despite its name it decides on every platform whether a node's
# address may be 127.0.0.1. Left on (Linux's default), ray.init turns _node_ip_address="127.0.0.1"
# into the machine's outward address and its services listen there and on every interface.
_LOOPBACK_NODE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(ray, num_cpus: int, verbose: bool = False, **options) -> None:
    """A Ray of this machine alone, on the loopback address: ray.init(address="local") with `options`.

    Its node address is 127.0.0.1 (Ray's own services listen there only), which ray.init would otherwise
    replace by the outward address. One listener is Ray Serve's own: each replica's gRPC server for calls
    between deployments binds every interface (hard-coded in Ray Serve 2.60). The switch is set while
    Ray starts, for this process and the processes it starts, then restored: a later ray.init to a
    cluster in this process gets Ray's usual addresses."""
    from ray._private import ray_constants  # the value Ray read at import; it is consulted at init

    saved_env, saved_constant = os.environ.get(_LOOPBACK_NODE_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_NODE_SWITCH], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **ray_log_options(verbose),
            **options,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            del os.environ[_LOOPBACK_NODE_SWITCH]
        else:
            os.environ[_LOOPBACK_NODE_SWITCH] = saved_env


@dataclass(frozen=True)
class BatchJob:
    export_dir: Path
    input: Path
    output: Path
    errors: Path
    workers: int | None = None  # default: the cluster's CPUs / threads
    threads: int = 1  # onnxruntime intra-op threads per worker (and the CPUs each worker reserves)
    batch_size: int = 16  # documents per generate call
    address: str | None = None  # None: RAY_ADDRESS, or a new local Ray
    text_field: str = "text"
    id_field: str = "id"
    provider: str = "cpu"
    engine: str = LOOP_ENGINE
    generate_kwargs: dict = field(default_factory=dict)
    verbose: bool = False  # Ray's own log lines too (`-v`)


@dataclass
class BatchReport:
    summarized: int  # this run
    already_done: int  # by earlier runs
    rejected: int  # inputs in the errors file (refused before the run, or failed in it)


# (job, documents) -> a context giving Summarizer's output blocks in any order (a block may come twice: Ray
# retries the batch of a killed worker); a block's "key" column holds positions in documents
SummarizeFn = Callable[[BatchJob, list[Document]], AbstractContextManager[Iterable[dict[str, np.ndarray]]]]


class Summarizer:
    """A Ray Data actor: loads the export once, then summarizes one batch of texts per call."""

    def __init__(self, export_dir: str, provider: str, threads: int, engine: str, generate_kwargs: dict):
        self.model = Seq2SeqModel.load(export_dir, provider=provider, threads=threads, engine=engine)
        self.generate_kwargs = generate_kwargs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from .serving.inference import summarize_rows

        texts = [str(text) for text in batch["text"]]
        # what Seq2SeqModel.summarize feeds generate: ids truncated to the model's maximum, padded
        rows = self.model.tokenizer.token_ids(texts, self.model.tokenizer.info.model_max_length)
        try:
            summaries = summarize_rows(self.model, self.generate_kwargs, rows)
        except InvalidInputError:  # one bad row must not fail its neighbours: find it alone
            return self._one_by_one(batch["key"], rows)
        return {
            "key": [int(key) for key in batch["key"]],
            "summary": [summary.text for summary in summaries],
            "input_tokens": [summary.input_tokens for summary in summaries],
            "output_tokens": [len(summary.output_ids) for summary in summaries],
            "error": [""] * len(summaries),
        }

    def _one_by_one(self, keys, rows: list[list[int]]) -> dict[str, list]:
        from .serving.inference import summarize_rows

        columns = {"key": [], "summary": [], "input_tokens": [], "output_tokens": [], "error": []}
        for key, row in zip(keys, rows):
            try:
                (summary,) = summarize_rows(self.model, self.generate_kwargs, [row])
                text, output_tokens, error = summary.text, len(summary.output_ids), ""
            except InvalidInputError as exc:
                text, output_tokens, error = "", 0, str(exc)
            for name, value in zip(columns, (int(key), text, len(row), output_tokens, error)):
                columns[name].append(value)
        return columns


def run_batch(job: BatchJob, summarize: SummarizeFn | None = None) -> BatchReport:
    """Summarize every pending document of job.input into job.output; resumes where an earlier run stopped.
    summarize: who turns the documents into blocks of summaries (a Ray Data pipeline when None)."""
    if job.batch_size < 1 or job.threads < 1 or (job.workers is not None and job.workers < 1):
        raise InvalidInputError("--batch-size, --threads and --workers must be at least 1")
    check_distinct_files(job.input, job.output, job.errors)
    done = recover_output(job.output)
    plan = make_plan(read_inputs(job.input, job.text_field, job.id_field), done)
    check_something_to_do(job.input, plan)
    # a bad export or setting is refused here, before any Ray process starts
    Seq2SeqModel.load(job.export_dir, threads=1, engine=job.engine).settings(**job.generate_kwargs)
    write_errors(job.errors, plan.rejected)
    logger.info(
        "%d documents to summarize, %d already done, %d refused (see %s)",
        len(plan.pending),
        plan.already_done,
        len(plan.rejected),
        job.errors,
    )
    failed = 0
    if plan.pending:
        documents = length_grouped(plan.pending, job.batch_size * LENGTH_WINDOW_BATCHES)
        with (summarize or ray_blocks)(job, documents) as blocks:
            failed = write_blocks(job, documents, blocks, done)
    return BatchReport(len(plan.pending) - failed, plan.already_done, len(plan.rejected) + failed)


@contextmanager
def ray_blocks(job: BatchJob, documents: list[Document]) -> Iterator[Iterable[dict[str, np.ndarray]]]:
    """Summarizer's output blocks from a Ray Data pipeline over documents, as each finishes. Starts a
    local Ray unless one is running or an address is given, and stops the one it started."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        _connect(ray, job)
    try:
        yield _pipeline(ray, job, documents).iter_batches(batch_size=None, batch_format="numpy")
    finally:
        if started_here:
            ray.shutdown()


def _connect(ray, job: BatchJob) -> None:
    address = job.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **ray_log_options(job.verbose))
    else:
        workers = job.workers or max(1, (os.cpu_count() or 1) // job.threads)
        start_local_ray(ray, num_cpus=max(os.cpu_count() or 1, workers * job.threads), verbose=job.verbose)


def _pipeline(ray, job: BatchJob, documents: list[Document]):
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False  # ours is on stderr already
    logging.getLogger("ray.data").setLevel(logging.INFO if job.verbose else logging.WARNING)
    workers = job.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // job.threads)
    items = [{"key": key, "text": document.text} for key, document in enumerate(documents)]
    dataset = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / job.batch_size))
    logger.info("summarizing on %d workers x %d threads", workers, job.threads)
    return dataset.map_batches(
        Summarizer,
        fn_constructor_kwargs={
            "export_dir": str(job.export_dir),
            "provider": job.provider,
            "threads": job.threads,
            "engine": job.engine,
            "generate_kwargs": job.generate_kwargs,
        },
        batch_size=job.batch_size,
        compute=ActorPoolStrategy(size=workers),
        num_cpus=job.threads,
        num_gpus=1 if job.provider == "cuda" else 0,
        # No max_restarts/max_task_retries: Ray Data's actor pools default both to -1 (a killed worker is
        # restarted and its batch run again), and passing them is deprecated since Ray 2.60.
    )


def write_blocks(job: BatchJob, documents: list[Document], blocks: Iterable[dict], done: set) -> int:
    """Appends each block's summaries to job.output (no id twice, none of `done`) and its failures to
    job.errors; returns how many documents failed."""
    writer, progress, failed = BlockWriter(job.output, done), Progress(len(documents)), 0
    with open(job.errors, "ab", buffering=0) as errors:
        try:
            for block in blocks:
                results, refused = _block_results(block, documents)
                writer.write(results)
                if refused:
                    append_block(errors.fileno(), [item.record() for item in refused])
                failed += len(refused)
                progress.advance(len(results) + len(refused))
        finally:
            writer.close()
    logger.info("done: %s", progress.line())
    return failed


def _block_results(block: dict[str, np.ndarray], documents: list[Document]) -> tuple[list[Result], list[Rejected]]:
    results, refused = [], []
    for key, summary, input_tokens, output_tokens, error in zip(
        block["key"], block["summary"], block["input_tokens"], block["output_tokens"], block["error"]
    ):
        document = documents[int(key)]
        if error:
            refused.append(Rejected(document.line, f"could not be summarized: {error}", document.id))
        else:
            results.append(Result(document.id, str(summary), int(input_tokens), int(output_tokens)))
    return results, refused
