"""How far a greedy batch-1 decoder step is from this machine's memory-bandwidth floor.

    python benchmarks/bandwidth_floor.py [EXPORT_DIR ...] [--length 256] [--rounds 5]

Without export directories: the sweep's mid-size model (benchmarks/sweep.py), ortseq fp32 and int8.

A greedy step at batch 1 multiplies one row by every weight matrix of the decoder and the LM head: it
reads every weight byte once and does two flops per weight, so on a CPU it is bound by how fast the
weights stream from memory. The floor of a step is

    bytes one step must read (every decoder initializer a non-lookup node consumes, the cross K/V of the
    source, the self-attention cache so far) / the read bandwidth measured here (2 threads, each summing
    its half of a 1 GiB array, best of --rounds).

The step time is measured as (time of 72 new tokens - time of 8) / 64 at --length input tokens, exactly
that many new tokens (min = max), median of --rounds, 2 intra-op threads as `make bench`. The split of
that time (decoder session runs against the numpy search and the Python driver) comes from timing the
decoder session's run calls in the same calls. Writes benchmarks/results/bandwidth_floor.{json,md} with
the date, the load average and every sample; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ortseq.graphs import contract  # noqa: E402
from ortseq.runtime.model import Seq2SeqModel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
SHORT, LONG = 8, 72
LOOKUP_OPS = {"Gather"}  # reads one row per token, not the table
BANDWIDTH_BYTES = 1 << 30


def read_bandwidth(rounds: int) -> tuple[float, dict[str, list[float]]]:
    """Bytes per second two threads read from a 1 GiB array, each reducing its half (numpy's reductions
    release the GIL): the best of `rounds` over the cheapest reductions numpy has (a float max, an
    integer or), so that the floor is this machine's memory and not numpy's arithmetic; every sample."""
    data = np.ones(BANDWIDTH_BYTES // 4, dtype=np.float32)
    kernels = {"float32 max": (np.maximum.reduce, data), "uint64 or": (np.bitwise_or.reduce, data.view(np.uint64))}
    samples: dict[str, list[float]] = {}
    for name, (reduce, array) in kernels.items():
        halves = np.array_split(array, THREADS)
        samples[name] = []
        for _ in range(rounds + 1):  # the first pass faults the pages in
            threads = [threading.Thread(target=reduce, args=(half,)) for half in halves]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            samples[name].append(data.nbytes / (time.perf_counter() - start))
        samples[name] = samples[name][1:]
    return max(max(values) for values in samples.values()), samples


def weight_bytes_per_step(export_dir: Path) -> int:
    """Bytes of the decoder's initializers that some node other than a row lookup consumes (a table that
    is both looked up and multiplied, as a tied LM head, counts once: the multiply reads it whole)."""
    graph = onnx.load(str(export_dir / contract.DECODER_FILE), load_external_data=False).graph
    consumers: dict[str, set[str]] = {}
    for node in _nodes(graph):
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for tensor in graph.initializer:
        if consumers.get(tensor.name, set()) - LOOKUP_OPS:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def _nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)


def cache_bytes_per_step(model: Seq2SeqModel, length: int) -> int:
    """Cross K/V of the source and the self-attention K/V at the middle of the long run, float32."""
    dims = model.manifest.dims
    positions = length + (SHORT + LONG) // 2
    return 2 * dims.decoder_layers * positions * dims.d_model * 4


class DecoderClock:
    """Wraps the decoder session's run calls to time them (the rest of a step is search and driver)."""

    def __init__(self, session):
        self.seconds, self._session = 0.0, session
        for name in ("run", "run_with_iobinding", "run_with_ort_values"):
            if hasattr(session, name):
                setattr(self, name, self._timed(getattr(session, name)))

    def _timed(self, run):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed

    def __getattr__(self, name):
        return getattr(self._session, name)


def greedy(model: Seq2SeqModel, ids: np.ndarray, new_tokens: int) -> None:
    """Exactly new_tokens greedy tokens for one row. num_beams is given: an export's own default may be a
    beam search (the sweep model's is 8 beams, as pegasus-xsum's), which would time 8 rows a step."""
    out = model.generate(ids, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if out.shape != (1, 1 + new_tokens):
        raise RuntimeError(f"greedy batch 1 returned shape {out.shape}, not (1, {1 + new_tokens})")


def step_times(model: Seq2SeqModel, length: int, rounds: int) -> dict:
    ids = np.random.default_rng(0).integers(3, model.manifest.dims.vocab_size, size=(1, length))
    clock = DecoderClock(model.engine.sessions.decoder)
    model.engine.sessions.decoder = clock
    samples = []
    greedy(model, ids, SHORT)  # warm-up
    for _ in range(rounds):
        sample = {}
        for new in (SHORT, LONG):
            clock.seconds = 0.0
            start = time.perf_counter()
            greedy(model, ids, new)
            sample[new] = (time.perf_counter() - start, clock.seconds)
        samples.append(
            dict(
                step_ms=1000 * (sample[LONG][0] - sample[SHORT][0]) / (LONG - SHORT),
                decoder_ms=1000 * (sample[LONG][1] - sample[SHORT][1]) / (LONG - SHORT),
                load_average=os.getloadavg()[0],
            )
        )
    return dict(
        step_ms=statistics.median(s["step_ms"] for s in samples),
        decoder_ms=statistics.median(s["decoder_ms"] for s in samples),
        samples=samples,
    )


def sweep_exports() -> list[Path]:
    """The sweep model's ortseq fp32 and int8 exports, made as the sweep makes them if missing."""
    from benchmarks import bench, sweep
    from benchmarks.systems import SYSTEMS

    model = bench.prepare_model(sweep.MODEL)
    systems = [SYSTEMS[name] for name in ("ortseq-fp32", "ortseq-int8")]
    return [Path(importlib.import_module(f"benchmarks.systems.{s.module}").prepare(model, s.variant)) for s in systems]


def markdown(bandwidth: float, rows: list[dict]) -> str:
    lines = [
        f"Read bandwidth (2 threads): {bandwidth / 1e9:.1f} GB/s.",
        "",
        "| export | MB read per step | floor ms | step ms | ratio to floor | decoder session ms | search + driver ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['export']} | {row['bytes_per_step'] / 1e6:.0f} | {row['floor_ms']:.2f} | {row['step_ms']:.2f} | "
            f"{row['ratio_to_floor']:.2f} | {row['decoder_ms']:.2f} | {row['step_ms'] - row['decoder_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dirs", nargs="*", type=Path)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "bandwidth_floor")
    args = parser.parse_args()
    export_dirs = args.export_dirs or sweep_exports()
    bandwidth, bandwidth_samples = read_bandwidth(args.rounds)
    print(f"[floor] read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    for export_dir in export_dirs:
        model = Seq2SeqModel.load(export_dir, threads=THREADS, verify=False)
        total = weight_bytes_per_step(export_dir) + cache_bytes_per_step(model, args.length)
        times = step_times(model, args.length, args.rounds)
        floor_ms = 1000 * total / bandwidth
        rows.append(
            dict(
                export=str(export_dir),
                bytes_per_step=total,
                floor_ms=floor_ms,
                ratio_to_floor=times["step_ms"] / floor_ms,
            )
            | times
        )
        print(f"[floor] {export_dir}: {times['step_ms']:.2f} ms a step, floor {floor_ms:.2f} ms", flush=True)
        del model
    from benchmarks.bench import machine

    meta = dict(
        date=time.strftime("%Y-%m-%d"), machine=machine(), length=args.length, rounds=args.rounds, threads=THREADS,
        steps=f"({LONG} - {SHORT} new tokens) / {LONG - SHORT}", bandwidth_bytes_per_s=bandwidth,
        bandwidth_samples=bandwidth_samples, load_average_end=os.getloadavg(),
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".json.partial")
    partial.write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    partial.replace(args.out.with_suffix(".json"))
    args.out.with_suffix(".md").write_text(markdown(bandwidth, rows))
    print(markdown(bandwidth, rows))


if __name__ == "__main__":
    main()
