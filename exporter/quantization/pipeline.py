"""`ortseq quantize DIR --to int8|int4|fp16 --out DIR2`: an fp32 export in, a quantized export out.

The output is an ordinary export directory (same graph contract, same tokenizer, a manifest with a
`quantization` section), so `Seq2SeqModel.load` and `ortseq generate` run it unchanged. It is
staged in a temporary directory, measured against the fp32 export (quality.py), and renamed into
place only if its token agreement reaches `min_agreement`: a refused export leaves nothing behind.
No torch: onnx, onnxruntime and its quantization tools only.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from ...graphs import contract
from ...graphs.directories import check_out_dir, replace_dir
from ...graphs.manifest import LOOP_ENGINE, Manifest, Quantization, sha256_of
from ..progress import log
from ..shared_weights import SharedFile
from . import formats, fp16
from .quality import ReportSettings, default_texts, lowest_agreement, quality_report

FORMATS = ("int8", "int4", "fp16")
DEFAULT_MIN_AGREEMENT = 0.9


class QuantizationError(ValueError):
    """The source cannot be quantized as asked (not an fp32 export, unknown format)."""


class QualityGateError(QuantizationError):
    """The quantized export agrees with the fp32 export less than the threshold; nothing was written."""


def default_settings(to: str):
    return {"int8": formats.Int8Settings(), "int4": formats.Int4Settings(), "fp16": fp16.Fp16Settings()}[to]


def quantize(
    source_dir: Path,
    out_dir: Path,
    to: str,
    settings=None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    texts: list[str] | None = None,
    report_settings: ReportSettings | None = None,
    force: bool = False,
) -> Manifest:
    """Write the `to` version of the fp32 export at source_dir to out_dir; returns its manifest.

    settings: formats.Int8Settings / formats.Int4Settings / fp16.Fp16Settings (default: the format's
    defaults). Raises QualityGateError, writing nothing, when token agreement < min_agreement.
    force: replace an existing export at out_dir (a directory ortseq did not write is never replaced).
    """
    from ...runtime.model import Seq2SeqModel

    source_dir, out_dir = Path(source_dir).absolute(), Path(out_dir).absolute()
    if to not in FORMATS:
        raise QuantizationError(f"unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    check_out_dir(out_dir, force, [source_dir])
    source = Manifest.read(source_dir)
    if source.precision != "fp32":
        raise QuantizationError(f"{source_dir} is already {source.precision}: quantize the fp32 export instead")
    source.verify_files(source_dir)
    settings = settings or default_settings(to)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent) as tmp:
        staging = Path(tmp) / "export"
        staging.mkdir()
        manifest = _write_quantized(source_dir, source, staging, to, settings)
        log("measuring quality against the fp32 export")
        reference = Seq2SeqModel.load(source_dir, verify=False)
        candidate = Seq2SeqModel.load(staging)
        report = quality_report(reference, candidate, texts or default_texts(), report_settings or ReportSettings())
        mode, agreement = lowest_agreement(report)
        if agreement < min_agreement:
            raise QualityGateError(
                f"{to} token agreement with the fp32 export is {agreement:.3f} ({mode}), under the threshold "
                f"{min_agreement}; nothing was written to {out_dir}. Try other settings (e.g. keep the LM head "
                f"in float) or lower --min-agreement if that quality is enough for you"
            )
        manifest.quantization.quality = report
        manifest.write(staging)
        replace_dir(staging, out_dir)
    log(f"quantized export complete: {out_dir}")
    return manifest


def _write_quantized(source_dir: Path, source: Manifest, staging: Path, to: str, settings) -> Manifest:
    """Transform the graphs into staging, copy the tokenizer, write the manifest (quality still empty)."""
    shared = SharedFile(staging)  # the token tables of all graphs, each stored once (vocab_tables.py)
    files: list[str] = []
    for graph in quantized_graphs(source):
        log(f"{to}: {graph}")
        # Each graph's own weights go to graph.onnx.data, whatever the source did: onnxruntime maps that file
        # and lets go of what its kernels prepacked, where weights inside the graph file are parsed and
        # copied (measured on the mid-size int8 export: 25 MiB less resident after loading).
        _transform(source_dir / graph, staging / graph, to, settings, source.dims.vocab_size, True, shared)
        files += [name for name in (graph, graph + ".data") if (staging / name).is_file()]
    if shared.written():
        files.append(contract.SHARED_WEIGHTS_FILE)
    # the tokenizer, and the search step where the source has one: it reads the decoder's float32 logits,
    # which every format keeps
    for name in (source.tokenizer.file, contract.SEARCH_STEP_FILE):
        if name in source.files:
            shutil.copy(source_dir / name, staging / name)
            files.append(name)
    manifest = replace(
        source,
        files={name: sha256_of(staging / name) for name in files},
        precision=to,
        engines=[LOOP_ENGINE],  # the BeamSearch-op graph is fp32 and not carried over
        quantization=Quantization(format=to, settings=asdict(settings), source=str(source_dir)),
        lookup_tables=shared.lookup_tables(),
    )
    manifest.write(staging)
    return manifest


def quantized_graphs(source: Manifest) -> list[str]:
    """The graphs every format transforms: the encoder, the decoder step, and the in-flight decoder step
    where the source has one (a decoder like the other, with the scheduler's row inputs)."""
    optional = [contract.INFLIGHT_DECODER_FILE] if contract.INFLIGHT_DECODER_FILE in source.files else []
    return [contract.ENCODER_FILE, contract.DECODER_FILE, *optional]


def _transform(
    source: Path, target: Path, to: str, settings, vocab_size: int, external: bool, shared: SharedFile
) -> None:
    transform = {"int8": formats.quantize_int8, "int4": formats.quantize_int4, "fp16": fp16.convert_fp16}[to]
    transform(source, target, settings, vocab_size, external, shared)
