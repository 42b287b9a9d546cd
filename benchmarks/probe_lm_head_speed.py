"""How fast is an int8 LM head that reads the shared block-quantized table? (issue 14, int8)

    python benchmarks/probe_lm_head_speed.py [--d 512 1024] [--rows 1 64] [--repeats 20]

One-node graphs over a random [vocab, d] table, 2 intra-op threads, median of `--repeats` runs:
  * fp32 Gemm(transB=1): the fp32 export's LM head;
  * quantize_dynamic's int8 MatMul (per-channel int8 weights, activations quantized per call;
    onnxruntime fuses it into DynamicQuantizeMatMul): the int8 export's LM head before issue 14,
    a transposed int8 copy of its own;
  * com.microsoft QGemm(transB=1) over the [vocab, d] int8 table as stored, one scale per row, after
    DynamicQuantizeLinear: the int8 LM head since issue 14 (exporter/quantization/vocab_tables.py);
  * com.microsoft MatMulNBits, 8 bits (and 4 for comparison), at several block sizes and accuracy
    levels: the layout GatherBlockQuantized reads too, so one table serves the embedding and the head.
Also the resident-set growth of creating each session (the weight held in the model bytes, onnxruntime's
copy, and its prepacked copy; QGemm's transposing prepack leaves a freed buffer in the session's arena),
and the peak during creation (VmHWM, reset before each): QGemm's transposed scratch is there whole.
  * QGemm over chunks of rows (8, 4, 2 MiB each), the logits concatenated: the int8 LM head now.

Measured 2026-11-30 on the shared 2-core machine (load average ~7, so +-20%), ms at rows 1 / 64:
d 512: fp32 Gemm 44 / 165, int8 dynamic MatMul 17.1 / 48.0, QGemm 16.6 / 52.0, MatMulNBits 8 bits
block 32 16.2 / 138, block 128 16.0 / 114, block 256 16.0 / 108, block 128 float compute 624 / 712;
d 1024: fp32 152 / 540, dynamic 40.0 / 148, QGemm 39.4 / 128, MatMulNBits 8 bits block 128 32.0 / 223.
The table as MatMulInteger's A (no prepack), quiet machine 2026-11-30 (results/lm_head_table_as_a.json):
d 512 11.3 / 45.7 against QGemm's 2.07 / 10.6; d 1024 23.4 / 74.2 against 4.41 / 18.6.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import _pybind_state

VOCAB = 96103
THREADS = 2


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _model(nodes, weights, d: int, opset: int = 21) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", d])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(helper.make_graph(nodes, "head", inputs, outputs, weights), opset_imports=opsets)
    model.ir_version = 10
    return model


def gemm_fp32(table: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)
    return _model([node], [numpy_helper.from_array(table, "W")], table.shape[1])


def dynamic_int8(table: np.ndarray, scratch: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    node = helper.make_node("MatMul", ["x", "Wt"], ["y"], name="head")
    source, target = scratch / "fp32.onnx", scratch / "int8.onnx"
    onnx.save(_model([node], [numpy_helper.from_array(table.T.copy(), "Wt")], table.shape[1], opset=17), source)
    quantize_dynamic(
        str(source),
        str(target),
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        extra_options={"MatMulConstBOnly": True},
    )
    return onnx.load(str(target))


def qgemm_int8(table: np.ndarray) -> onnx.ModelProto:
    """The shared int8 table as stored ([vocab, d], one symmetric scale per row), read in place by
    com.microsoft QGemm(transB=1) after DynamicQuantizeLinear: the int8 LM head after issue 14."""
    scales = (np.abs(table).max(axis=1) / 127).astype(np.float32)
    quantized = np.clip(np.round(table / scales[:, None]), -127, 127).astype(np.int8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("QGemm", ["xq", "xs", "xz", "W", "ws", "wz"], ["y"], domain="com.microsoft", transB=1),
    ]
    zero_points = np.zeros(len(table), dtype=np.int8)
    weights = [
        numpy_helper.from_array(array, name) for array, name in ((quantized, "W"), (scales, "ws"), (zero_points, "wz"))
    ]
    return _model(nodes, weights, table.shape[1])


def qgemm_int8_chunks(table: np.ndarray, chunks: int) -> onnx.ModelProto:
    """qgemm_int8 over `chunks` runs of the table's rows, one QGemm each, the logits concatenated: the int8
    LM head since the load-peak fix (exporter/quantization/vocab_tables.py LM_HEAD_CHUNK_BYTES). Each QGemm's
    prepack transposes only its chunk, so the scratch is a chunk, not the table."""
    scales = (np.abs(table).max(axis=1) / 127).astype(np.float32)
    quantized = np.clip(np.round(table / scales[:, None]), -127, 127).astype(np.int8)
    bounds = [len(table) * i // chunks for i in range(chunks + 1)]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"])]
    weights = []
    for c, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        names = [f"W{c}", f"ws{c}", f"wz{c}"]
        for array, name in zip((quantized[start:end], scales[start:end], np.zeros(end - start, np.int8)), names):
            weights.append(numpy_helper.from_array(array, name))
        nodes.append(helper.make_node("QGemm", ["xq", "xs", "xz", *names], [f"y{c}"], domain="com.microsoft", transB=1))
    nodes.append(helper.make_node("Concat", [f"y{c}" for c in range(chunks)], ["y"], axis=-1))
    return _model(nodes, weights, table.shape[1])


def table_as_a_int8(table: np.ndarray) -> onnx.ModelProto:
    """logitsᵀ = MatMulInteger(table, xᵀ): the table as A, which onnxruntime never prepacks, so the LM head
    would read the lookups' table with no packed copy and no transposing scratch. MatMulIntegerToFloat (what
    onnxruntime fuses this into) takes a signed A only with a signed B, so the table is stored as uint8 with
    zero point 128 (the same values)."""
    scales = (np.abs(table).max(axis=1) / 127).astype(np.float32)
    quantized = np.clip(np.round(table / scales[:, None]), -127, 127).astype(np.int16) + 128
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("Transpose", ["xq"], ["xqT"], perm=[1, 0]),
        helper.make_node("MatMulInteger", ["W", "xqT", "wz", "xz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ws", "xs"], ["scale"]),
        helper.make_node("Mul", ["accf", "scale"], ["yT"]),
        helper.make_node("Transpose", ["yT"], ["y"], perm=[1, 0]),
    ]
    weights = [
        numpy_helper.from_array(quantized.astype(np.uint8), "W"),
        numpy_helper.from_array(scales[:, None], "ws"),
        numpy_helper.from_array(np.array(128, dtype=np.uint8), "wz"),
    ]
    return _model(nodes, weights, table.shape[1])


def matmul_nbits(table: np.ndarray, bits: int, block: int, accuracy_level: int) -> onnx.ModelProto:
    vocab, d = table.shape
    blocks, blob = -(-d // block), block * bits // 8
    packed = np.zeros((vocab, blocks, blob), dtype=np.uint8)
    scales = np.zeros(vocab * blocks, dtype=np.float32)
    zero_points = np.zeros(vocab * blocks, dtype=np.uint8)
    quantize = getattr(_pybind_state, f"quantize_matmul_{bits}bits")
    quantize(packed, np.ascontiguousarray(table.T), scales, zero_points, block, vocab, d, True)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "B", "scales"],
        ["y"],
        domain="com.microsoft",
        K=d,
        N=vocab,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    weights = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    return _model([node], weights, d)


def measure(model: onnx.ModelProto, d: int, rows_list, repeats: int) -> tuple[float, float, list[float]]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    serialized = model.SerializeToString()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) from here
    before = rss_mb()
    session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    grown, peak = rss_mb() - before, rss_mb("VmHWM") - before
    times = []
    rng = np.random.default_rng(1)
    for rows in rows_list:
        x = rng.standard_normal((rows, d)).astype(np.float32)
        session.run(None, {"x": x})
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, {"x": x})
            samples.append(time.perf_counter() - start)
        times.append(float(np.median(samples)) * 1e3)
    return grown, peak, times


def variants(table: np.ndarray, scratch: Path) -> dict:
    """name -> function building that LM head over table."""
    built = {
        "fp32 Gemm(transB=1)": lambda: gemm_fp32(table),
        "int8 dynamic MatMul (before)": lambda: dynamic_int8(table, scratch),
        "int8 QGemm(transB=1), row scales": lambda: qgemm_int8(table),
        "int8 MatMulInteger, table as A": lambda: table_as_a_int8(table),
    }
    for chunk_mib in (8, 4, 2):
        chunks = max(1, -(-table.size // (chunk_mib << 20)))  # int8: one byte per value
        built[f"int8 QGemm, {chunk_mib} MiB chunks"] = functools.partial(qgemm_int8_chunks, table, chunks)
    for bits, block, level in ((8, 32, 4), (8, 128, 4), (8, 256, 4), (8, 128, 0), (4, 32, 4)):
        built[f"MatMulNBits {bits}b block {block} acc {level}"] = functools.partial(
            matmul_nbits, table, bits, block, level
        )
    return built


def _chosen(name: str, only) -> bool:
    return not only or any(part in name for part in only)


def _measure_one(d: int, name: str, rows, repeats: int):
    table = np.random.default_rng(0).standard_normal((VOCAB, d)).astype(np.float32) * 0.05
    with tempfile.TemporaryDirectory() as scratch:
        return measure(variants(table, Path(scratch))[name](), d, rows, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", nargs="*", default=None, help="substrings of the variants to run")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, each running every variant in turn")
    parser.add_argument("--out", help="also write every row, with the date and load average, to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("D", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_measure_one(int(args.worker[0]), args.worker[1], args.rows, args.repeats)))
        return
    rows = []
    print(f"onnxruntime {ort.__version__}, vocab {VOCAB}, {THREADS} threads, median of {args.repeats}")
    columns = " ".join(f"{'rows ' + str(rows) + ' ms':>11}" for rows in args.rows)
    print(f"{'d':>5} {'variant':<34} {'session RSS MB':>15} {'creation peak MB':>17} {columns}")
    names = [name for name in variants(np.zeros((1, 1), np.float32), Path()) if _chosen(name, args.only)]
    for d in args.d:
        for round_ in range(args.rounds):
            for name in names:  # each in a fresh process: a session's memory is its own
                worker = [sys.executable, __file__, "--worker", str(d), name, "--rows", *map(str, args.rows)]
                done = subprocess.run([*worker, "--repeats", str(args.repeats)], capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{name} at d {d} failed:\n{done.stderr[-2000:]}")
                grown, peak, times = json.loads(done.stdout.splitlines()[-1])
                cells = " ".join(f"{t:>11.2f}" for t in times)
                print(f"{d:>5} {name:<34} {grown:>15.0f} {peak:>17.0f} {cells}", flush=True)
                rows.append(dict(d=d, variant=name, round=round_, session_rss_mb=grown, session_peak_mb=peak,
                                 ms_by_rows=dict(zip(args.rows, times)), load_average=os.getloadavg()[0],
                                 at=time.strftime("%Y-%m-%dT%H:%M:%S")))  # fmt: skip
    if args.out:
        meta = dict(date=time.strftime("%Y-%m-%d"), onnxruntime=ort.__version__, vocab=VOCAB, threads=THREADS,
                    repeats=args.repeats)  # fmt: skip
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
