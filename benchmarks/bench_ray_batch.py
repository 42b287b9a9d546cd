"""`ortseq batch` on a local Ray with 1 and 2 workers against `ortseq generate` in one process, same corpus.

    python benchmarks/bench_ray_batch.py [--export-dir DIR] [--documents 600] [--rounds 2]

Every configuration is a full command as a user runs it, timed wall-clock from start to exit (so Ray's
start-up and each worker's model load are included): `ortseq generate DIR --batch-size 16 --threads 2`
with the texts on stdin, and `ortseq batch DIR --workers 1 --threads 2` / `--workers 2 --threads 1` (the
whole 2-core machine either way). Rounds alternate the configurations; every sample is kept, with the
load average before it. Writes benchmarks/results/ray_batch.{json,md}. Without --export-dir it exports
tiny-pegasus into .cache/bench/tiny-pegasus/export (needs the [export] extra).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_EXPORT = ROOT / ".cache" / "bench" / "tiny-pegasus" / "export"
GENERATION = ["--max-new-tokens", "32", "--min-new-tokens", "32"]  # every document generates as much
WORDS = "the city council river bridge police museum station minister water reported closed open election".split()
CONFIGURATIONS = {
    "ortseq generate, one process, 2 threads": ["generate", "--batch-size", "16", "--threads", "2"],
    "ortseq batch, 1 worker x 2 threads": ["batch", "--workers", "1", "--threads", "2", "--batch-size", "16"],
    "ortseq batch, 2 workers x 1 thread": ["batch", "--workers", "2", "--threads", "1", "--batch-size", "16"],
}


def corpus(count: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choices(WORDS, k=rng.randint(10, 120))) for _ in range(count)]


def run_once(export_dir: Path, arguments: list[str], texts: list[str], work: Path) -> float:
    command = [sys.executable, "-m", "ortseq.runtime.cli", arguments[0], str(export_dir), *arguments[1:], *GENERATION]
    stdin = "\n".join(texts) + "\n"
    if arguments[0] == "batch":
        documents, output = work / "docs.jsonl", work / "out.jsonl"
        documents.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
        output.unlink(missing_ok=True)  # a fresh job each time, not a resumed one
        command += ["--input", str(documents), "--output", str(output)]
        stdin = None
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    subprocess.run(command, input=stdin, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", type=Path, default=DEFAULT_EXPORT)
    parser.add_argument("--documents", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not (args.export_dir / "manifest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "ortseq.runtime.cli", "export", "tiny-pegasus", "--out", str(args.export_dir)],
            check=True,
        )
    texts = corpus(args.documents)
    samples: dict[str, list[dict]] = {name: [] for name in CONFIGURATIONS}
    with tempfile.TemporaryDirectory(prefix="ortseq-bench-ray-") as work:
        for round_index in range(args.rounds):
            for name, arguments in CONFIGURATIONS.items():
                load = os.getloadavg()[0]
                seconds = run_once(args.export_dir, arguments, texts, Path(work))
                samples[name].append({"round": round_index, "seconds": round(seconds, 2), "load_1min_before": load})
                print(f"round {round_index}: {name}: {seconds:.1f} s (load {load:.2f})", file=sys.stderr)
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "export_dir": str(args.export_dir),
        "documents": args.documents,
        "generation": GENERATION,
        "cpus": os.cpu_count(),
        "note": "a shared 2-core machine with other jobs running (a loaded machine): only same-run ratios mean anything",
        "samples": samples,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ray_batch.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "ray_batch.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        f"{result['documents']} documents (10-120 words), {' '.join(result['generation'])}, {result['cpus']} CPUs, "
        f"{result['date']}; {result['note']}. Wall-clock of the whole command, start-up included.",
        "",
        "| command | best (s) | documents/s (best) | every round (s) | load average before each |",
        "|---|---|---|---|---|",
    ]
    for name, runs in result["samples"].items():
        best = min(run["seconds"] for run in runs)
        rounds = ", ".join(f"{run['seconds']:.1f}" for run in runs)
        loads = ", ".join(f"{run['load_1min_before']:.2f}" for run in runs)
        lines.append(f"| {name} | {best:.1f} | {result['documents'] / best:.1f} | {rounds} | {loads} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
