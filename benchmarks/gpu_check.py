"""The GPU issue's one script: ortseq on ONNX Runtime's CUDA provider, checked, then measured.

    python benchmarks/gpu_check.py --out DIR [--provider cuda] [--quick] [--phases parity,copies,speed,lsg]

Every phase prints its lines and adds its part to DIR/gpu_check.json (written after each phase, so a
run stopped at its time limit keeps what it finished):

- parity: tiny models exported here (tiny-pegasus: the plain-ONNX self-attention; a head-size-32
  tiny Pegasus: DecoderMaskedMultiHeadAttention; tiny-bert2bert; tiny-lsg-pegasus). Tokens on the
  provider must equal the CPU provider's: greedy, 4 and 8 beams, a padded batch. fp16 and int4
  exports of tiny-pegasus load and generate on the provider.
- copies: per decode step, what crosses between host and device: onnxruntime's profiler lists
  every Memcpy node inside the decoder's runs, and the driver's own OrtValue transfers are counted.
- speed: a pegasus-xsum-shaped model with random weights, built here; 512 input tokens, exactly 64
  new tokens, 8 beams, batch 1 and 16; ortseq fp32 / fp16 / int4 and transformers' own CUDA
  generate (fp16); ms per decode step ((t(64) - t(2)) / 62) against the bandwidth floor.
- lsg: the LSG encoder (pegasus-large shape, 4096 positions) at 4096 tokens against the same
  weights as a plain Pegasus encoder (full attention) in torch on the same device.

`--provider cpu --quick` runs every phase on tiny sizes through the same code (the driver is one
code path for both devices): tests/test_gpu_check.py does that, so the script that first meets a
GPU has already run end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

NEW_TOKENS, SHORT_TOKENS = 64, 2
# the H200's HBM3e bandwidth (bytes/s), for the per-step floor
BANDWIDTH = {"cuda": 4.8e12, "cpu": 20e9}
PHASES = ("parity", "copies", "speed", "lsg")


def log(message: str) -> None:
    print(f"[gpu-check] {message}", flush=True)


# ---------------------------------------------------------------- exports


def export_tiny(work: Path, source: str, **shape) -> Path:
    """An fp32 export of a tiny model ("tiny-pegasus", ...; shape: TinyPegasusShape fields for a custom one)."""
    from ortseq.exporter.pipeline import export

    out = work / (source + "".join(f"-{k}{v}" for k, v in shape.items()))
    if (out / "manifest.json").is_file():
        return out
    if shape:
        from ortseq.exporter.tiny.pegasus import TinyPegasusShape, build_tiny_pegasus

        checkpoint = build_tiny_pegasus(out.with_name(out.name + "-checkpoint"), TinyPegasusShape(**shape))
        export(str(checkpoint), out)
    else:
        export(source, out)
    return out


def quantized(fp32: Path, to: str) -> Path:
    from ortseq.exporter.quantization.pipeline import quantize

    out = fp32.with_name(f"{fp32.name}-{to}")
    if not (out / "manifest.json").is_file():
        quantize(fp32, out, to, min_agreement=0.0)  # tiny random weights: agreement means nothing here
    return out


def padded_batch(vocab: int, batch: int = 3, length: int = 24):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(1, batch):  # rows of different lengths: the padded batch
        mask[row, length - 5 * row :] = 0
        ids[row, length - 5 * row :] = 0
    return ids, mask


# ---------------------------------------------------------------- phases


def phase_parity(work: Path, provider: str, quick: bool) -> dict:
    from ortseq.runtime import Seq2SeqModel

    models = {
        "tiny-pegasus (plain body)": export_tiny(work, "tiny-pegasus"),
        "tiny-pegasus head size 32 (DMMHA body)": export_tiny(work, "tiny-pegasus", d_model=64, heads=2),
        "tiny-bert2bert": export_tiny(work, "tiny-bert2bert"),
        "tiny-lsg-pegasus": export_tiny(work, "tiny-lsg-pegasus"),
    }
    results = {}
    for name, directory in models.items():
        cpu, device = Seq2SeqModel.load(directory), Seq2SeqModel.load(directory, provider=provider)
        ids, mask = padded_batch(cpu.manifest.dims.vocab_size)
        cases = {}
        for beams in (1, 4, 8):
            want = cpu.generate(ids, mask, num_beams=beams, max_new_tokens=16)
            got = device.generate(ids, mask, num_beams=beams, max_new_tokens=16)
            cases[f"beams {beams}"] = bool(want.shape == got.shape and np.array_equal(want, got))
        results[name] = cases
        log(f"parity {name}: {cases}")
    fp32 = models["tiny-pegasus (plain body)"]
    for to in ("fp16", "int4"):
        model = Seq2SeqModel.load(quantized(fp32, to), provider=provider)
        ids, mask = padded_batch(model.manifest.dims.vocab_size)
        out = model.generate(ids, mask, num_beams=4, max_new_tokens=16)
        results[f"tiny-pegasus {to} generates"] = bool(out.shape[0] == ids.shape[0])
        log(f"parity tiny-pegasus {to}: generated {out.shape}")
    results["all_equal"] = all(all(c.values()) for c in results.values() if isinstance(c, dict))
    return results


class TransferCounter:
    """Counts the calls through which a driver moves data between host and device: OrtValue's
    update_inplace and numpy(), ortvalue_from_numpy onto a device, and an IO binding's bind_cpu_input
    and copy_outputs_to_cpu (each is a copy when the session runs on a GPU; on CPU they wrap memory)."""

    METHODS = (("OrtValue", "update_inplace"), ("OrtValue", "numpy"), ("IOBinding", "bind_cpu_input"),
               ("IOBinding", "copy_outputs_to_cpu"))  # fmt: skip

    def __init__(self):
        import onnxruntime as ort

        self.ort, self._saved = ort, {}
        self.counts = dict.fromkeys([name for _, name in self.METHODS] + ["ortvalue_from_numpy"], 0)

    def __enter__(self):
        for owner, name in self.METHODS:
            original = getattr(getattr(self.ort, owner), name)
            self._saved[(owner, name)] = original
            setattr(getattr(self.ort, owner), name, self._counted(name, original))
        value_class = self.ort.OrtValue
        original_from_numpy = value_class.ortvalue_from_numpy

        def from_numpy(array, device_type="cpu", device_id=0, *rest):
            if device_type != "cpu":  # a CPU OrtValue wraps the array: no transfer
                self.counts["ortvalue_from_numpy"] += 1
            return original_from_numpy(array, device_type, device_id, *rest)

        value_class.ortvalue_from_numpy = staticmethod(from_numpy)
        self._saved[("OrtValue", "ortvalue_from_numpy")] = staticmethod(original_from_numpy)
        return self

    def _counted(self, name, original):
        def counted(value, *args, **kwargs):
            self.counts[name] += 1
            return original(value, *args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for (owner, name), original in self._saved.items():
            setattr(getattr(self.ort, owner), name, original)


def phase_copies(work: Path, provider: str, quick: bool) -> dict:
    """Host<->device traffic per decode step, counted two ways."""
    from ortseq.runtime import Seq2SeqModel, sessions

    directory = export_tiny(work, "tiny-pegasus", d_model=64, heads=2)
    profiles = []
    original = sessions.create_session

    def profiled(*args, **kwargs):  # create_session's own arguments, whatever they are
        session = original(*args, **kwargs)
        profiles.append(session)
        return session

    import onnxruntime as ort

    options_class = ort.SessionOptions

    class ProfiledOptions(options_class):
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(work / "profile")

    ort.SessionOptions, sessions.create_session = ProfiledOptions, profiled
    try:
        model = Seq2SeqModel.load(directory, provider=provider)
    finally:
        ort.SessionOptions, sessions.create_session = options_class, original
    model.engine.search_step_on_cpu = True  # on CPU too: count what a GPU run moves (runtime/engines.py)
    ids, mask = padded_batch(model.manifest.dims.vocab_size, batch=2)
    with TransferCounter() as counter:
        out = model.generate(ids, mask, num_beams=4, max_new_tokens=16, min_new_tokens=16)
    steps = out.shape[1] - 1
    memcpy = _memcpy_nodes([session.end_profiling() for session in profiles])
    result = dict(
        steps=steps,
        driver_transfers=counter.counts,
        driver_transfers_per_step={k: v / steps for k, v in counter.counts.items()},
        memcpy_nodes=memcpy,
    )
    log(f"copies: {steps} steps, driver transfers {counter.counts}, Memcpy nodes in the graphs' runs {memcpy}")
    return result


def _memcpy_nodes(profile_files: list[str]) -> dict:
    counts: dict[str, int] = {}
    for path in profile_files:
        for event in json.loads(Path(path).read_text()):
            op = event.get("args", {}).get("op_name", "")
            if event.get("cat") == "Node" and op.startswith("Memcpy") and event["name"].endswith("_kernel_time"):
                key = f"{Path(path).name.split('_')[0]}:{op}"
                counts[key] = counts.get(key, 0) + 1
    return counts


def phase_speed(work: Path, provider: str, quick: bool) -> dict:
    from bench import XSUM_SHAPE

    shape = dict(XSUM_SHAPE)
    if quick:  # the same code on a model small enough for a CPU test
        shape |= dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=2000)  # fmt: skip
    checkpoint = work / "xsum-shaped" / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        from bench import _build_random

        _build_random(checkpoint, shape)
    fp32 = work / "xsum-shaped" / "export"
    if not (fp32 / "manifest.json").is_file():
        from ortseq.exporter.pipeline import export

        export(str(checkpoint), fp32)
    length, batches = (64, (1, 2)) if quick else (512, (1, 16))
    new_tokens = 8 if quick else NEW_TOKENS
    rows = []
    for variant in ("fp32", "fp16", "int4"):
        directory = fp32 if variant == "fp32" else quantized(fp32, variant)
        rows += [_time_ortseq(directory, variant, provider, batch, length, new_tokens) for batch in batches]
    rows += [_time_transformers(checkpoint, provider, batch, length, new_tokens) for batch in batches]
    floor = _floor_ms(shape, provider, length)
    for row in rows:
        row["floor_ms"] = floor[row["precision"]][row["batch"]]
        row["times_floor"] = row["per_step_ms"] / row["floor_ms"]
        log(
            f"speed {row['system']} batch {row['batch']}: {row['per_step_ms']:.3f} ms/step, {row['times_floor']:.1f}x floor"
        )
    return dict(rows=rows, input_tokens=length, new_tokens=new_tokens, beams=8)


def _time_ortseq(directory: Path, variant: str, provider: str, batch: int, length: int, new_tokens: int) -> dict:
    from ortseq.runtime import Seq2SeqModel

    model = Seq2SeqModel.load(directory, provider=provider, verify=False)
    ids = np.random.default_rng(0).integers(3, 400, size=(batch, length)).astype(np.int64)

    def generate(tokens):
        return model.generate(ids, num_beams=8, max_new_tokens=tokens, min_new_tokens=tokens)

    return _per_step(f"ortseq-{variant}", variant, batch, generate, new_tokens)


def _time_transformers(checkpoint: Path, provider: str, batch: int, length: int, new_tokens: int) -> dict:
    import torch
    import transformers
    from transformers import PegasusForConditionalGeneration

    transformers.logging.set_verbosity_error()  # its max_length vs max_new_tokens notice, every call
    device = "cuda" if provider == "cuda" else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = PegasusForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, 400, size=(batch, length))).to(device)

    def generate(tokens):
        with torch.no_grad():
            out = model.generate(ids, num_beams=8, max_new_tokens=tokens, min_new_tokens=tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    precision = "fp16" if dtype == torch.float16 else "fp32"
    return _per_step(f"transformers-{precision}", precision, batch, generate, new_tokens)


def _per_step(system: str, precision: str, batch: int, generate, new_tokens: int, rounds: int = 3) -> dict:
    generate(new_tokens)  # warm-up
    long, short = [], []
    for _ in range(rounds):  # interleaved: a long and a short call per round
        start = time.perf_counter()
        generate(new_tokens)
        long.append(time.perf_counter() - start)
        start = time.perf_counter()
        generate(SHORT_TOKENS)
        short.append(time.perf_counter() - start)
    per_step = 1000 * (statistics.median(long) - statistics.median(short)) / (new_tokens - SHORT_TOKENS)
    return dict(
        system=system, precision=precision, batch=batch, seconds=long, short_seconds=short, per_step_ms=per_step
    )


def _floor_ms(shape: dict, provider: str, length: int) -> dict:
    """ms one decode step needs to read its bytes at full bandwidth: decoder weights + LM head + K/V."""
    d, layers, vocab, ffn = shape["d_model"], shape["decoder_layers"], shape["vocab_size"], shape["decoder_ffn_dim"]
    weights = layers * (6 * d * d + 2 * d * ffn) + vocab * d
    floors = {}
    for precision, size in (("fp32", 4), ("fp16", 2), ("int4", 0.5)):
        floors[precision] = {}
        for batch in (1, 2, 16):
            # cross K/V once per input (shared by the beams); self K/V per row, ~half the new tokens long on average
            kv = layers * 2 * d * (batch * length + batch * 8 * NEW_TOKENS / 2) * max(size, 2)
            floors[precision][batch] = 1000 * (weights * size + kv) / BANDWIDTH[provider]
    return floors


def phase_lsg(work: Path, provider: str, quick: bool) -> dict:
    """The LSG encoder at 4096 tokens against full attention of the same weights in torch."""
    import bench_lsg
    import onnxruntime as ort
    import torch

    from ortseq.runtime.sessions import PROVIDERS

    config = dict(bench_lsg.LARGE_LSG_CONFIG)
    length = 4096
    if quick:
        config |= dict(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128, vocab_size=2000,
                       decoder_attention_heads=2, decoder_ffn_dim=128, max_position_embeddings=1024,
                       block_size=32, sparse_block_size=32)  # fmt: skip
        length = 1024
    checkpoint, export_dir = work / "lsg" / "checkpoint", work / "lsg" / "ortseq"
    if not (checkpoint / "config.json").is_file():
        _build_lsg_checkpoint(checkpoint, config)
    if not (export_dir / "encoder.onnx").is_file():
        bench_lsg.export_ortseq_encoder(checkpoint, export_dir)
    ids = np.random.default_rng(0).integers(3, config["vocab_size"], size=(1, length)).astype(np.int64)
    session = ort.InferenceSession(str(export_dir / "encoder.onnx"), providers=[PROVIDERS[provider]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def ortseq_run():
        return session.run(["last_hidden_state"], feeds)

    from transformers import PegasusForConditionalGeneration

    device = "cuda" if provider == "cuda" else "cpu"
    encoder = PegasusForConditionalGeneration.from_pretrained(checkpoint).get_encoder().to(device).eval()
    tensor = torch.from_numpy(ids).to(device)

    def torch_run():
        with torch.no_grad():
            encoder(input_ids=tensor, attention_mask=torch.ones_like(tensor))
        if device == "cuda":
            torch.cuda.synchronize()

    rows = {}
    for name, run in (("ortseq-lsg", ortseq_run), ("torch-full-attention", torch_run)):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        rows[name] = dict(seconds=times, median_s=statistics.median(times))
        if device == "cuda" and name == "torch-full-attention":
            rows[name]["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
        log(f"lsg {name} at {length} tokens: {statistics.median(times) * 1000:.1f} ms")
    if device == "cuda":  # onnxruntime's arena keeps its peak: the device memory it holds after the runs
        rows["ortseq-lsg"]["device_mb_held"] = _device_used_mb()
    return dict(length=length, rows=rows)


def _build_lsg_checkpoint(out: Path, config: dict) -> None:
    """A random LSG-Pegasus folder as lsg-converter lays it out (exporter/tiny/lsg_pegasus.py's recipe)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    from ortseq.exporter.tiny.pegasus import build_tiny_pegasus
    from ortseq.graphs.lsg import GLOBALS_KEY, POSITIONS_KEY

    build_tiny_pegasus(out)  # tokenizer files; the model is replaced below
    torch.manual_seed(0)
    model = PegasusForConditionalGeneration(PegasusConfig(**config)).eval()
    model.save_pretrained(out)
    weights = load_file(out / "model.safetensors")
    weights[GLOBALS_KEY] = torch.randn(512, config["d_model"]) * 0.02 * config["d_model"] ** 0.5
    weights[POSITIONS_KEY] = model.model.encoder.embed_positions.weight.detach().clone()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})


def _device_used_mb() -> float:
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


# ---------------------------------------------------------------- main


def versions() -> dict:
    import onnxruntime as ort

    found = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    try:
        import torch

        found["torch"] = torch.__version__
        if torch.cuda.is_available():
            found["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--work", default=None, help="folder for the models and exports (default: OUT/../gpu-work)")
    parser.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of every phase (e.g. on CPU)")
    parser.add_argument("--phases", default=",".join(PHASES))
    args = parser.parse_args()
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "gpu-work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.provider == "cuda":
        import onnxruntime as ort

        ort.preload_dlls()  # the pip-installed CUDA and cuDNN libraries
    report = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), provider=args.provider, quick=args.quick,
                  load_average=os.getloadavg(), versions=versions(), phases={})  # fmt: skip
    phases = {"parity": phase_parity, "copies": phase_copies, "speed": phase_speed, "lsg": phase_lsg}
    for name in args.phases.split(","):
        started = time.perf_counter()
        log(f"phase {name}")
        try:
            report["phases"][name] = phases[name](work, args.provider, args.quick)
        except Exception as exc:  # keep the other phases' results: one failure must not lose the run
            report["phases"][name] = dict(error=f"{type(exc).__name__}: {exc}")
            log(f"phase {name} FAILED: {type(exc).__name__}: {exc}")
        report["phases"][name]["seconds"] = time.perf_counter() - started
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    log(f"wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
