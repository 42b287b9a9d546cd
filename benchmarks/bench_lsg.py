"""`make bench-lsg`: the LSG encoder at 1024, 2048 and 4096 tokens, three ways, in one run.

Model: pegasus-large-shaped LSG-Pegasus with random weights and the real sizes (16 encoder layers,
d_model 1024, 16 heads, ffn 4096, vocab 96103, 4096 positions, block 128, sparse block 128, factor 2,
1 global token, norm), built by the reference code itself so that both sides load the same folder.
Systems, each in a fresh worker process per length (peak RSS is per system and length):

* ortseq-lsg:        our encoder.onnx (LSG attention as ortseq::LSGAttention) on onnxruntime CPU
* reference-lsg:     the reference LSG encoder (lsg-converter 0.1.9's modeling file, torch) in .venv-lsg-ref
* transformers-full: the same weights as a plain Pegasus encoder (full attention), transformers 5.x

Encoder only (no decoder, no cross K/V), batch 1, THREADS threads, median of --rounds timed runs
after one warm-up. Results: benchmarks/results/bench_lsg.{json,md,png}.

    python benchmarks/bench_lsg.py [--lengths 1024,2048,4096] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench" / "lsg-large-shaped"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import rss_mb  # noqa: E402  (stdlib-only module: also imports in the reference venv)

REFERENCE_PYTHON = ROOT / ".venv-lsg-ref" / "bin" / "python"
THREADS = 2
SYSTEMS = ("ortseq-lsg", "reference-lsg", "transformers-full")

# google/pegasus-large's architecture (shared/LSG.md, "Real configuration values") with the LSG keys
# of ccdv/lsg-pegasus-large-4096. One decoder layer: only the encoder is measured.
LARGE_LSG_CONFIG = dict(
    vocab_size=96103, d_model=1024, encoder_layers=16, decoder_layers=1, encoder_attention_heads=16,
    decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=4096,
    activation_function="relu", scale_embedding=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    block_size=128, sparse_block_size=128, sparsity_factor=2, sparsity_type="norm", num_global_tokens=1,
    pass_global_tokens_to_decoder=True, adaptive=True,
)  # fmt: skip


def build_reference_checkpoint(out: Path) -> None:
    """Runs in .venv-lsg-ref: a random LSG model from the reference code, saved as a remote-code folder."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts" / "lsg_golden"))
    from make_goldens import load_reference_module, reference_modeling_path

    module = load_reference_module(reference_modeling_path())
    torch.manual_seed(0)
    model = module.LSGPegasusForConditionalGeneration(module.LSGPegasusConfig(**LARGE_LSG_CONFIG)).eval()
    model.save_pretrained(out)


def export_ortseq_encoder(checkpoint: Path, out: Path) -> None:
    """Our LSG encoder (without the decoder's cross K/V) to out/encoder.onnx, checked against torch."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from torch import nn

    from ortseq.exporter import onnx_export
    from ortseq.exporter.families import lsg_pegasus

    torch.set_num_threads(THREADS)
    model = lsg_pegasus.LSGPegasusFamily().load_model(str(checkpoint))
    encoder = lsg_pegasus.EncoderExport(model).eval()
    encoder.cross_attentions = nn.ModuleList()  # the benchmark is the encoder proper
    ids = torch.randint(3, 1000, (1, 300))
    out.mkdir(parents=True, exist_ok=True)
    names = ["last_hidden_state", "encoder_attention_mask"]
    axes = {name: {0: "batch", 1: "length"} for name in ["input_ids", "attention_mask", *names]}
    onnx_export.export_graph(
        encoder, (ids, torch.ones_like(ids)), out / "encoder.onnx", ["input_ids", "attention_mask"], names, axes,
        external_data=True, finalize=lambda graph: lsg_pegasus.finalize_encoder_graph(encoder, graph),
    )  # fmt: skip
    check = torch.randint(3, 1000, (1, 1000))
    with torch.no_grad():
        want = encoder(check, torch.ones_like(check))[0].numpy()
    session = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(
        ["last_hidden_state"], {"input_ids": check.numpy(), "attention_mask": np.ones((1, 1000), np.int64)}
    )
    error = float(np.abs(got[0] - want).max())
    if error > 1e-3:
        raise SystemExit(f"exported encoder differs from torch by {error}")
    print(f"[bench-lsg] exported encoder, max abs diff vs torch at 1000 tokens: {error:.2e}", flush=True)


def prepare() -> tuple[Path, Path]:
    checkpoint, export_dir = CACHE / "checkpoint", CACHE / "ortseq"
    if not (checkpoint / "config.json").is_file():
        print(f"[bench-lsg] building the reference model in {checkpoint}", flush=True)
        subprocess.run([str(REFERENCE_PYTHON), __file__, "build-reference", str(checkpoint)], check=True)
    if not (export_dir / "encoder.onnx").is_file():
        print(f"[bench-lsg] exporting our encoder to {export_dir}", flush=True)
        subprocess.run([sys.executable, __file__, "export", str(checkpoint), str(export_dir)], check=True)
    return checkpoint, export_dir


def worker(system: str, checkpoint: str, export_dir: str, length: int, rounds: int) -> dict:
    """Load one system, warm it up at this length, time `rounds` encoder calls; print JSON."""
    import numpy as np

    ids = np.random.default_rng(length).integers(3, 96000, size=(1, length), dtype=np.int64)
    mask = np.ones_like(ids)
    if system == "ortseq-lsg":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        session = ort.InferenceSession(f"{export_dir}/encoder.onnx", options, providers=["CPUExecutionProvider"])

        def run():
            return session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
    else:
        import torch

        torch.set_num_threads(THREADS)
        if system == "reference-lsg":
            from transformers import AutoModelForSeq2SeqLM

            model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
        else:
            from transformers import PegasusForConditionalGeneration

            model = PegasusForConditionalGeneration.from_pretrained(checkpoint).eval()
        encoder = model.get_encoder()
        tensors = torch.from_numpy(ids), torch.from_numpy(mask)

        def run():
            with torch.no_grad():
                return encoder(input_ids=tensors[0], attention_mask=tensors[1], return_dict=True)[0].numpy()

    loaded_mb = rss_mb("VmRSS")
    run()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    peak = rss_mb("VmHWM")
    return dict(seconds=statistics.median(times), peak_rss_mb=peak, working_mb=peak - loaded_mb, rows=out.shape[1])


def run_all(lengths: list[int], rounds: int) -> list[dict]:
    checkpoint, export_dir = prepare()
    pythons = {
        "ortseq-lsg": sys.executable,
        "reference-lsg": str(REFERENCE_PYTHON),
        "transformers-full": sys.executable,
    }
    rows = []
    for length in lengths:
        for system in SYSTEMS:
            cmd = [
                pythons[system],
                __file__,
                "worker",
                system,
                str(checkpoint),
                str(export_dir),
                str(length),
                str(rounds),
            ]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            rows.append(dict(system=system, length=length, **result))
            print(f"[bench-lsg] {length} tokens, {system}: {result['seconds']:.2f}s, peak {result['peak_rss_mb']:.0f} MB",
                  flush=True)  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    ours = {r["length"]: r["seconds"] for r in rows if r["system"] == "ortseq-lsg"}
    lines = [
        "| tokens | system | time (s) | ortseq speed-up | peak RSS (MB) | working memory over loaded (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['system']} | {r['seconds']:.2f} | {r['seconds'] / ours[r['length']]:.2f}x | "
            f"{r['peak_rss_mb']:.0f} | {r['working_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for system in SYSTEMS:
        mine = [r for r in rows if r["system"] == system]
        lengths = [r["length"] for r in mine]
        left.plot(lengths, [r["seconds"] for r in mine], marker="o", label=system)
        right.plot(lengths, [r["working_mb"] for r in mine], marker="o", label=system)
    left.set(title="encoder time, batch 1", xlabel="input tokens", ylabel="seconds (median)")
    right.set(title="working memory (peak RSS - RSS after load)", xlabel="input tokens", ylabel="MB")
    for ax in (left, right):
        ax.legend()
        ax.set_xticks(sorted({r["length"] for r in rows}))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    commands = {
        "worker": lambda a: print(json.dumps(worker(a[0], a[1], a[2], int(a[3]), int(a[4])))),
        "build-reference": lambda a: build_reference_checkpoint(Path(a[0])),
        "export": lambda a: export_ortseq_encoder(Path(a[0]), Path(a[1])),
    }
    if len(sys.argv) > 1 and sys.argv[1] in commands:
        sys.path.insert(0, str(ROOT))
        commands[sys.argv[1]](sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = run_all([int(x) for x in args.lengths.split(",")], args.rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_lsg.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "bench_lsg.md").write_text(markdown(rows))
    plot(rows, RESULTS / "bench_lsg.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
