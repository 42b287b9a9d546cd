"""Where one ortseq generate() call spends its time: encoder, decoder op types, and the Python search.

    python benchmarks/profile_step.py EXPORT_DIR [--batch 1] [--beams 8] [--new-tokens 64] [--length 512]

Runs generate() once with onnxruntime's profiler on both sessions (2 threads, as `make bench`), then
sums the profiler's node events per op type, and reports the wall time not spent inside session runs
(the numpy search and the Python step driver). Used to explain the benchmark ratios in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ortseq.runtime import sessions  # noqa: E402
from ortseq.runtime.model import Seq2SeqModel  # noqa: E402

THREADS = 2


def profiled_session(path, provider, threads=None, initializers=(), memory_pattern=True):
    """sessions.create_session with the profiler on (initializers: the shared weights, as there)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_mem_pattern = memory_pattern
    options.intra_op_num_threads = THREADS
    options.enable_profiling = True
    options.profile_file_prefix = f"/tmp/ortseq_profile_{Path(path).stem}"
    for name, value in initializers:
        options.add_initializer(name, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_type_totals(profile_file: str) -> tuple[dict[str, float], float]:
    """Seconds per op type, and seconds of whole session runs, from one ORT profile."""
    per_op: dict[str, float] = collections.defaultdict(float)
    runs = 0.0
    for event in json.loads(Path(profile_file).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1e6
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            runs += event["dur"] / 1e6
    return dict(per_op), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--beams", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args()
    sessions.create_session = profiled_session  # every session of this process is profiled
    model = Seq2SeqModel.load(args.export_dir, verify=False)
    length = min(args.length, model.manifest.dims.max_position_embeddings)
    ids = np.random.default_rng(0).integers(2, model.manifest.dims.vocab_size, size=(args.batch, length))
    new = args.new_tokens
    start = time.perf_counter()
    model.generate(ids, num_beams=args.beams, max_new_tokens=new, min_new_tokens=new)
    wall = time.perf_counter() - start
    engine = model.engine.sessions
    report = {"wall_s": wall}
    for name, session in (("encoder", engine.encoder), ("decoder", engine.decoder)):
        per_op, runs = op_type_totals(session.end_profiling())
        report[name] = {"runs_s": runs, "top_ops_s": dict(sorted(per_op.items(), key=lambda kv: -kv[1])[:8])}
    report["outside_sessions_s"] = wall - report["encoder"]["runs_s"] - report["decoder"]["runs_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
