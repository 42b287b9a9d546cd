"""`make bench-lsg`: the LSG encoder at 1024, 2048 and 4096 tokens, four ways, in one run.

Model: pegasus-large-shaped LSG-Pegasus with random weights and the real sizes (16 encoder layers,
d_model 1024, 16 heads, ffn 4096, vocab 96103, 4096 positions, block 128, sparse block 128, factor 2,
1 global token, norm), built by the reference code itself so that both sides load the same folder.
Systems, each in a worker process of its own per length (peak RSS is per system and length):

* ortseq-lsg:        our encoder.onnx (LSG attention as ortseq::LSGAttention) on onnxruntime CPU
* ortseq-lsg-int8:   the same graph after `ortseq quantize --to int8`'s transform (dynamic int8 MatMuls)
* reference-lsg:     the reference LSG encoder (lsg-converter 0.1.9's modeling file, torch) in .venv-lsg-ref
* transformers-full: the same weights as a plain Pegasus encoder (full attention), transformers 5.x

Encoder only (no decoder, no cross K/V), batch 1, THREADS threads. At each length the four workers
load and warm up, then time one call each, round after round, the systems interleaved, so that a
change of machine load hits every system alike; the table gives the median of the rounds and every
round's sample, with the load average before each round. Results: benchmarks/results/bench_lsg.{json,md,png}.

    python benchmarks/bench_lsg.py [--lengths 1024,2048,4096] [--rounds 3]
    python benchmarks/bench_lsg.py profile .cache/bench/lsg-large-shaped/ortseq[-int8] 4096   # after a run
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
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
SYSTEMS = ("ortseq-lsg", "ortseq-lsg-int8", "reference-lsg", "transformers-full")
# The export is cached; these files make it, so a change to them makes a new one.
EXPORT_SOURCES = ("exporter/lsg_attention.py", "exporter/families/lsg_pegasus.py", "exporter/families/pegasus.py",
                  "exporter/conv_linear.py",
                  "exporter/onnx_export.py", "exporter/quantization/formats.py", "graphs/lsg.py")  # fmt: skip

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

    from ortseq.exporter.families import lsg_pegasus

    torch.set_num_threads(THREADS)
    model = lsg_pegasus.LSGPegasusFamily().load_model(str(checkpoint))
    encoder = export_encoder_proper(model, out, external_data=True)
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


def export_encoder_proper(model, out: Path, external_data: bool):
    """model's LSG encoder without the decoder's cross K/V to out/encoder.onnx; returns the exported module."""
    import torch
    from torch import nn

    from ortseq.exporter import onnx_export
    from ortseq.exporter.families import lsg_pegasus

    encoder = lsg_pegasus.EncoderExport(model).eval()
    encoder.cross_attentions = nn.ModuleList()  # the benchmark is the encoder proper
    ids = torch.randint(3, 1000, (1, 300))
    out.mkdir(parents=True, exist_ok=True)
    names = ["last_hidden_state", "encoder_attention_mask"]
    axes = {name: {0: "batch", 1: "length"} for name in ["input_ids", "attention_mask", *names]}
    onnx_export.export_graph(
        encoder, (ids, torch.ones_like(ids)), out / "encoder.onnx", ["input_ids", "attention_mask"], names, axes,
        external_data=external_data, finalize=lambda graph: lsg_pegasus.finalize_encoder_graph(encoder, graph),
    )  # fmt: skip
    return encoder


def export_int8_encoder(export_dir: Path, out: Path) -> None:
    """The fp32 encoder through the int8 transform of `ortseq quantize --to int8` (default settings)."""
    from ortseq.exporter.quantization.formats import Int8Settings, quantize_int8
    from ortseq.exporter.shared_weights import SharedFile

    out.mkdir(parents=True, exist_ok=True)
    vocab_size = LARGE_LSG_CONFIG["vocab_size"]
    # the int8 token table goes to out/embeddings.data, as in a quantized export (the graph names it)
    shared = SharedFile(out)
    quantize_int8(export_dir / "encoder.onnx", out / "encoder.onnx", Int8Settings(), vocab_size, True, shared)
    print("[bench-lsg] quantized the encoder to int8", flush=True)


def profiled_session(export_dir, threads: int):
    """An onnxruntime CPU session over export_dir/encoder.onnx with its profiler on (end_profiling() -> file)."""
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="lsg-profile-")) / "profile")
    return ort.InferenceSession(f"{export_dir}/encoder.onnx", options, providers=["CPUExecutionProvider"])


def export_fingerprint() -> str:
    digest = hashlib.sha256()
    for name in EXPORT_SOURCES:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def prepare() -> tuple[Path, dict[str, Path]]:
    """The reference checkpoint and our two encoders (fp32, int8), built once and re-built when stale."""
    checkpoint, exports = (
        CACHE / "checkpoint",
        {"ortseq-lsg": CACHE / "ortseq", "ortseq-lsg-int8": CACHE / "ortseq-int8"},
    )
    if not (checkpoint / "config.json").is_file():
        print(f"[bench-lsg] building the reference model in {checkpoint}", flush=True)
        subprocess.run([str(REFERENCE_PYTHON), __file__, "build-reference", str(checkpoint)], check=True)
    fingerprint = export_fingerprint()
    stamp = CACHE / "export.sha256"
    if (
        not stamp.is_file()
        or stamp.read_text() != fingerprint
        or not (exports["ortseq-lsg-int8"] / "encoder.onnx").is_file()
    ):
        print(f"[bench-lsg] exporting our encoder to {exports['ortseq-lsg']}", flush=True)
        subprocess.run([sys.executable, __file__, "export", str(checkpoint), str(exports["ortseq-lsg"])], check=True)
        subprocess.run([sys.executable, __file__, "int8", str(exports["ortseq-lsg"]), str(exports["ortseq-lsg-int8"])],
                       check=True)  # fmt: skip
        stamp.write_text(fingerprint)
    return checkpoint, exports


def worker(system: str, checkpoint: str, export_dir: str, length: int) -> None:
    """Load one system and warm it up at this length, then answer stdin's lines: `run` times one
    encoder call (prints its seconds), `stop` prints the memory figures and ends."""
    import numpy as np

    ids = np.random.default_rng(length).integers(3, 96000, size=(1, length), dtype=np.int64)
    mask = np.ones_like(ids)
    if system.startswith("ortseq"):
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
    rows = run().shape[1]  # warm-up
    serve_runs(run)
    peak = rss_mb("VmHWM")
    print(json.dumps(dict(peak_rss_mb=peak, working_mb=peak - loaded_mb, rows=rows)), flush=True)


def serve_runs(run) -> None:
    """Say ready, then time one run() per `run` line of stdin (prints its seconds), until another line."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        run()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


class Worker:
    """One system's worker process at one length, driven line by line."""

    def __init__(self, system: str, checkpoint: Path, export_dir: Path | None, length: int):
        python = str(REFERENCE_PYTHON) if system == "reference-lsg" else sys.executable
        cmd = [python, __file__, "worker", system, str(checkpoint), str(export_dir or ""), str(length)]
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.system = system

    def ask(self, line: str) -> dict:
        if line:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        for answer in self.process.stdout:
            if answer.startswith("{"):
                return json.loads(answer)
            print(f"[bench-lsg] {self.system}: {answer.rstrip()}", file=sys.stderr)  # a library's print
        raise SystemExit(f"[bench-lsg] the {self.system} worker died (exit {self.process.wait()})")

    def stop(self) -> dict:
        result = self.ask("stop")
        self.process.wait()
        return result


def run_all(lengths: list[int], rounds: int) -> list[dict]:
    checkpoint, exports = prepare()
    rows = []
    for length in lengths:
        workers = []
        for system in SYSTEMS:  # one at a time: loading and warming up in parallel would time each other
            workers.append(Worker(system, checkpoint, exports.get(system), length))
            workers[-1].ask("")
        samples = {system: [] for system in SYSTEMS}
        loads = []
        for _ in range(rounds):
            loads.append(round(os.getloadavg()[0], 2))
            for w in workers:
                samples[w.system].append(w.ask("run")["seconds"])
            done = ", ".join(f"{system} {times[-1]:.2f}s" for system, times in samples.items())
            print(f"[bench-lsg] {length} tokens, round {len(loads)} (load average {loads[-1]}): {done}", flush=True)
        for w in workers:
            memory = w.stop()
            seconds = statistics.median(samples[w.system])
            rows.append(dict(system=w.system, length=length, seconds=seconds, samples=samples[w.system],
                             load_average=loads, **memory))  # fmt: skip
            print(f"[bench-lsg] {length} tokens, {w.system}: {seconds:.2f}s "
                  f"({' '.join(f'{s:.2f}' for s in samples[w.system])}), peak {memory['peak_rss_mb']:.0f} MB",
                  flush=True)  # fmt: skip
        print(f"[bench-lsg] {length} tokens: load average before each round {loads}", flush=True)
    return rows


# Outside the LSG body every matrix product multiplies by a weight (fp32 and int8 forms).
# Conv: the fp32 LSG encoder exports its linear layers as 1x1 Convs (exporter/conv_linear.py)
LINEAR_OPS = {"MatMul", "Gemm", "FusedMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "Conv"}


def profile(export_dir: str, length: int) -> None:
    """Where one encoder call's time goes: onnxruntime's profiler, kernel times summed by part and op type.

    Parts: the LSG attention body (the nodes onnxruntime inlined from the ortseq::LSGAttention
    function), the linear layers (outside it, every matrix product is one, and their bias Adds) and the rest.
    """
    import collections
    import re

    import numpy as np

    session = profiled_session(export_dir, THREADS)
    ids = np.random.default_rng(length).integers(3, 96000, size=(1, length), dtype=np.int64)
    for _ in range(2):  # the first call warms up
        session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    events = json.loads(Path(session.end_profiling()).read_text())
    last_call = [e for e in events if e.get("name") == "model_run"][-1]["ts"]
    parts = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < last_call:
            continue
        name, op = e["name"], e["args"]["op_name"]
        if name.startswith("_inlfunc_"):
            part = "LSG attention body"
        elif re.match(r"/(q_proj|k_proj|v_proj|out_proj|fc1|fc2)/", name) or op in LINEAR_OPS:
            part = "linear layers"
        else:
            part = "other"
        parts[(part, op)] += e["dur"] / 1e6
    total = sum(parts.values())
    for part in ("linear layers", "LSG attention body", "other"):
        mine = {op: s for (p, op), s in parts.items() if p == part}
        ops = ", ".join(f"{op} {s:.2f}" for op, s in sorted(mine.items(), key=lambda x: -x[1])[:6])
        print(f"{part}: {sum(mine.values()):.2f} s ({100 * sum(mine.values()) / total:.0f}%): {ops}")


def markdown(run: dict) -> str:
    """Per length and system: median time, its speed-up over full attention and over the reference
    (same run, same rounds), every round's sample and the memory figures."""
    rows = run["rows"]
    by = {(r["length"], r["system"]): r["seconds"] for r in rows}
    lines = [
        f"{run['date']}, {run['rounds']} interleaved rounds, {THREADS} threads, batch 1; "
        f"load average (1 min) before each round: "
        + "; ".join(f"{length}: {loads}" for length, loads in run["load_average"].items()),
        "",
        "| tokens | system | median (s) | speed-up over full attention | speed-up over the reference | "
        "every round (s) | peak RSS (MB) | working memory over loaded (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        full, reference = by[(r["length"], "transformers-full")], by[(r["length"], "reference-lsg")]
        lines.append(
            f"| {r['length']} | {r['system']} | {r['seconds']:.2f} | {full / r['seconds']:.2f}x | "
            f"{reference / r['seconds']:.2f}x | {' '.join(f'{s:.2f}' for s in r['samples'])} | "
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
        "worker": lambda a: worker(a[0], a[1], a[2], int(a[3])),
        "build-reference": lambda a: build_reference_checkpoint(Path(a[0])),
        "export": lambda a: export_ortseq_encoder(Path(a[0]), Path(a[1])),
        "int8": lambda a: export_int8_encoder(Path(a[0]), Path(a[1])),
        "profile": lambda a: profile(a[0], int(a[1])),
    }
    if len(sys.argv) > 1 and sys.argv[1] in commands:
        sys.path.insert(0, str(ROOT))
        commands[sys.argv[1]](sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = run_all([int(x) for x in args.lengths.split(",")], args.rounds)
    loads = {r["length"]: r["load_average"] for r in rows}
    run = dict(date=date, rounds=args.rounds, threads=THREADS, load_average=loads, rows=rows,
               wall_seconds=round(time.perf_counter() - started))  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_lsg.json").write_text(json.dumps(run, indent=1))
    (RESULTS / "bench_lsg.md").write_text(markdown(run))
    plot(rows, RESULTS / "bench_lsg.png")
    print(markdown(run))
    print(f"[bench-lsg] done in {run['wall_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
