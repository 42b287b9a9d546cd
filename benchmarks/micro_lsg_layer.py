"""One LSG encoder layer at pegasus-large shape: ortseq's encoder.onnx vs transformers' full attention (sdpa).

A micro benchmark for issue 14's LSG target: bench_lsg.py's model (LARGE_LSG_CONFIG) cut to ONE
encoder layer and a small vocabulary, so that a change to the export or the session can be judged in
a minute on the shared 2-core machine. Each system runs in its own process per thread count; the
systems alternate, round after round, and the median is reported.

    python benchmarks/micro_lsg_layer.py [--length 4096] [--threads 2,1] [--rounds 5] [--out DIR]
    python benchmarks/micro_lsg_layer.py profile DIR [--length 4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_lsg import LARGE_LSG_CONFIG, export_encoder_proper, profiled_session, serve_runs  # noqa: E402

LSG_KEYS = ("block_size", "sparse_block_size", "sparsity_factor", "sparsity_type", "num_global_tokens",
            "pass_global_tokens_to_decoder", "adaptive")  # fmt: skip
ONE_LAYER = dict(LARGE_LSG_CONFIG, encoder_layers=1, vocab_size=1000, max_position_embeddings=8192)


def build_model():
    """transformers' Pegasus with one large-shaped encoder layer, the LSG parts attached (as load_model does)."""
    import torch
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    from ortseq.exporter.families.lsg_pegasus import LSGEncoderConfig
    from ortseq.graphs.lsg import GLOBALS_KEY, POSITIONS_KEY

    torch.manual_seed(0)
    config = PegasusConfig(**{k: v for k, v in ONE_LAYER.items() if k not in LSG_KEYS})
    config._attn_implementation = "sdpa"
    model = PegasusForConditionalGeneration(config).eval()
    model.lsg_config = LSGEncoderConfig.from_config(ONE_LAYER)
    model.lsg_weights = {
        GLOBALS_KEY: torch.randn(512, config.d_model),
        POSITIONS_KEY: model.model.encoder.embed_positions.weight.detach().clone(),
    }
    return model


def export(out: Path) -> None:
    import torch

    model = build_model()
    export_encoder_proper(model, out, external_data=False)
    torch.save(model.model.encoder.state_dict(), out / "torch_encoder.pt")


def session(directory: str, threads: int, **config):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(f"{directory}/encoder.onnx", options, providers=["CPUExecutionProvider"])


def worker(system: str, directory: str, length: int, threads: int) -> None:
    """Load and warm up, then answer `run` lines with one call's seconds.

    system: `torch-sdpa`, or `ortseq` with optional session config entries (`ortseq:key=value:...`).
    """
    import numpy as np

    ids = np.random.default_rng(length).integers(3, 1000, size=(1, length), dtype=np.int64)
    mask = np.ones_like(ids)
    if system.startswith("ortseq"):
        sess = session(directory, threads, **dict(entry.split("=", 1) for entry in system.split(":")[1:]))

        def run():
            return sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
    else:
        import torch

        torch.set_num_threads(threads)
        encoder = build_model().model.encoder
        encoder.load_state_dict(torch.load(f"{directory}/torch_encoder.pt"))
        tensors = torch.from_numpy(ids), torch.from_numpy(mask)

        def run():
            with torch.no_grad():
                return encoder(input_ids=tensors[0], attention_mask=tensors[1], return_dict=True)[0].numpy()

    run()  # warm-up
    serve_runs(run)


def ask(process, line: str) -> dict:
    if line:
        process.stdin.write(line + "\n")
        process.stdin.flush()
    for answer in process.stdout:
        if answer.startswith("{"):
            return json.loads(answer)
    raise SystemExit(f"worker died (exit {process.wait()})")


def compare(systems: dict[str, tuple[str, Path]], length: int, threads: int, rounds: int) -> dict:
    """systems: label -> (worker system, export directory). The first must be torch-sdpa."""
    samples = {}
    workers = {}
    for label, (system, directory) in systems.items():  # one at a time: loading in parallel would time each other
        cmd = [sys.executable, __file__, "worker", system, str(directory), str(length), str(threads)]
        workers[label] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ask(workers[label], "")
        samples[label] = []
    for _ in range(rounds):
        for system, process in workers.items():
            samples[system].append(ask(process, "run")["seconds"])
    for process in workers.values():
        process.stdin.write("stop\n")
        process.stdin.close()
        process.wait()
    medians = {label: statistics.median(s) for label, s in samples.items()}
    torch_median = medians["torch-sdpa"]
    print(f"{length} tokens, {threads} threads, {rounds} rounds (median, min, torch-sdpa median / median):")
    for label, times in samples.items():
        print(f"  {label:28} {medians[label] * 1000:6.0f} ms  min {min(times) * 1000:6.0f}  "
              f"{torch_median / medians[label]:.2f}x  ({' '.join(f'{x * 1000:.0f}' for x in times)})", flush=True)  # fmt: skip
    return dict(length=length, threads=threads, samples=samples, medians=medians)


def profile(directory: str, length: int, threads: int) -> None:
    """Kernel time of one call by op type (inlined LSG body nodes apart), onnxruntime's profiler."""
    import collections

    import numpy as np

    sess = profiled_session(directory, threads)
    ids = np.random.default_rng(length).integers(3, 1000, size=(1, length), dtype=np.int64)
    for _ in range(3):
        sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    events = json.loads(Path(sess.end_profiling()).read_text())
    last_call = [e for e in events if e.get("name") == "model_run"][-1]
    parts = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < last_call["ts"]:
            continue
        part = "lsg" if e["name"].startswith("_inlfunc_") else "out"
        parts[(part, e["args"]["op_name"], e["name"][:-12])] += e["dur"] / 1e3
    print(f"model_run {last_call['dur'] / 1e3:.1f} ms; kernels {sum(parts.values()):.1f} ms")
    for (part, op, name), ms in sorted(parts.items(), key=lambda x: -x[1])[:40]:
        print(f"  {part:3} {op:20} {ms:8.1f} ms  {name}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.path.insert(0, str(ROOT.parent))
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="compare", choices=["compare", "export", "profile"])
    parser.add_argument("directory", nargs="?", default=str(ROOT / ".cache" / "bench" / "micro-lsg-layer"))
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="LABEL=SYSTEM@DIR",
        help="another ortseq system to time alongside, e.g. nospin=ortseq:session.intra_op.allow_spinning=0@DIR",
    )
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    directory = Path(args.directory)
    if args.command == "profile":
        profile(str(directory), args.length, int(args.threads.split(",")[0]))
        return
    if args.command == "export" or not (directory / "encoder.onnx").is_file():
        export(directory)
        if args.command == "export":
            return
    systems = {"torch-sdpa": ("torch-sdpa", directory), "ortseq": ("ortseq", directory)}
    for also in args.also:
        label, rest = also.split("=", 1)
        system, other = rest.rsplit("@", 1)
        systems[label] = (system, Path(other))
    for threads in (int(t) for t in args.threads.split(",")):
        compare(systems, args.length, threads, args.rounds)


if __name__ == "__main__":
    main()
