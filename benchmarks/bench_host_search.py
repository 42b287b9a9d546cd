"""Host search per step of a full in-flight running set: HostCandidates.beam over each request's rows.

Random logits of the real Pegasus vocabulary, `--rows` rows split into 4-beam requests (each its own
HostCandidates, as in the running set). With --baseline FILE (a copy of an older runtime/search.py), that
version runs interleaved with this one, round by round on the same logits, and must pick the same ids.

    python benchmarks/bench_host_search.py [--rows 48] [--rounds 9] [--baseline /tmp/search_before.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import numpy as np

from ortseq.runtime import search

VOCAB = 96103  # google/pegasus-xsum
BEAMS = 4


def load_baseline(path: str):
    source = open(path).read().replace("from ..graphs.generation", "from ortseq.graphs.generation")
    spec = importlib.util.spec_from_loader("search_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def one_step(module, logits, work, running, sequences):
    settings = module.SearchSettings(num_beams=BEAMS, max_length=64, min_length=10)
    np.copyto(work, logits)
    picked = []
    start = time.perf_counter()
    for first in range(0, len(work), BEAMS):
        rows = slice(first, first + BEAMS)
        candidates = module.HostCandidates(settings)
        picked.append(candidates.beam(work[rows], sequences, running[first // BEAMS][None], 2 * BEAMS))
    return time.perf_counter() - start, picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--baseline", help="an older runtime/search.py to run interleaved")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((args.rows, VOCAB)) * 4).astype(np.float32)
    running = rng.standard_normal((args.rows // BEAMS, BEAMS)).astype(np.float32)
    sequences = np.zeros((BEAMS, 5), dtype=np.int64)
    work = logits.copy()
    versions = {"this": search} | ({"baseline": load_baseline(args.baseline)} if args.baseline else {})
    samples: dict[str, list[float]] = {name: [] for name in versions}
    for _ in range(args.rounds):
        results = {}
        for name, module in versions.items():
            seconds, results[name] = one_step(module, logits, work, running, sequences)
            samples[name].append(seconds * 1000)
        if "baseline" in results:
            for (scores, ids), (base_scores, base_ids) in zip(results["this"], results["baseline"]):
                assert np.array_equal(ids, base_ids) and np.array_equal(scores, base_scores)
    print(f"load average {os.getloadavg()[0]:.2f}, {args.rows} rows of {VOCAB}, {BEAMS}-beam requests")
    for name, values in samples.items():
        print(f"{name}: median {statistics.median(values):.2f} ms, min {min(values):.2f} ms per step")


if __name__ == "__main__":
    main()
