"""Edge bundle footprint: size on disk, and peak memory and time of one summarize call from the bundle.

    python benchmarks/bench_bundle.py EXPORT_DIR [--tokens 512] [--max-new-tokens 64] [-- extra summarize flags]

Builds the bundle of EXPORT_DIR in a temporary folder, then runs its launcher once in a fresh, isolated
process (`python -I BUNDLE/summarize`: nothing from this repo on sys.path) on one input of --tokens
tokens (cut to the model's maximum) with the model's own generation defaults, and reads that
process's peak RSS (VmHWM). Appends the result to benchmarks/results/bench_bundle.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from bench import disk_mb  # noqa: E402  (benchmarks/bench.py)

from ortseq.graphs.manifest import Manifest  # noqa: E402
from ortseq.runtime.bundle import make_bundle  # noqa: E402

# Runs the launcher as `python summarize ...` would, then prints the process's peak RSS on stderr.
MEASURED_RUN = """
import atexit, runpy, sys
launcher, benchmarks = sys.argv.pop(1), sys.argv.pop(1)
sys.argv[0] = launcher
sys.path.insert(0, benchmarks)  # for rss_mb; the runtime comes from the bundle
from bench import rss_mb
atexit.register(lambda: print(f"PEAK_RSS_MB {rss_mb('VmHWM'):.1f}", file=sys.stderr))
runpy.run_path(launcher, run_name="__main__")
"""

TEXT = (
    "The city council said the new river bridge will open next year after the election, the minister "
    "reported, while police said the museum was closed on Sunday when water from the river reached the station. "
)


def measure(export_dir: Path, tokens: int, summarize_flags: list[str]) -> dict:
    manifest = Manifest.read(export_dir)
    with tempfile.TemporaryDirectory(prefix="ortseq-bundle-bench-") as tmp:
        bundle = make_bundle(export_dir, Path(tmp) / "bundle")
        sizes = {"bundle_mb": disk_mb(bundle), "model_mb": disk_mb(bundle / "model")}
        text = long_text(bundle, tokens)
        command = [sys.executable, "-I", "-c", MEASURED_RUN, str(bundle / "summarize"), str(ROOT / "benchmarks")]
        start = time.perf_counter()
        result = subprocess.run([*command, text, *summarize_flags], capture_output=True, text=True, cwd=tmp)
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"summarize failed:\n{result.stderr}")
    peak = next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_MB"))
    return {
        "export": str(export_dir),
        "source": manifest.source,
        "precision": manifest.precision,
        **sizes,
        "input_tokens": tokens,
        "summarize_flags": summarize_flags,
        "peak_rss_mb": float(peak),
        "summarize_s": seconds,  # the whole call: start-up, loading both graphs, one generate
        "summary": result.stdout.strip(),
    }


def long_text(bundle: Path, tokens: int) -> str:
    """A text of at least `tokens` tokens (the runtime cuts it to the model's maximum)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "model" / Manifest.read(bundle / "model").tokenizer.file))
    text = TEXT
    while len(tokenizer.encode(text).ids) < tokens:
        text += TEXT
    return text


def write(row: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "bench_bundle.json"
    rows = [r for r in (json.loads(path.read_text()) if path.is_file() else []) if r["export"] != row["export"]]
    rows.append(row)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| export | precision | bundle (MB) | of which model (MB) | peak RSS of one summarize (MB) | summarize call (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['source'] or r['export']} | {r['precision']} | {r['bundle_mb']:.1f} | {r['model_mb']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['summarize_s']:.2f} |"
        )
    (RESULTS / "bench_bundle.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=512, help="input length (cut to the model's maximum)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args, extra = parser.parse_known_args()
    flags = ["--max-new-tokens", str(args.max_new_tokens), *[f for f in extra if f != "--"]]
    write(measure(args.export_dir, args.tokens, flags))


if __name__ == "__main__":
    main()
