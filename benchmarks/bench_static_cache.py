"""Decoder contract 0.3 against the concat decoder: ms per decode step and peak RSS, same run, interleaved.

    python benchmarks/bench_static_cache.py NAME=EXPORT_DIR ... [--rounds 3] [--new-tokens 32] [--length 128]

Each round runs every export in a fresh process (so its peak RSS is its own), in turn: greedy at batch 1
and 8 beams at batch 8, every step forced to run (min_new_tokens = max_new_tokens). One step's cost is
(t(new tokens) - t(2 tokens)) / (new tokens - 2): the encoder and the first step cancel out. Tokens of
every export are compared with the first one's. Prints one JSON line per (round, export, mode).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
from bench import rss_mb  # this script's folder is on sys.path when it runs

MODES = {"greedy_b1": (1, 1), "beam8_b8": (8, 8)}  # name -> (batch, beams)
THREADS = 2


def worker(export_dir: str, new_tokens: int, length: int) -> dict:
    from ortseq.runtime import Seq2SeqModel

    model = Seq2SeqModel.load(export_dir, threads=THREADS, verify=False)
    result = {}
    for mode, (batch, beams) in MODES.items():
        ids = np.random.default_rng(0).integers(3, 400, size=(batch, length)).astype(np.int64)
        times = {}
        for tokens in (2, new_tokens):
            settings = dict(num_beams=beams, max_new_tokens=tokens, min_new_tokens=tokens)
            model.generate(ids, **settings)  # warm
            start = time.perf_counter()
            out = model.generate(ids, **settings)
            times[tokens] = time.perf_counter() - start
        result[mode] = {
            "ms_per_step": 1e3 * (times[new_tokens] - times[2]) / (new_tokens - 2),
            "tokens": out.tolist(),
        }
    result["peak_rss_mb"] = rss_mb("VmHWM")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="*", help="NAME=EXPORT_DIR")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.new_tokens, args.length)))
        return
    exports = dict(item.split("=", 1) for item in args.exports)
    reference: dict = {}
    for round_ in range(args.rounds):
        for name, directory in exports.items():
            command = [sys.executable, __file__, "--worker", directory, "--new-tokens", str(args.new_tokens)]
            command += ["--length", str(args.length)]
            result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            for mode in MODES:
                same = reference.setdefault(mode, result[mode]["tokens"]) == result[mode]["tokens"]
                row = {
                    "round": round_,
                    "export": name,
                    "mode": mode,
                    "ms_per_step": round(result[mode]["ms_per_step"], 2),
                }
                print(json.dumps(row | {"peak_rss_mb": round(result["peak_rss_mb"]), "same_tokens": same}), flush=True)


if __name__ == "__main__":
    main()
