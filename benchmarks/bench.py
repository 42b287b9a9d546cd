"""`make bench`: ortseq against transformers on the same workload, in one run, on this machine.

Workload (issue 2): 512 input tokens (fewer for tiny-pegasus's 256 positions), exactly 64 new
tokens (min = max = 64), greedy and 8 beams, batch 1. Every measurement runs in a fresh worker
process (so peak RSS and load time are per system), the systems alternate round after round, and
the table reports medians. Results: benchmarks/results/bench.{json,md,png}.

    python benchmarks/bench.py [--models tiny-pegasus,pegasus-xsum-shaped] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
RESULTS = ROOT / "benchmarks" / "results"
NEW_TOKENS = 64
THREADS = 2
MODES = {"greedy": 1, "beam8": 8}

# google/pegasus-xsum's architecture (its real config), with random weights.
XSUM_SHAPE = dict(
    d_model=1024, encoder_layers=16, decoder_layers=16, encoder_attention_heads=16, decoder_attention_heads=16,
    encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=96103, max_position_embeddings=512,
    activation_function="relu", scale_embedding=True, pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0, forced_eos_token_id=1,
)  # fmt: skip


def prepare(model: str) -> tuple[Path, Path]:
    """Build (once, cached) the checkpoint and its ortseq export; returns (checkpoint, export_dir)."""
    sys.path.insert(0, str(ROOT))
    from exporter.pipeline import export

    checkpoint, export_dir = CACHE / model / "checkpoint", CACHE / model / "export"
    if not (checkpoint / "config.json").is_file():
        build = {"tiny-pegasus": _build_tiny, "pegasus-xsum-shaped": _build_xsum_shaped}[model]
        build(checkpoint)
    if not (export_dir / "manifest.json").is_file():
        print(f"[bench] exporting {model}", flush=True)
        export(str(checkpoint), export_dir)
    return checkpoint, export_dir


def _build_tiny(checkpoint: Path) -> None:
    from exporter.tiny import build_tiny_pegasus

    build_tiny_pegasus(checkpoint)


def _build_xsum_shaped(checkpoint: Path) -> None:
    import torch
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    from exporter.tiny import build_tiny_pegasus

    print("[bench] building a random-weight pegasus-xsum-shaped model (~570M parameters)", flush=True)
    build_tiny_pegasus(checkpoint)  # for its tokenizer files; the model is replaced below
    torch.manual_seed(0)
    model = PegasusForConditionalGeneration(PegasusConfig(**XSUM_SHAPE)).eval()
    model.generation_config.update(num_beams=8, length_penalty=0.6, max_length=64)
    model.save_pretrained(checkpoint)


def input_ids(length: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, 400, size=(1, length)).astype(np.int64)


def worker(system: str, model_dir: str, mode: str, length: int) -> dict:
    """Load one system, warm it up, time one generate call; print JSON."""
    beams = MODES[mode]
    settings = dict(num_beams=beams, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    ids = input_ids(length)
    start = time.perf_counter()
    if system == "transformers":
        import torch
        from transformers import PegasusForConditionalGeneration

        torch.set_num_threads(THREADS)
        model = PegasusForConditionalGeneration.from_pretrained(model_dir).eval()

        def run():
            with torch.no_grad():
                return model.generate(torch.from_numpy(ids), **settings).numpy()
    else:
        sys.path.insert(0, str(ROOT))
        from runtime import Seq2SeqModel

        model = Seq2SeqModel.load(model_dir, threads=THREADS, verify=False)

        def run():
            return model.generate(ids, **settings)

    load_s = time.perf_counter() - start
    out = run()  # warm-up (first-run allocations, lazy initialisation)
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    generated = (out.shape[1] - 1) * out.shape[0]
    peak_rss_mb = rss_mb("VmHWM")
    return dict(seconds=seconds, load_s=load_s, tokens=int(generated), peak_rss_mb=peak_rss_mb)


def rss_mb(field: str = "VmHWM") -> float:
    """VmHWM: peak resident set of this process image (ru_maxrss would carry the parent's over exec);
    VmRSS: the current one."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def run_all(models: list[str], rounds: int) -> list[dict]:
    rows = []
    for model in models:
        checkpoint, export_dir = prepare(model)
        length = min(512, json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"])
        dirs = {"transformers": checkpoint, "ortseq": export_dir}
        weights = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / 2**20
        sizes = {"transformers": weights, "ortseq": disk_mb(export_dir)}
        for mode in MODES:
            samples: dict[str, list[dict]] = {system: [] for system in dirs}
            for round_ in range(rounds):
                for system in dirs:  # alternate systems every round
                    cmd = [sys.executable, __file__, "worker", system, str(dirs[system]), mode, str(length)]
                    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                    samples[system].append(result)
                    print(
                        f"[bench] {model} {mode} round {round_ + 1}/{rounds} {system}: {result['seconds']:.2f}s",
                        flush=True,
                    )
            for system, runs in samples.items():
                seconds = statistics.median(r["seconds"] for r in runs)
                rows.append(
                    dict(
                        model=model, mode=mode, system=system, input_tokens=length, seconds=seconds,
                        tokens_per_s=runs[0]["tokens"] / seconds, load_s=statistics.median(r["load_s"] for r in runs),
                        peak_rss_mb=max(r["peak_rss_mb"] for r in runs), disk_mb=sizes[system], runs=len(runs),
                    )
                )  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    base = {(r["model"], r["mode"]): r["seconds"] for r in rows if r["system"] == "transformers"}
    lines = [
        "| model | mode | system | time (s) | speed-up vs transformers | tokens/s | load (s) | peak RSS (MB) | disk (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = base[(r["model"], r["mode"])] / r["seconds"]
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['system']} | {r['seconds']:.3f} | {speedup:.2f}x | "
            f"{r['tokens_per_s']:.1f} | {r['load_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['disk_mb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        labels = [f"{r['mode']}\n{r['system']}" for r in mine]
        ax.bar(
            labels,
            [r["seconds"] for r in mine],
            color=["#888" if r["system"] == "transformers" else "#2a7" for r in mine],
        )
        ax.set_title(f"{model}: {NEW_TOKENS} new tokens, batch 1")
        ax.set_ylabel("seconds (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-pegasus,pegasus-xsum-shaped")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    rows = run_all(args.models.split(","), args.rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), cpu_count=os.cpu_count(), threads=THREADS, rounds=args.rounds)
    (RESULTS / "bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    (RESULTS / "bench.md").write_text(markdown(rows))
    plot(rows, RESULTS / "bench.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
