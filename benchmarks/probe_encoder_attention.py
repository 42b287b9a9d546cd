"""Memory and time of an encoder's attention core: plain ONNX ops against onnxruntime's MultiHeadAttention.

    python benchmarks/probe_encoder_attention.py [--lengths 256 512 1024] [--rounds 3] [--out FILE]

Six layers of self-attention over x [1, s, 512] (8 heads of 64, 2 intra-op threads), each layer only the
attention core and a residual add, in three forms:
  * plain: the ops the encoder was traced to before (Reshape/Transpose to heads, MatMul, Mul by the
    scale, Add of the additive mask, Softmax, MatMul, back to [1, s, 512]);
  * MultiHeadAttention with its key_padding_mask: what a padded batch runs;
  * MultiHeadAttention without a mask: what an input without padding runs (exporter/unpadded_attention.py),
    onnxruntime's flash-attention kernel.
Each variant and length runs in a fresh process (its peak RSS is its own): the growth of the peak resident
set (VmHWM) over 21 runs, and the median time of the last 20 (every time is in the result file). Rounds interleave the variants.
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

from bench import rss_mb  # this script's folder is on sys.path when it runs

VARIANTS = ("plain", "mha-masked", "mha-unmasked")
HEADS, HEAD_DIM, LAYERS, THREADS = 8, 64, 6, 2


def _graph(variant: str):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    d = HEADS * HEAD_DIM
    init = [
        numpy_helper.from_array(np.array([1, -1, HEADS, HEAD_DIM], np.int64), "heads"),
        numpy_helper.from_array(np.array([1, -1, d], np.int64), "merged"),
        numpy_helper.from_array(np.array(HEAD_DIM**-0.5, np.float32), "scale"),
    ]
    nodes, x = [], "x"
    for layer in range(LAYERS):
        p = f"l{layer}_"
        if variant == "plain":
            for name in "qkv":
                nodes.append(helper.make_node("Reshape", [x, "heads"], [p + name + "r"]))
                nodes.append(helper.make_node("Transpose", [p + name + "r"], [p + name], perm=[0, 2, 1, 3]))
            nodes += [
                helper.make_node("Transpose", [p + "k"], [p + "kt"], perm=[0, 1, 3, 2]),
                helper.make_node("MatMul", [p + "q", p + "kt"], [p + "s"]),
                helper.make_node("Mul", [p + "s", "scale"], [p + "ss"]),
                helper.make_node("Add", [p + "ss", "mask"], [p + "sm"]),
                helper.make_node("Softmax", [p + "sm"], [p + "p"], axis=-1),
                helper.make_node("MatMul", [p + "p", p + "v"], [p + "o"]),
                helper.make_node("Transpose", [p + "o"], [p + "ot"], perm=[0, 2, 1, 3]),
                helper.make_node("Reshape", [p + "ot", "merged"], [p + "out"]),
            ]
        else:
            mask = ["", "key_padding_mask"] if variant == "mha-masked" else []
            nodes.append(
                helper.make_node(
                    "MultiHeadAttention",
                    [x, x, x, *mask],
                    [p + "out"],
                    domain="com.microsoft",
                    num_heads=HEADS,
                    scale=HEAD_DIM**-0.5,
                )  # fmt: skip
            )
        nodes.append(helper.make_node("Add", [p + "out", x], [p + "res"]))
        x = p + "res"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", d])]
    if variant == "plain":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 1, "s"]))
    if variant == "mha-masked":
        inputs.append(helper.make_tensor_value_info("key_padding_mask", TensorProto.INT32, [1, "s"]))
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes, "attention", inputs, [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        [tensor for tensor in init if tensor.name in used],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model


def worker(variant: str, length: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(_graph(variant).SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(0).random((1, length, HEADS * HEAD_DIM), dtype=np.float32)}
    if variant == "plain":
        feed["mask"] = np.zeros((1, 1, 1, length), np.float32)
    if variant == "mha-masked":
        feed["key_padding_mask"] = np.ones((1, length), np.int32)
    before = rss_mb("VmHWM")
    session.run(None, feed)  # first-run allocations (counted in the peak, not timed)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    ms = [1000 * t for t in times]
    return {"peak_growth_mib": rss_mb("VmHWM") - before, "ms": statistics.median(ms), "ms_all": ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write every sample, with the date and load average, to this JSON file")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    samples = []
    for round_ in range(args.rounds):
        for length in args.lengths:
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--worker", variant, str(length)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                sample = {"round": round_, "variant": variant, "length": length, "load_average": os.getloadavg()[0]}
                samples.append(sample | json.loads(out.splitlines()[-1]))
    print(f"{'tokens':>6} {'variant':<14} {'peak growth MiB (every round)':<32} {'ms, median of rounds':>20}")
    for length in args.lengths:
        for variant in VARIANTS:
            rows = [s for s in samples if s["length"] == length and s["variant"] == variant]
            growth = " ".join(f"{s['peak_growth_mib']:.1f}" for s in rows)
            print(f"{length:>6} {variant:<14} {growth:<32} {statistics.median(s['ms'] for s in rows):>20.1f}")
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rounds": args.rounds, "threads": THREADS,
                "heads": HEADS, "head_dim": HEAD_DIM, "layers": LAYERS}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "samples": samples}, indent=1) + "\n")


if __name__ == "__main__":
    main()
