"""Peak RSS of ortseq exports of one model, side by side: the load's peak and the calls'.

    python benchmarks/compare_exports_memory.py DIR [DIR ...] [--modes greedy,beam8] [--batch 1]
                                               [--rounds 2] [--out FILE]

Each measurement is `make bench`'s worker (benchmarks/bench.py: load, a warm-up call, a timed call, ids
drawn over the whole vocabulary, 512 tokens in, 64 out, 2 threads) in a fresh process, over one export
directory; rounds interleave the directories. It reports the peak resident set at the end of loading
and over the whole run (the larger of the two is the benchmark's peak RSS). For comparing two exports
of the same checkpoint that differ in one choice (e.g. `ortseq export --plain-attention`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LENGTH = 512


def measure(directory: Path, mode: str, batch: int) -> dict:
    vocab = json.loads((directory / "manifest.json").read_text())["dims"]["vocab_size"]
    args = ["ortseq_system", "export", str(directory), mode, str(batch), str(LENGTH), str(vocab), "0", "1"]
    env = os.environ | {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "worker", *args],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{directory} {mode}: the worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--modes", default="greedy,beam8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="write every sample, with the date and load average, to this JSON file")
    args = parser.parse_args()
    samples = []
    print(f"{'export':<48} {'mode':<7} {'load peak MiB':>13} {'peak MiB':>9}")
    for round_ in range(args.rounds):
        for mode in args.modes.split(","):
            for directory in args.exports:
                result = measure(directory.resolve(), mode, args.batch)
                samples.append(dict(export=str(directory), mode=mode, batch=args.batch, round=round_, **result))
                print(
                    f"{str(directory):<48} {mode:<7} {result['load_peak_rss_mb']:>13.0f} {result['peak_rss_mb']:>9.0f}"
                )
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rounds": args.rounds, "length": LENGTH}
        Path(args.out).write_text(json.dumps({"meta": meta, "samples": samples}, indent=1) + "\n")


if __name__ == "__main__":
    main()
