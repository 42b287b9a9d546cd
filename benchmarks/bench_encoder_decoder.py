"""roberta2roberta_L-24-shaped speed line: ortseq fp32 vs transformers vs optimum's no-cache export, one run.

Same method as bench.py (a fresh worker process per measurement, systems alternating round after
round, medians, peak RSS of the worker): 510 input tokens (the 512-entry RoBERTa position table
minus padding_idx + 1), exactly 64 new tokens, batch 1. The model has google/roberta2roberta_L-24_discofuse's
shape (24 + 24 layers, hidden 1024, 16 heads, ffn 4096, vocab 50265, 512 positions, encoder and
decoder tied as that checkpoint is) with random weights.

optimum exports EncoderDecoderModel only without a KV cache, and needs transformers < 4.58: it runs
from its own venv (`.venv-optimum`, see --optimum-python).

    python benchmarks/bench_encoder_decoder.py [--rounds 2] [--optimum-modes greedy]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import MODES, NEW_TOKENS, RESULTS, ROOT, THREADS, disk_mb, input_ids, markdown, rss_mb  # noqa: E402

CACHE = ROOT / ".cache" / "bench" / "roberta2roberta-L24-shaped"
MODEL = "roberta2roberta-L24-shaped"
# google/roberta2roberta_L-24_discofuse's architecture
ROBERTA_L24 = dict(
    vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    max_position_embeddings=512, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
)  # fmt: skip


def build_checkpoint(checkpoint: Path) -> None:
    import torch
    from transformers import EncoderDecoderConfig, EncoderDecoderModel, RobertaConfig

    from ortseq.exporter.tiny.encoder_decoder import tie_decoder_to_encoder, train_byte_level_bpe

    print("[bench] building a random-weight roberta2roberta_L-24-shaped model", flush=True)
    checkpoint.mkdir(parents=True, exist_ok=True)
    train_byte_level_bpe(checkpoint, 400, 0)  # tokenizer files only; the inputs are random ids
    encoder = RobertaConfig(**ROBERTA_L24)
    decoder = RobertaConfig(**ROBERTA_L24, is_decoder=True, add_cross_attention=True)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        encoder, decoder, decoder_start_token_id=0, pad_token_id=1, eos_token_id=2, tie_encoder_decoder=True
    )
    torch.manual_seed(0)
    model = EncoderDecoderModel(config=config).eval()
    tie_decoder_to_encoder(model)
    model.generation_config.update(decoder_start_token_id=0, pad_token_id=1, eos_token_id=2, bos_token_id=0)
    model.save_pretrained(checkpoint)


def prepare(optimum_python: Path | None) -> dict[str, Path]:
    from ortseq.exporter.pipeline import export

    checkpoint = CACHE / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        build_checkpoint(checkpoint)
    dirs = {"transformers": checkpoint, "ortseq": CACHE / "export"}
    if not (dirs["ortseq"] / "manifest.json").is_file():
        print("[bench] exporting with ortseq", flush=True)
        start = time.perf_counter()
        export(str(checkpoint), dirs["ortseq"])
        print(f"[bench] ortseq export took {time.perf_counter() - start:.0f} s", flush=True)
    if optimum_python:
        dirs["optimum"] = CACHE / "optimum"
        if not (dirs["optimum"] / "decoder_model.onnx").is_file():
            print("[bench] exporting with optimum-cli (no KV cache: the only mode it offers)", flush=True)
            start = time.perf_counter()
            cli = [str(optimum_python), "-m", "optimum.exporters.onnx", "--model", str(checkpoint)]
            subprocess.run([*cli, "--task", "text2text-generation", str(dirs["optimum"])], check=True)
            print(f"[bench] optimum export took {time.perf_counter() - start:.0f} s", flush=True)
    return dirs


def worker(system: str, model_dir: str, mode: str, length: int) -> dict:
    """Load one system, warm it up, time one generate call (same protocol as bench.py)."""
    settings = dict(num_beams=MODES[mode], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    ids = input_ids(length)
    start = time.perf_counter()
    if system in ("transformers", "optimum"):
        import torch

        torch.set_num_threads(THREADS)
        if system == "transformers":
            from transformers import EncoderDecoderModel

            model = EncoderDecoderModel.from_pretrained(model_dir).eval()
        else:
            import onnxruntime
            from optimum.onnxruntime import ORTModelForSeq2SeqLM

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = THREADS
            model = ORTModelForSeq2SeqLM.from_pretrained(model_dir, use_cache=False, session_options=options)

        def run():
            with torch.no_grad():
                return model.generate(
                    torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long), **settings
                ).numpy()
    else:
        from ortseq.runtime import Seq2SeqModel

        model = Seq2SeqModel.load(model_dir, threads=THREADS, verify=False)

        def run():
            return model.generate(ids, **settings)

    load_s = time.perf_counter() - start
    run()  # warm-up
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    return dict(
        seconds=seconds, load_s=load_s, tokens=int((out.shape[1] - 1) * out.shape[0]), peak_rss_mb=rss_mb("VmHWM")
    )


def run_all(dirs: dict[str, Path], rounds: int, optimum_python: Path | None, optimum_modes: set[str]) -> list[dict]:
    length = min(512, json.loads((dirs["ortseq"] / "manifest.json").read_text())["dims"]["max_position_embeddings"])
    sizes = {
        "transformers": sum(f.stat().st_size for f in dirs["transformers"].glob("*.safetensors")) / 2**20,
        "ortseq": disk_mb(dirs["ortseq"]),
    }
    if "optimum" in dirs:
        sizes["optimum"] = sum(f.stat().st_size for f in dirs["optimum"].glob("*.onnx*")) / 2**20
    rows = []
    for mode in MODES:
        systems = [s for s in dirs if s != "optimum" or mode in optimum_modes]
        samples: dict[str, list[dict]] = {system: [] for system in systems}
        for round_ in range(rounds):
            for system in systems:  # alternate systems every round
                python = str(optimum_python) if system == "optimum" else sys.executable
                cmd = [python, __file__, "worker", system, str(dirs[system]), mode, str(length)]
                result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                samples[system].append(result)
                print(f"[bench] {mode} round {round_ + 1}/{rounds} {system}: {result['seconds']:.2f}s", flush=True)
        for system, runs in samples.items():
            seconds = statistics.median(r["seconds"] for r in runs)
            rows.append(
                dict(
                    model=MODEL, mode=mode, system=system if system != "optimum" else "optimum ORT (no KV cache)",
                    input_tokens=length, seconds=seconds, tokens_per_s=runs[0]["tokens"] / seconds,
                    load_s=statistics.median(r["load_s"] for r in runs),
                    peak_rss_mb=max(r["peak_rss_mb"] for r in runs), disk_mb=sizes[system], runs=len(runs),
                )
            )  # fmt: skip
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--optimum-python", type=Path, default=ROOT / ".venv-optimum" / "bin" / "python")
    parser.add_argument("--optimum-modes", default="greedy,beam8", help="modes optimum runs in (no cache is slow)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    optimum_python = args.optimum_python if args.optimum_python.exists() else None
    if optimum_python is None:
        print(f"[bench] {args.optimum_python} missing: optimum is left out", flush=True)
    dirs = prepare(optimum_python)
    rows = run_all(dirs, args.rounds, optimum_python, set(args.optimum_modes.split(",")))
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), cpu_count=os.cpu_count(), threads=THREADS, rounds=args.rounds)
    (RESULTS / "bench_encoder_decoder.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    (RESULTS / "bench_encoder_decoder.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
