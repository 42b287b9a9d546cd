"""`make bench`: ortseq against transformers, optimum, CTranslate2 and ORT's BeamSearch op, in one run.

Workload (issue 5): the pegasus-xsum-shaped random-weight model with 512 input tokens, and
tiny-pegasus (256 positions: 256 input tokens), exactly 64 new tokens (min = max = 64), greedy and
8 beams, batch 1 and batch 8. Every measurement runs in a fresh worker process of the system's own
venv (so peak RSS and load time are per system), with 2 threads for every system; the systems
alternate within every round, and the table reports medians over rounds. Each system lives in
benchmarks/systems/ (how it is prepared, loaded and called). Results: benchmarks/results/bench.{json,md,png}.

    python benchmarks/bench.py [--models tiny-pegasus,pegasus-xsum-shaped] [--systems ortseq-fp32,ct2-fp32]
                               [--modes greedy,beam8] [--batches 1,8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".cache" / "bench"
RESULTS = ROOT / "benchmarks" / "results"
NEW_TOKENS = 64
SHORT_TOKENS = 2  # per-step time = (t(64 new tokens) - t(2)) / 62: what one more decoder step costs
THREADS = 2
MODES = {"greedy": 1, "beam8": 8}
BATCHES = (1, 8)
MODELS = ("tiny-pegasus", "pegasus-mid-shaped", "pegasus-xsum-shaped")
PER_STEP_MODELS = ("tiny-pegasus",)  # where per-step overhead dominates; cheap to run twice
REPEATS = {"tiny-pegasus": 5}  # calls per worker (median): a tiny model's call is too short to time once

# google/pegasus-xsum's architecture (its real config), with random weights.
XSUM_SHAPE = dict(
    d_model=1024, encoder_layers=16, decoder_layers=16, encoder_attention_heads=16, decoder_attention_heads=16,
    encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=96103, max_position_embeddings=512,
    activation_function="relu", scale_embedding=True, pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0, forced_eos_token_id=1,
)  # fmt: skip

# Issue 14's mid-size shape: the real 96k vocabulary on a smaller stack, where the embedding table weighs most.
MID_SHAPE = XSUM_SHAPE | dict(
    d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
    encoder_ffn_dim=2048, decoder_ffn_dim=2048,
)  # fmt: skip
# The same mid-size stack with room for 1024 input tokens (sinusoidal positions: no weights change), for the sweep
MID_1024_SHAPE = MID_SHAPE | dict(max_position_embeddings=1024)
SHAPES = {"pegasus-xsum-shaped": XSUM_SHAPE, "pegasus-mid-shaped": MID_SHAPE, "pegasus-mid-1024": MID_1024_SHAPE}

# Rough seconds of one generate call at batch 1 on a 2-core CPU (DESIGN.md's anchors), for the ETA only.
ROUGH_SECONDS = {("tiny-pegasus", "greedy"): 0.2, ("tiny-pegasus", "beam8"): 0.5}
ROUGH_SECONDS |= {("pegasus-xsum-shaped", "greedy"): 5.0, ("pegasus-xsum-shaped", "beam8"): 12.0}
ROUGH_SECONDS |= {("pegasus-mid-shaped", "greedy"): 1.0, ("pegasus-mid-shaped", "beam8"): 2.5}
ROUGH_LOAD_SECONDS = {"tiny-pegasus": 3.0, "pegasus-mid-shaped": 5.0, "pegasus-xsum-shaped": 15.0}


def prepare_model(name: str):
    """Build (once, cached) the checkpoint and its ortseq fp32 export."""
    from benchmarks.systems import Model

    model = Model(name, CACHE / name / "checkpoint", CACHE / name / "export")
    if not (model.checkpoint / "config.json").is_file():
        if name == "tiny-pegasus":
            _build_tiny(model.checkpoint)
        else:
            _build_random(model.checkpoint, SHAPES[name])
    if not (model.export_dir / "manifest.json").is_file():
        from ortseq.exporter.pipeline import export

        print(f"[bench] exporting {name}", flush=True)
        export(str(model.checkpoint), model.export_dir)
    return model


def _build_tiny(checkpoint: Path) -> None:
    from ortseq.exporter.tiny.pegasus import build_tiny_pegasus

    build_tiny_pegasus(checkpoint)


def _build_random(checkpoint: Path, shape: dict) -> None:
    import torch
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    from ortseq.exporter.tiny.pegasus import build_tiny_pegasus

    print(f"[bench] building a random-weight Pegasus (d_model {shape['d_model']}, 96k vocabulary)", flush=True)
    build_tiny_pegasus(checkpoint)  # for its tokenizer files; the model is replaced below
    torch.manual_seed(0)
    model = PegasusForConditionalGeneration(PegasusConfig(**shape)).eval()
    model.generation_config.update(num_beams=8, length_penalty=0.6, max_length=64)
    model.save_pretrained(checkpoint)


def input_ids(batch: int, length: int, vocab: int):
    """Ids drawn from the whole vocabulary, as real text's are: where the lookups read their rows matters
    to a memory-mapped table (docs/architecture.md, "What a call's peak is made of")."""
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, size=(batch, length)).astype(np.int64)


def worker(
    module: str,
    variant: str,
    model_dir: str,
    mode: str,
    batch: int,
    length: int,
    vocab: int,
    per_step: bool,
    repeats: int,
    new_tokens: int = NEW_TOKENS,
) -> dict:
    """Load one system, warm it up, time generate (median of `repeats` calls; and short ones for per-step time)."""
    system = importlib.import_module(f"benchmarks.systems.{module}")
    beams, ids = MODES[mode], input_ids(batch, length, vocab)
    start = time.perf_counter()
    generate = system.load(model_dir, variant, THREADS)
    load_s = time.perf_counter() - start
    load_peak = rss_mb("VmHWM")  # where the peak is the load's (a packing copy), not a call's
    generate(ids, beams, new_tokens)  # warm-up (first-run allocations, lazy initialisation)
    seconds, out = _timed(generate, ids, beams, new_tokens, repeats)
    if out.shape != (batch, 1 + new_tokens):
        raise RuntimeError(f"{module}/{variant} returned shape {out.shape}, not exactly {new_tokens} new tokens")
    result = dict(
        seconds=seconds, load_s=load_s, tokens=batch * new_tokens, peak_rss_mb=rss_mb("VmHWM"),
        load_peak_rss_mb=load_peak,
        load_average=os.getloadavg()[0], at=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )  # fmt: skip
    if per_step:
        short, _ = _timed(generate, ids, beams, SHORT_TOKENS, repeats)
        result["per_step_ms"] = 1000 * (seconds - short) / (new_tokens - SHORT_TOKENS)
    return result


def _timed(generate, ids, beams: int, new_tokens: int, repeats: int):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(ids, beams, new_tokens)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def machine() -> dict:
    """The CPU a result was measured on: times from machines of other SIMD widths do not compare (int8
    and fp32 kernels differ most between AVX2 and AVX-512)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = {}
    for line in info.splitlines():  # the first processor's block is enough: they are all alike
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    simd = sorted(flags & {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"})
    return dict(cpu=fields.get("model name", ""), cpu_count=os.cpu_count(), simd=simd)


def rss_mb(field: str = "VmHWM") -> float:
    """VmHWM: peak resident set of this process image (ru_maxrss would carry the parent's over exec);
    VmRSS: the current one."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disk_mb(path: Path) -> float:
    """Size of a directory's files (symlinked files count: they are what the system loads)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def run_worker(
    system, model_dir: Path, model: str, mode: str, batch: int, length: int, vocab: int, new_tokens: int = NEW_TOKENS
) -> dict:
    """One measurement in a fresh worker process of the system's own venv; its result dict."""
    per_step, repeats = int(model in PER_STEP_MODELS), REPEATS.get(model, 1)
    numbers = (batch, length, vocab, per_step, repeats, new_tokens)
    args = [system.module, system.variant, str(model_dir), mode, *map(str, numbers)]
    cmd = [str(system.python), str(Path(__file__).resolve()), "worker", *args]
    env = os.environ | {"OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    if system.source_ref:
        from benchmarks.systems import baseline_tree

        # an earlier ortseq, from its own source tree (systems/ortseq_system.py)
        env["PYTHONPATH"] = str(baseline_tree(system.source_ref))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{system.name} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimate_seconds(models, systems, modes, batches, rounds: int) -> float:
    total = 0.0
    for model in models:
        for mode in modes:
            for batch in batches:
                call = ROUGH_SECONDS[(model, mode)] * (1 + 0.4 * (batch - 1))  # batching amortises weight reads
                slow = sum(3 if s.name in ("transformers", "optimum-fp32") else 1 for s in systems)
                total += rounds * (slow * 2 * call + len(systems) * ROUGH_LOAD_SECONDS[model])
    return total


def run_all(models, systems, modes, batches, rounds: int) -> list[dict]:
    rows, started = [], time.perf_counter()
    points = len(models) * len(modes) * len(batches)
    done_points = 0
    for name in models:
        model = prepare_model(name)
        config = json.loads((model.checkpoint / "config.json").read_text())
        length, vocab = min(512, config["max_position_embeddings"]), config["vocab_size"]
        dirs = {}
        for system in systems:
            dirs[system.name] = importlib.import_module(f"benchmarks.systems.{system.module}").prepare(
                model, system.variant
            )
        for mode in modes:
            for batch in batches:
                samples: dict[str, list[dict]] = {s.name: [] for s in systems}
                for round_ in range(rounds):
                    for system in systems:  # systems alternate within every round
                        result = run_worker(system, dirs[system.name], name, mode, batch, length, vocab)
                        samples[system.name].append(result)
                        print(
                            f"[bench] {name} {mode} batch {batch} round {round_ + 1}/{rounds} {system.name}: "
                            f"{result['seconds']:.2f}s",
                            flush=True,
                        )
                rows += [_summary(name, mode, batch, length, s, samples[s.name], dirs[s.name]) for s in systems]
                done_points += 1
                elapsed = time.perf_counter() - started
                print(f"[bench] {done_points}/{points} points done, {elapsed / 60:.1f} min elapsed", flush=True)
    return rows


def _summary(model: str, mode: str, batch: int, length: int, system, runs: list[dict], model_dir: Path) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    row = dict(
        model=model, mode=mode, batch=batch, system=system.name, input_tokens=length, new_tokens=NEW_TOKENS,
        seconds=seconds, tokens_per_s=runs[0]["tokens"] / seconds, load_s=statistics.median(r["load_s"] for r in runs),
        peak_rss_mb=max(r["peak_rss_mb"] for r in runs), disk_mb=disk_mb(model_dir), runs=len(runs),
        samples=runs,
    )  # fmt: skip
    if "per_step_ms" in runs[0]:
        row["per_step_ms"] = statistics.median(r["per_step_ms"] for r in runs)
    return row


def _lookup(rows: list[dict]) -> dict:
    return {(r["model"], r["mode"], r["batch"], r["system"]): r for r in rows}


# (name, ortseq system, other system, field, target): ortseq is `target` times better or more
RATIOS = (
    ("ortseq-fp32 speed-up over optimum-fp32", "ortseq-fp32", "optimum-fp32", "seconds"),
    ("ortseq-fp32 speed-up over ct2-fp32", "ortseq-fp32", "ct2-fp32", "seconds"),
    ("ortseq-int8 speed-up over ct2-int8", "ortseq-int8", "ct2-int8", "seconds"),
    ("ortseq-int8 peak RSS / ct2-int8's", "ortseq-int8", "ct2-int8", "peak_rss_mb"),
    ("ortseq-int8 disk / ct2-int8's", "ortseq-int8", "ct2-int8", "disk_mb"),
    ("ortseq-fp32 speed-up over ortseq-before-fp32", "ortseq-fp32", "ortseq-before-fp32", "seconds"),
    ("ortseq-int8 speed-up over ortseq-before-int8", "ortseq-int8", "ortseq-before-int8", "seconds"),
    ("ortseq-fp32 speed-up over beam-search-op", "ortseq-fp32", "beam-search-op", "seconds"),
    ("ortseq-fp32 per-step time / beam-search-op's", "ortseq-fp32", "beam-search-op", "per_step_ms"),
)


def ratio(rows_by_key: dict, model: str, mode: str, batch: int, ours: str, other: str, field: str) -> float | None:
    a, b = rows_by_key.get((model, mode, batch, ours)), rows_by_key.get((model, mode, batch, other))
    if a is None or b is None or field not in a or field not in b:
        return None
    if field == "seconds":
        return b["seconds"] / a["seconds"]  # speed-up: > 1 means ortseq is faster
    return a[field] / b[field]  # ortseq's share: < 1 means ortseq uses less


# The targets: (model, mode, batches, ortseq system, other system, field, op, target). Issue 5's first,
# then issue 14's (memory and disk at most CTranslate2 int8's; greedy batch 1 at least CTranslate2
# fp32's speed; nowhere slower than ortseq before the static cache).
TARGETS = [
    ("pegasus-xsum-shaped", "beam8", (1, 8), "ortseq-fp32", "optimum-fp32", "seconds", ">=", 1.5),
    ("pegasus-xsum-shaped", "beam8", (1, 8), "ortseq-fp32", "ct2-fp32", "seconds", ">=", 1.0),
    ("pegasus-xsum-shaped", "beam8", (1, 8), "ortseq-int8", "ct2-int8", "seconds", ">=", 1.0),
    ("tiny-pegasus", "beam8", (1, 8), "ortseq-fp32", "beam-search-op", "per_step_ms", "<=", 2.0),
    ("tiny-pegasus", "greedy", (1, 8), "ortseq-fp32", "beam-search-op", "per_step_ms", "<=", 2.0),
]
for _shape in ("pegasus-xsum-shaped", "pegasus-mid-shaped"):
    TARGETS += [
        (_shape, "greedy", (1,), "ortseq-int8", "ct2-int8", "peak_rss_mb", "<=", 1.0),
        (_shape, "beam8", (1, 8), "ortseq-int8", "ct2-int8", "peak_rss_mb", "<=", 1.0),
        (_shape, "beam8", (1,), "ortseq-int8", "ct2-int8", "disk_mb", "<=", 1.0),
        (_shape, "greedy", (1,), "ortseq-fp32", "ct2-fp32", "seconds", ">=", 1.0),
    ]
    for _mode in MODES:
        for _variant in ("fp32", "int8"):
            TARGETS.append(
                (_shape, _mode, BATCHES, f"ortseq-{_variant}", f"ortseq-before-{_variant}", "seconds", ">=", 1.0)
            )


def verdicts(rows: list[dict]) -> list[str]:
    """Every target, met / missed with its measured ratio (or not measured)."""
    by_key, lines = _lookup(rows), []
    for model, mode, batches, ours, other, field, op, target in TARGETS:
        for batch in batches:
            value = ratio(by_key, model, mode, batch, ours, other, field)
            what = "speed-up" if field == "seconds" else f"{field} ratio"
            label = f"{model} {mode} batch {batch}: {ours} vs {other} {what} {op} {target}"
            if value is None:
                lines.append(f"[not measured] {label}")
                continue
            met = value >= target if op == ">=" else value <= target
            lines.append(f"[{'met' if met else 'MISSED'}] {label}: {value:.2f}")
    return lines


def markdown(rows: list[dict]) -> str:
    base = {(r["model"], r["mode"], r["batch"]): r["seconds"] for r in rows if r["system"] == "transformers"}
    lines = [
        "| model | mode | batch | system | time (s) | vs transformers | tokens/s | per step (ms) | load (s) "
        "| peak RSS (MB) | disk (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reference = base.get((r["model"], r["mode"], r["batch"]))
        speedup = f"{reference / r['seconds']:.2f}x" if reference else "-"
        step = f"{r['per_step_ms']:.2f}" if "per_step_ms" in r else "-"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {r['system']} | {r['seconds']:.3f} | {speedup} | "
            f"{r['tokens_per_s']:.1f} | {step} | {r['load_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['disk_mb']:.0f} |"
        )
    lines += ["", "| model | mode | batch | ratio | value |", "|---|---|---|---|---|"]
    by_key = _lookup(rows)
    for model, mode, batch in sorted({(r["model"], r["mode"], r["batch"]) for r in rows}):
        for label, ours, other, field in RATIOS:
            value = ratio(by_key, model, mode, batch, ours, other, field)
            if value is not None:
                lines.append(f"| {model} | {mode} | {batch} | {label} | {value:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (model, batch) in zip(axes[0], panels):
        mine = [r for r in rows if (r["model"], r["batch"]) == (model, batch)]
        ax.barh(
            [f"{r['mode']} {r['system']}" for r in mine],
            [r["tokens_per_s"] for r in mine],
            color=["#2a7" if r["system"].startswith("ortseq") else "#888" for r in mine],
        )
        ax.invert_yaxis()
        ax.set_title(f"{model}, batch {batch}: {NEW_TOKENS} new tokens")
        ax.set_xlabel("generated tokens/s (median; higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _choose(value: str, allowed, what: str) -> list[str]:
    chosen = [v for v in value.split(",") if v]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return chosen


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        module, variant, model_dir, mode, batch, length, vocab, per_step, repeats, new_tokens = sys.argv[2:12]
        numbers = dict(batch=int(batch), length=int(length), vocab=int(vocab), repeats=int(repeats))
        result = worker(
            module, variant, model_dir, mode, **numbers, per_step=per_step == "1", new_tokens=int(new_tokens)
        )
        print(json.dumps(result))
        return
    from benchmarks.systems import SYSTEMS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS), help="folder for bench.json, bench.md, bench.png")
    args = parser.parse_args()
    models = _choose(args.models, MODELS, "models")
    systems = [SYSTEMS[name] for name in _choose(args.systems, SYSTEMS, "systems")]
    modes = _choose(args.modes, MODES, "modes")
    batches = [int(b) for b in args.batches.split(",")]
    for system in systems:
        if system.available:
            raise SystemExit(f"{system.name}: {system.available}")
    eta = estimate_seconds(models, systems, modes, batches, args.rounds)
    print(f"[bench] {len(systems)} systems, {args.rounds} rounds: roughly {eta / 60:.0f} min", flush=True)
    print("[bench] (plus one-time conversions: optimum's export of the xsum-shaped model alone takes ~10 min)")
    rows = run_all(models, systems, modes, batches, args.rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        date=time.strftime("%Y-%m-%d"), machine=machine(), threads=THREADS, rounds=args.rounds,
        input_ids="uniform over [3, vocab_size)",
        new_tokens=NEW_TOKENS, per_step=f"(t({NEW_TOKENS} new tokens) - t({SHORT_TOKENS})) / {NEW_TOKENS - SHORT_TOKENS}",
    )  # fmt: skip
    lines = verdicts(rows)
    (out / "bench.json").write_text(json.dumps(dict(meta=meta, rows=rows, verdicts=lines), indent=2) + "\n")
    (out / "bench.md").write_text(markdown(rows) + "\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    plot(rows, out / "bench.png")
    print(markdown(rows))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
