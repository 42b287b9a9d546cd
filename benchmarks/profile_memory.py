"""Where ortseq's peak RSS comes from, stage by stage (Linux only).

    python benchmarks/profile_memory.py EXPORT_DIR [--batch 8] [--beams 8] [--new-tokens 64]
                                        [--length 512] [--every 8] [--calls 2]

Loads the export (2 threads, as `make bench`), then runs generate() `--calls` times (make bench's
worker makes a warm-up call, then a timed one) and reports, for the load, every encoder run and
every `--every`-th decoder step: the resident set after the stage, the peak during it (the kernel's
VmHWM, reset before each stage through /proc/self/clear_refs), and what must be resident then: the
process after loading plus the tensors alive (cross K/V, past and present K/V, logits). The gap
between the peak and that is what the allocators hold beyond it. Used to explain and then cut the
peak-RSS ratio in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ortseq.runtime import sessions  # noqa: E402
from ortseq.runtime.model import Seq2SeqModel  # noqa: E402
from ortseq.runtime.search import log_softmax_rows  # noqa: E402

THREADS = 2
MB = 1e6


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS


def _report(stage: str, live_mb: float) -> None:
    rss, peak = _status_mb("VmRSS"), _status_mb("VmHWM")
    print(f"{stage:<22} {rss:9.0f} {peak:9.0f} {live_mb:9.0f} {peak - live_mb:9.0f}", flush=True)
    _reset_peak()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--beams", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--every", type=int, default=8, help="report every n-th decoder step")
    parser.add_argument("--calls", type=int, default=2, help="generate() calls (make bench: a warm-up, then timed)")
    args = parser.parse_args()

    print(f"{'stage':<22} {'RSS MB':>9} {'peak MB':>9} {'live MB':>9} {'gap MB':>9}")
    _reset_peak()
    model = Seq2SeqModel.load(args.export_dir, threads=THREADS, verify=False)
    loaded = _status_mb("VmRSS")
    _report("load", loaded)

    dims = model.manifest.dims
    length = min(args.length, dims.max_position_embeddings)
    ids = np.random.default_rng(0).integers(3, dims.vocab_size, (args.batch, length), dtype=np.int64)
    rows = args.batch * args.beams
    itemsize = np.dtype(model.sessions.past_dtype).itemsize
    kv_per_token = 2 * dims.decoder_layers * dims.decoder_heads * dims.head_dim * itemsize  # K and V, every layer
    cross_mb = args.batch * length * kv_per_token / MB
    # the logits buffer and the host search's log-softmax scratch (a few rows)
    logits_mb = (rows + log_softmax_rows(rows, dims.vocab_size)) * dims.vocab_size * 4 / MB

    progress = {"call": 0, "step": 0}
    encode, encode_on_device = model.sessions.encode, model.sessions.encode_on_device

    def staged_encode(input_ids, attention_mask):
        memory = encode(input_ids, attention_mask)
        _report(f"call {progress['call']} encode", loaded + cross_mb)
        return memory

    def staged_encode_on_device(input_ids, attention_mask):
        memory = encode_on_device(input_ids, attention_mask)
        _report(f"call {progress['call']} encode", loaded + cross_mb)
        return memory

    static = model.sessions.static_cache
    driver = sessions.DecoderStep if static else sessions.CpuDecoderStep

    class StagedStep(driver):
        def __call__(self, tokens, beam_idx):
            logits = super().__call__(tokens, beam_idx)
            progress["step"] = step = progress["step"] + 1
            if step % args.every == 0 or step == args.new_tokens:
                # a static cache holds every slot from the start; a concat one the past and the present
                slots = [args.new_tokens] if static else [step - 1, step]  # max_length - 1 static slots
                cache_mb = sum(rows * n * kv_per_token / MB for n in slots)
                _report(f"call {progress['call']} step {step}", loaded + cross_mb + cache_mb + logits_mb)
            return logits

    model.sessions.encode = staged_encode
    model.sessions.encode_on_device = staged_encode_on_device
    setattr(sessions, driver.__name__, StagedStep)
    for call in range(1, args.calls + 1):
        progress.update(call=call, step=0)
        model.generate(ids, num_beams=args.beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        _report(f"call {call} returned", loaded)


if __name__ == "__main__":
    main()
