"""Size and quality of quantization variants of one fp32 export (docs/quantization.md, "Sizes and quality").

    python benchmarks/quantize_variants.py exports/tiny-pegasus-trained [--out .cache/quantize-variants]

Each variant is written with exporter.quantization.pipeline.quantize (gate at 0: every variant is
reported) and its quality report summarized as one markdown row.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ortseq.exporter.quantization.formats import Int4Settings, Int8Settings
from ortseq.exporter.quantization.fp16 import Fp16Settings
from ortseq.exporter.quantization.pipeline import quantize

VARIANTS = {
    "int8 (default: LM head and embedding int8)": ("int8", Int8Settings()),
    "int8, embedding float": ("int8", Int8Settings(embeddings=False)),
    "int8, LM head float": ("int8", Int8Settings(lm_head=False)),
    "int8, LM head and embedding float": ("int8", Int8Settings(lm_head=False, embeddings=False)),
    "int8, uint8 weights": ("int8", Int8Settings(weight_type="QUInt8")),
    "int4 (default: block 32, symmetric, accuracy_level 4, LM head and embedding int4)": ("int4", Int4Settings()),
    "int4, embedding float": ("int4", Int4Settings(embeddings=False)),
    "int4, LM head float": ("int4", Int4Settings(lm_head=False)),
    "int4, asymmetric": ("int4", Int4Settings(symmetric=False)),
    "int4, block 16": ("int4", Int4Settings(block_size=16)),
    "int4, accuracy_level 0 (float compute)": ("int4", Int4Settings(accuracy_level=0)),
    "fp16 (residual stream, LayerNorm, softmax fp32)": ("fp16", Fp16Settings()),
}


def graph_megabytes(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.iterdir() if f.name.endswith((".onnx", ".data"))) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path(".cache/quantize-variants"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("| variant | size (MB) | greedy agreement / exact | beam4 agreement / exact | logit error max / mean |")
    print("|---|---|---|---|---|")
    print(f"| fp32 | {graph_megabytes(args.export_dir):.2f} | – | – | – |")
    for index, (name, (to, settings)) in enumerate(VARIANTS.items()):
        out = args.out / f"{index:02d}-{to}"
        report = quantize(args.export_dir, out, to, settings, min_agreement=0.0, force=True).quantization.quality
        greedy, beam, logits = report["greedy"], report["beam4"], report["logits"]
        print(
            f"| {name} | {graph_megabytes(out):.2f} | {greedy['token_agreement']:.3f} / {greedy['exact_match']:.3f} "
            f"| {beam['token_agreement']:.3f} / {beam['exact_match']:.3f} "
            f"| {logits['max_abs_error']:.3f} / {logits['mean_abs_error']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
