"""`ortseq export`: checkpoint -> verified ONNX graphs + tokenizer + manifest, written atomically.

Everything is written to a temporary directory beside the output and renamed into place only
when every graph has been verified, so a failed or interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ortseq.exporter import onnx_export, verify
from ortseq.exporter.beam_search_op import beam_search_model_for, check_supported
from ortseq.exporter.checkpoint_check import load_checkpoint_tensors
from ortseq.exporter.families import family_for
from ortseq.exporter.progress import log
from ortseq.exporter.sources import ALIASES, resolved_source
from ortseq.exporter.tokenizer_files import check_tokenizer_files, save_tokenizer
from ortseq.graphs import contract
from ortseq.graphs.directories import replace_dir
from ortseq.graphs.manifest import BEAM_SEARCH_OP_ENGINE, LOOP_ENGINE, GenerationDefaults, Manifest, sha256_of

# Shapes used for tracing; verify.py checks the graphs at other ones.
TRACE_BATCH, TRACE_SRC, TRACE_BEAMS, TRACE_PAST = 2, 9, 2, 3


def export(
    source: str,
    out_dir: Path,
    external_data: bool | None = None,
    add_special_tokens: bool | None = None,
    beam_search_op: bool = False,
) -> Manifest:
    """add_special_tokens: whether the runtime tokenizes inputs with the tokenizer's special tokens;
    None follows the model family's knowledge of the source's model card (default True).
    beam_search_op: also write beam_search.onnx (the "beam-search-op" engine), checked against the loop."""
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent) as tmp:
        staging = Path(tmp) / "export"
        staging.mkdir()
        with resolved_source(source, Path(tmp)) as checkpoint:
            manifest = _export_checkpoint(
                checkpoint, staging, external_data, source, add_special_tokens, beam_search_op
            )
            manifest.source = source
        manifest.write(staging)
        if beam_search_op:
            verify.verify_beam_search_op(staging)
        replace_dir(staging, out_dir)
    log(f"export complete: {out_dir}")
    return manifest


def _export_checkpoint(
    checkpoint: Path,
    staging: Path,
    external_data: bool | None,
    source: str,
    add_special_tokens: bool | None,
    beam_search_op: bool,
) -> Manifest:
    family_name, family = family_for(checkpoint)
    if add_special_tokens is None:  # a family may know model cards that tokenize without them
        add_special_tokens = getattr(family, "add_special_tokens", lambda _: True)(ALIASES.get(source, source))
    check_tokenizer_files(checkpoint)  # before minutes of export work
    log(f"loading {family_name} checkpoint from {checkpoint}")
    model = family.load_model(str(checkpoint))
    load_checkpoint_tensors(model, checkpoint, family.checkpoint_layout(model))
    dims = family.dims(model)
    if beam_search_op:
        check_supported(family_name)  # before minutes of export work
    files: list[str] = []

    log("exporting encoder")
    _export_encoder(family, model, dims, staging, external_data, files)

    log("exporting decoder")
    decoder = family.DecoderExport(model).eval()
    files += onnx_export.export_graph(
        decoder,
        _decoder_trace_args(dims),
        staging / contract.DECODER_FILE,
        contract.decoder_inputs(dims.decoder_layers),
        contract.decoder_outputs(dims.decoder_layers),
        contract.decoder_dynamic_axes(dims.decoder_layers),
        external_data,
    )
    verify.verify_decoder(
        staging / contract.DECODER_FILE,
        decoder,
        dims.decoder_layers,
        dims.decoder_heads,
        dims.head_dim,
        dims.vocab_size,
        dims.max_position_embeddings,
    )

    engines = [LOOP_ENGINE]
    if beam_search_op:
        log("exporting the BeamSearch-op graph")
        # the model's n-gram ban is built into the op (an attribute); other values are refused at run time
        no_repeat = _generation_defaults(model).no_repeat_ngram_size
        graph = beam_search_model_for(family_name, family, model, no_repeat_ngram_size=no_repeat)
        files += onnx_export.save_proto(graph, staging / contract.BEAM_SEARCH_FILE, external_data)
        engines.append(BEAM_SEARCH_OP_ENGINE)

    tokenizer_info = save_tokenizer(checkpoint, staging, dims.max_position_embeddings, add_special_tokens)
    files.append(tokenizer_info.file)
    return Manifest(
        family=family_name,
        dims=dims,
        special_tokens=family.special_tokens(model),
        generation=_generation_defaults(model),
        tokenizer=tokenizer_info,
        opset=onnx_export.OPSET,
        files={name: sha256_of(staging / name) for name in files},
        versions=_versions(),
        engines=engines,
    )


def _export_encoder(family, model, dims, staging: Path, external_data: bool | None, files: list[str]) -> None:
    encoder = family.EncoderExport(model).eval()
    trace_length = family.encoder_trace_length(model) if hasattr(family, "encoder_trace_length") else TRACE_SRC
    ids = torch.randint(3, dims.vocab_size, (TRACE_BATCH, trace_length))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    finalize = getattr(family, "finalize_encoder_graph", None)
    files += onnx_export.export_graph(
        encoder,
        (ids, mask),
        staging / contract.ENCODER_FILE,
        list(contract.ENCODER_INPUTS),
        contract.encoder_outputs(dims.decoder_layers),
        contract.encoder_dynamic_axes(dims.decoder_layers),
        external_data,
        finalize=(lambda graph: finalize(encoder, graph)) if finalize else None,
    )
    extra_lengths = family.encoder_verify_lengths(model) if hasattr(family, "encoder_verify_lengths") else []
    verify.verify_encoder(
        staging / contract.ENCODER_FILE,
        encoder,
        dims.decoder_layers,
        dims.vocab_size,
        dims.max_position_embeddings,
        extra_lengths,
    )


def _decoder_trace_args(dims) -> tuple:
    encoder_mask = torch.ones(TRACE_BATCH, TRACE_SRC, dtype=torch.int64)
    encoder_mask[1, -2:] = 0
    rows = TRACE_BATCH * TRACE_BEAMS
    past = [torch.randn(rows, dims.decoder_heads, TRACE_PAST, dims.head_dim) for _ in range(2 * dims.decoder_layers)]
    cross = [
        torch.randn(TRACE_BATCH, dims.decoder_heads, TRACE_SRC, dims.head_dim) for _ in range(2 * dims.decoder_layers)
    ]
    input_ids = torch.randint(3, dims.vocab_size, (rows, 1))
    beam_idx = torch.tensor([1, 0, 3, 2])
    return (input_ids, encoder_mask, beam_idx, *past, *cross)


def _generation_defaults(model) -> GenerationDefaults:
    gen = model.generation_config
    return GenerationDefaults(
        num_beams=gen.num_beams or 1,
        max_length=gen.max_length if gen.max_length is not None else 20,
        min_length=gen.min_length or 0,
        length_penalty=float(gen.length_penalty if gen.length_penalty is not None else 1.0),
        no_repeat_ngram_size=gen.no_repeat_ngram_size or 0,
        # transformers' three values: True, False, or "never" (a different stopping heuristic)
        early_stopping=gen.early_stopping if gen.early_stopping == "never" else bool(gen.early_stopping),
        forced_eos_token_id=gen.forced_eos_token_id,
    )


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    from ortseq.graphs import __version__

    return {
        "ortseq": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
