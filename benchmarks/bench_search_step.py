"""Per-step time of choosing candidates: on the host (numpy) vs search_step.onnx (runtime/search_step.py).

Random logits of the real Pegasus vocabulary; host and device interleaved round by round, the same
logits for both, so only same-run ratios count. CPU provider unless --provider cuda.

    python benchmarks/bench_search_step.py [--rounds 7] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnxruntime as ort

from ortseq.exporter.search_step import search_step_model
from ortseq.runtime.search import HostCandidates, SearchSettings
from ortseq.runtime.search_step import DeviceCandidates

VOCAB = 96103  # google/pegasus-xsum
CASES = {"beam 8 x batch 8": (8, 8), "greedy batch 1": (1, 1)}


class LogitsStep:
    """Logits on the device as a decoder step would leave them (OrtValue), and a host copy."""

    def __init__(self, logits: np.ndarray, device: str):
        self.device = device
        self.logits_value = ort.OrtValue.ortvalue_from_numpy(logits, device, 0)


def time_case(session, batch: int, beams: int, device: str, rounds: int, steps: int) -> dict[str, float]:
    settings = SearchSettings(num_beams=beams, max_length=64, min_length=10)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((batch * beams, VOCAB)) * 4).astype(np.float32)
    running = rng.standard_normal((batch, beams)).astype(np.float32)
    sequences = np.zeros((batch * beams, 5), dtype=np.int64)
    step = LogitsStep(logits, device)
    host, on_device = HostCandidates(settings), DeviceCandidates(session, step, settings)
    work = logits.copy()  # the host path works in place, like on the decoder's own buffer

    def host_step():
        if beams == 1:
            return host.greedy(work, sequences)
        return host.beam(work, sequences, running, 2 * beams)

    def device_step():
        if beams == 1:
            return on_device.greedy(logits, sequences)
        return on_device.beam(logits, sequences, running, 2 * beams)

    samples = {"host": [], "device": []}
    for _ in range(rounds):
        for name, run in (("host", host_step), ("device", device_step)):
            total = 0.0
            for _ in range(steps):
                np.copyto(work, logits)
                start = time.perf_counter()
                run()
                total += time.perf_counter() - start
            samples[name].append(total / steps * 1000)
    return {name: min(values) for name, values in samples.items()}


def check_ties(session, device: str) -> None:
    """The device's candidate ids equal numpy's on logits full of exact ties (onnxruntime's CUDA TopK is
    another kernel than its CPU one: this is what to run first on a GPU)."""
    rng = np.random.default_rng(0)
    batch, beams = 8, 8
    settings = SearchSettings(num_beams=beams, max_length=64)
    logits = (rng.integers(-4, 3, size=(batch * beams, VOCAB)) / 2).astype(np.float32)
    logits[rng.random(logits.shape) < 0.3] = -np.inf
    logits[:, 0] = 1.5
    running = (rng.integers(-6, 0, size=(batch, beams)) / 4).astype(np.float32)
    sequences = np.zeros((batch * beams, 5), dtype=np.int64)
    on_device = DeviceCandidates(session, LogitsStep(logits, device), settings)
    _, device_ids = on_device.beam(logits, sequences, running, 2 * beams)
    _, host_ids = HostCandidates(settings).beam(logits.copy(), sequences, running, 2 * beams)
    greedy_device = on_device.greedy(logits, sequences)
    greedy_host = HostCandidates(settings).greedy(logits.copy(), sequences)
    same = np.array_equal(device_ids, host_ids) and np.array_equal(greedy_device, greedy_host)
    print(f"ties: device candidates {'equal' if same else 'DIFFER FROM'} the host's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[args.provider]
    session = ort.InferenceSession(search_step_model().SerializeToString(), options, providers=[provider])
    check_ties(session, args.provider)
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} threads, vocab {VOCAB}, best of {args.rounds} rounds")
    for name, (batch, beams) in CASES.items():
        best = time_case(session, batch, beams, args.provider, args.rounds, args.steps)
        print(f"{name}: host {best['host']:.2f} ms, device {best['device']:.2f} ms per step "
              f"(host/device {best['host'] / best['device']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
