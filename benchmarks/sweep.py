"""`make bench-sweep`: ortseq against CTranslate2 over a grid of workloads, memory and time at every point.

The mid-size Pegasus (d_model 512, 6+6 layers, the real 96k vocabulary, random weights, room for 1024
positions) at input lengths 64 / 256 / 512 / 1024, exactly 16 / 32 / 64 new tokens, batch 1 and 8,
greedy and 8 beams; fp32 against CTranslate2 fp32 and int8 against CTranslate2 int8. Every measurement is
a fresh worker process (benchmarks/bench.py's worker: peak RSS is the OS's VmHWM of that process); the
systems alternate within every point and round. Results: benchmarks/results/sweep/sweep.{json,md,png},
with every sample, the date and the load average; `--resume` goes on from a partial sweep.json.

    python benchmarks/sweep.py [--lengths 64,256,512,1024] [--new-tokens 16,32,64] [--batches 1,8]
                               [--modes greedy,beam8] [--precisions fp32,int8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench  # noqa: E402

MODEL = "pegasus-mid-1024"
PAIRS = {"fp32": ("ortseq-fp32", "ct2-fp32"), "int8": ("ortseq-int8", "ct2-int8")}
FIELDS = ("peak_rss_mb", "seconds")  # ortseq / CTranslate2 must be <= 1 in both, at every point


def points(args) -> list[dict]:
    grid = itertools.product(args.precisions, args.modes, args.batches, args.lengths, args.new_tokens)
    return [dict(precision=p, mode=m, batch=b, length=n, new_tokens=k) for p, m, b, n, k in grid]


def key(point: dict) -> str:
    return "{precision} {mode} b{batch} in{length} out{new_tokens}".format(**point)


def measure(point: dict, systems: dict, dirs: dict, vocab: int, rounds: int) -> dict:
    """Every round runs both systems of the point's precision, alternating which goes first."""
    ours, theirs = PAIRS[point["precision"]]
    samples = {ours: [], theirs: []}
    for round_ in range(rounds):
        order = (ours, theirs) if round_ % 2 == 0 else (theirs, ours)
        for name in order:
            result = bench.run_worker(
                systems[name], dirs[name], MODEL, point["mode"], point["batch"], point["length"], vocab,
                new_tokens=point["new_tokens"],
            )  # fmt: skip
            samples[name].append(result)
    summary = {name: _median(runs) for name, runs in samples.items()}
    ratios = {field: summary[ours][field] / summary[theirs][field] for field in FIELDS}
    return dict(point, systems=[ours, theirs], summary=summary, ratios=ratios, samples=samples)


def _median(runs: list[dict]) -> dict:
    return dict(
        seconds=statistics.median(r["seconds"] for r in runs),
        peak_rss_mb=max(r["peak_rss_mb"] for r in runs),  # the worst round: a peak is a bound, not a mean
        load_peak_rss_mb=max(r["load_peak_rss_mb"] for r in runs),
    )


def markdown(results: list[dict]) -> str:
    lines = [
        "| precision | mode | batch | in | out | ortseq s | CT2 s | time ratio | ortseq MB | CT2 MB | RSS ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ours, theirs = (r["summary"][name] for name in r["systems"])
        flags = ["" if r["ratios"][f] <= 1.0 else " **miss**" for f in ("seconds", "peak_rss_mb")]
        lines.append(
            f"| {r['precision']} | {r['mode']} | {r['batch']} | {r['length']} | {r['new_tokens']} | "
            f"{ours['seconds']:.2f} | {theirs['seconds']:.2f} | {r['ratios']['seconds']:.2f}{flags[0]} | "
            f"{ours['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} | {r['ratios']['peak_rss_mb']:.2f}{flags[1]} |"
        )
    misses = {f: sum(r["ratios"][f] > 1.0 for r in results) for f in FIELDS}
    lines += ["", f"{len(results)} points; time missed at {misses['seconds']}, peak RSS at {misses['peak_rss_mb']}."]
    return "\n".join(lines + ["", *group_summary(results)]) + "\n"


def group_summary(results: list[dict]) -> list[str]:
    """Per precision, mode and batch: the ratios' range, the points over 1, and the longest point's figures."""
    lines = [
        "| precision | mode | batch | time ratio, lowest – highest (points over 1) | peak RSS ratio, lowest – highest "
        "| longest point: seconds and MB, ortseq / CT2 |",
        "|---|---|---|---|---|---|",
    ]
    for group in sorted({(r["precision"], r["mode"], r["batch"]) for r in results}, key=str):
        mine = [r for r in results if (r["precision"], r["mode"], r["batch"]) == group]
        time, rss = ([r["ratios"][f] for r in mine] for f in ("seconds", "peak_rss_mb"))
        longest = max(mine, key=lambda r: (r["length"], r["new_tokens"]))
        ours, theirs = (longest["summary"][name] for name in longest["systems"])
        lines.append(
            f"| {' | '.join(map(str, group))} | {min(time):.2f} – {max(time):.2f} ({sum(t > 1.0 for t in time)}) | "
            f"{min(rss):.2f} – {max(rss):.2f} | {ours['seconds']:.2f} / {theirs['seconds']:.2f} s "
            f"at {longest['length']} in, {longest['new_tokens']} out, {ours['peak_rss_mb']:.0f} / {theirs['peak_rss_mb']:.0f} |"
        )
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["precision"], r["mode"], r["batch"]) for r in results})
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7), squeeze=False)
    for column, panel in enumerate(panels):
        mine = [r for r in results if (r["precision"], r["mode"], r["batch"]) == panel]
        for row, field in enumerate(("peak_rss_mb", "seconds")):
            ax = axes[row][column]
            for new_tokens in sorted({r["new_tokens"] for r in mine}):
                line = sorted((r["length"], r["ratios"][field]) for r in mine if r["new_tokens"] == new_tokens)
                ax.plot(*zip(*line), marker="o", label=f"{new_tokens} new")
            ax.axhline(1.0, color="#c33", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{panel[0]} {panel[1]} batch {panel[2]}", fontsize=9)
            ax.set_xlabel("input tokens")
            ax.set_ylabel(f"ortseq / CTranslate2 {'peak RSS' if row == 0 else 'time'}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def save(out: Path, meta: dict, results: list[dict]) -> None:
    """Written to a temporary file and renamed: a sweep stopped midway leaves the last complete file."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "sweep.json.partial"
    partial.write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    partial.replace(out / "sweep.json")
    (out / "sweep.md").write_text(markdown(results))


def _numbers(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=_numbers, default=[64, 256, 512, 1024])
    parser.add_argument("--new-tokens", type=_numbers, default=[16, 32, 64])
    parser.add_argument("--batches", type=_numbers, default=[1, 8])
    parser.add_argument("--modes", type=lambda v: bench._choose(v, bench.MODES, "modes"), default=list(bench.MODES))
    parser.add_argument("--precisions", type=lambda v: bench._choose(v, PAIRS, "precisions"), default=list(PAIRS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=bench.RESULTS / "sweep")
    parser.add_argument("--resume", action="store_true", help="keep the points a previous sweep.json holds")
    args = parser.parse_args()
    from benchmarks.systems import SYSTEMS

    names = sorted({name for p in args.precisions for name in PAIRS[p]})
    systems = {name: SYSTEMS[name] for name in names}
    model = bench.prepare_model(MODEL)
    vocab = json.loads((model.checkpoint / "config.json").read_text())["vocab_size"]
    dirs = {
        name: importlib.import_module(f"benchmarks.systems.{s.module}").prepare(model, s.variant)
        for name, s in systems.items()
    }
    done = {}
    if args.resume and (args.out / "sweep.json").is_file():
        done = {key(r): r for r in json.loads((args.out / "sweep.json").read_text())["results"]}
    todo = points(args)
    meta = dict(
        date=time.strftime("%Y-%m-%d"), machine=bench.machine(), threads=bench.THREADS, rounds=args.rounds,
        model=MODEL, shape=bench.SHAPES[MODEL], input_ids="uniform over [3, vocab_size)",
        peak_rss="VmHWM of the fresh worker process", time="median over rounds of one call after a warm-up call",
    )  # fmt: skip
    results, started = [], time.perf_counter()
    for index, point in enumerate(todo, 1):
        result = done.get(key(point)) or measure(point, systems, dirs, vocab, args.rounds)
        results.append(result)
        save(args.out, meta, results)
        minutes = (time.perf_counter() - started) / 60
        ratios = result["ratios"]
        print(
            f"[sweep] {index}/{len(todo)} {key(point)}: time {ratios['seconds']:.2f}, peak RSS "
            f"{ratios['peak_rss_mb']:.2f} (load avg {os.getloadavg()[0]:.1f}, {minutes:.1f} min)",
            flush=True,
        )
    plot(results, args.out / "sweep.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
