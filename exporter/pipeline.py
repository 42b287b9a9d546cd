"""`ortseq export`: checkpoint -> verified ONNX graphs + tokenizer + manifest, written atomically.

Everything is written to a temporary directory beside the output and renamed into place only
when every graph has been verified, so a failed or interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..graphs import contract
from ..graphs.directories import check_out_dir, replace_dir
from ..graphs.generation import settings_from_generation_config
from ..graphs.manifest import BEAM_SEARCH_OP_ENGINE, LOOP_ENGINE, Manifest, sha256_of
from . import onnx_export, verify
from .attention import InflightDecoderStep, self_attention_body
from .beam_search_op import beam_search_model_for, check_supported
from .checkpoint_check import load_checkpoint_tensors, tensors_held_by
from .families import Family, UnsupportedModelError, family_for, family_named
from .families.base import check_model_attributes
from .progress import log
from .search_step import write_search_step
from .shared_weights import SharedWeights, embedding_tables
from .sources import ALIASES, resolved_source
from .tokenizer_files import check_tokenizer_files, save_tokenizer
from .unpadded_attention import skip_mask_when_unpadded

# Shapes used for tracing; verify.py checks the graphs at other ones.
TRACE_BATCH, TRACE_SRC, TRACE_BEAMS, TRACE_PAST, TRACE_MAX_LEN = 2, 9, 2, 3, 7


def export(
    source: str,
    out_dir: Path,
    external_data: bool | None = None,
    add_special_tokens: bool | None = None,
    beam_search_op: bool = False,
    ignore_generation_fields: bool = False,
    force: bool = False,
    plain_attention: bool = False,
    inflight: bool = False,
) -> Manifest:
    """add_special_tokens: whether the runtime tokenizes inputs with the tokenizer's special tokens;
    None follows the model family's knowledge of the source's model card (default True).
    beam_search_op: also write beam_search.onnx (the "beam-search-op" engine), checked against the loop.
    ignore_generation_fields: export even when the generation config sets fields that change the tokens
    and that ortseq does not honour (graphs/generation.py's REFUSED); the manifest records them.
    force: replace an existing export at out_dir (a directory ortseq did not write is never replaced).
    plain_attention: self-attention in standard ONNX ops, not onnxruntime's contrib ops: the encoder's
    MultiHeadAttention and the decoder's DecoderMaskedMultiHeadAttention (exporter/attention.py; the
    manifest records the decoder's).
    inflight: also write decoder_inflight.onnx, the decoder step `ortseq serve --scheduler inflight` runs
    (rows of different requests and ages in one step; graphs/contract.py)."""
    out_dir = Path(out_dir).absolute()
    local_source = Path(os.path.expanduser(source))
    check_out_dir(out_dir, force, [local_source] if local_source.is_dir() else [])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent) as tmp:
        staging = Path(tmp) / "export"
        staging.mkdir()
        with resolved_source(source, Path(tmp)) as checkpoint:
            options = ExportOptions(
                external_data, add_special_tokens, beam_search_op, ignore_generation_fields, plain_attention, inflight
            )
            manifest, graph_tensors = _export_checkpoint(checkpoint, staging, source, options)
            manifest.source = source
            manifest.write(staging)
            verify.verify_against_transformers(staging, family_named(manifest.family), checkpoint, graph_tensors)
        if beam_search_op:
            verify.verify_beam_search_op(staging)
        replace_dir(staging, out_dir)
    log(f"export complete: {out_dir}")
    return manifest


@dataclass(frozen=True)
class ExportOptions:
    """What export() was asked for, beyond the source and the output directory (see export())."""

    external_data: bool | None
    add_special_tokens: bool | None
    beam_search_op: bool
    ignore_generation_fields: bool
    plain_attention: bool
    inflight: bool = False


def _export_checkpoint(
    checkpoint: Path, staging: Path, source: str, options: ExportOptions
) -> tuple[Manifest, set[str]]:
    """The export in staging, its manifest, and the names of the tensors its graphs read."""
    external_data, beam_search_op = options.external_data, options.beam_search_op
    add_special_tokens = options.add_special_tokens
    family = family_for(checkpoint)
    if add_special_tokens is None:  # a family may know model cards that tokenize without them
        add_special_tokens = family.add_special_tokens(ALIASES.get(source, source))
    check_tokenizer_files(checkpoint, family.tokenizer_files())  # before minutes of export work
    log(f"loading {family.name} checkpoint from {checkpoint}")
    model = load_checked_model(family, checkpoint)
    graph_tensors = graph_tensor_names(family, model)
    # before minutes of work
    generation, ignored = generation_defaults(model, checkpoint, options.ignore_generation_fields)
    dims = family.dims(model)
    if beam_search_op:
        check_supported(family)  # before minutes of export work
    files: list[str] = []
    shared = SharedWeights(staging, embedding_tables(model))

    log("exporting encoder")
    _export_encoder(family, model, dims, staging, external_data, files, shared, options.plain_attention)

    body = self_attention_body(dims.head_dim, options.plain_attention)
    log(f"exporting decoder (self-attention: {body})")
    decoder = family.decoder_export(model, body).eval()
    files += onnx_export.export_graph(
        decoder,
        _decoder_trace_args(dims),
        staging / contract.DECODER_FILE,
        contract.decoder_inputs(dims.decoder_layers),
        contract.decoder_outputs(dims.decoder_layers),
        contract.decoder_dynamic_axes(dims.decoder_layers),
        external_data,
        finalize=shared.point_at_shared,
    )
    verify.verify_decoder(staging / contract.DECODER_FILE, decoder, dims)

    if options.inflight:
        log("exporting the in-flight decoder step")
        inflight = InflightDecoderStep(family.decoder_export(model, contract.PLAIN_BODY)).eval()
        files += onnx_export.export_graph(
            inflight,
            _inflight_trace_args(dims),
            staging / contract.INFLIGHT_DECODER_FILE,
            contract.inflight_decoder_inputs(dims.decoder_layers),
            contract.decoder_outputs(dims.decoder_layers),
            contract.inflight_decoder_dynamic_axes(dims.decoder_layers),
            external_data,
            finalize=shared.point_at_shared,
        )
        verify.verify_inflight_decoder(staging / contract.INFLIGHT_DECODER_FILE, inflight, dims)

    files += write_search_step(staging)  # the same small graph for every family (no torch, no weights)

    engines = [LOOP_ENGINE]
    if beam_search_op:
        log("exporting the BeamSearch-op graph")
        # the model's n-gram ban is built into the op (an attribute); other values are refused at run time
        no_repeat = generation.no_repeat_ngram_size
        graph = beam_search_model_for(family, model, no_repeat_ngram_size=no_repeat)
        files += onnx_export.save_proto(graph, staging / contract.BEAM_SEARCH_FILE, external_data)
        engines.append(BEAM_SEARCH_OP_ENGINE)

    if shared.written():
        files.append(contract.SHARED_WEIGHTS_FILE)
    tokenizer_info = save_tokenizer(
        checkpoint, staging, dims.max_position_embeddings, add_special_tokens, family.tokenizer_converters()
    )
    files.append(tokenizer_info.file)
    manifest = Manifest(
        family=family.name,
        dims=dims,
        special_tokens=family.special_tokens(model),
        generation=generation,
        tokenizer=tokenizer_info,
        opset=onnx_export.OPSET,
        files={name: sha256_of(staging / name) for name in files},
        versions=_versions(),
        engines=engines,
        ignored_generation_fields=ignored,
        decoder_contract=contract.STATIC_CACHE_CONTRACT,
        decoder_self_attention=body,
        lookup_tables=shared.lookup_tables(),
    )
    return manifest, graph_tensors


def load_checked_model(family: Family, checkpoint: Path):
    """family.load_model, then every tensor made the checkpoint files' own (exporter/checkpoint_check.py):
    what transformers 5.x left different from the files is taken from them, a tensor a graph reads and
    the files lack refused."""
    model = family.load_model(str(checkpoint))
    check_model_attributes(family, model)  # before the checkpoint check and the traces read them
    load_checkpoint_tensors(model, checkpoint, family.checkpoint_layout(model), graph_tensor_names(family, model))
    return model


def graph_tensor_names(family: Family, model) -> set[str]:
    """The model's tensors the exported graphs read: those the modules they are traced from hold."""
    return tensors_held_by([family.encoder_export(model), family.decoder_export(model)], model)


def _export_encoder(
    family: Family,
    model,
    dims,
    staging: Path,
    external_data: bool | None,
    files: list[str],
    shared: SharedWeights,
    plain_attention: bool,
) -> None:
    encoder = family.encoder_export(model, fused=not plain_attention).eval()
    ids = torch.randint(3, dims.vocab_size, (TRACE_BATCH, family.encoder_trace_length(model)))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    files += onnx_export.export_graph(
        encoder,
        (ids, mask),
        staging / contract.ENCODER_FILE,
        list(contract.ENCODER_INPUTS),
        contract.encoder_outputs(dims.decoder_layers),
        contract.encoder_dynamic_axes(dims.decoder_layers),
        external_data,
        finalize=lambda graph: (
            family.finalize_encoder_graph(encoder, graph),
            skip_mask_when_unpadded(graph),
            shared.point_at_shared(graph),
        ),
    )
    verify.verify_encoder(
        staging / contract.ENCODER_FILE,
        encoder,
        dims.decoder_layers,
        dims.vocab_size,
        dims.max_position_embeddings,
        family.encoder_verify_lengths(model),
    )


def _decoder_trace_args(dims) -> tuple:
    encoder_mask = torch.ones(TRACE_BATCH, TRACE_SRC, dtype=torch.int64)
    encoder_mask[1, -2:] = 0
    rows = TRACE_BATCH * TRACE_BEAMS
    cache = [
        torch.randn(rows, dims.decoder_heads, TRACE_MAX_LEN, dims.head_dim) for _ in range(2 * dims.decoder_layers)
    ]
    cross = [
        torch.randn(TRACE_BATCH, dims.decoder_heads, TRACE_SRC, dims.head_dim) for _ in range(2 * dims.decoder_layers)
    ]
    input_ids = torch.randint(3, dims.vocab_size, (rows, 1))
    beam_idx = torch.tensor([1, 0, 3, 2])
    positions = torch.full((rows,), TRACE_PAST, dtype=torch.int64)
    past_length = torch.tensor([TRACE_PAST], dtype=torch.int32)
    indirection = torch.randint(0, TRACE_BEAMS, (rows, TRACE_MAX_LEN), dtype=torch.int32)
    return (input_ids, encoder_mask, beam_idx, positions, past_length, indirection, *cache, *cross)


def _inflight_trace_args(dims) -> tuple:
    """Three requests: 2 beams at rows 0-1, then two greedy rows, all of different ages and sources."""
    rows, requests, heads, dh = 4, 3, dims.decoder_heads, dims.head_dim
    encoder_mask = torch.ones(requests, TRACE_SRC, dtype=torch.int64)
    encoder_mask[2, -2:] = 0
    cache = [torch.randn(rows, heads, TRACE_MAX_LEN, dh) for _ in range(2 * dims.decoder_layers)]
    cross = [torch.randn(requests, heads, TRACE_SRC, dh) for _ in range(2 * dims.decoder_layers)]
    input_ids = torch.randint(3, dims.vocab_size, (rows, 1))
    beam_idx = torch.tensor([1, 0, 2, 3])
    positions = torch.tensor([TRACE_PAST, TRACE_PAST, 1, TRACE_PAST + 2])
    row_base = torch.tensor([0, 0, 2, 3])
    indirection = torch.randint(0, 2, (rows, TRACE_MAX_LEN), dtype=torch.int32)
    indirection[2:] = 0
    grid, slot = torch.tensor([[0, 1], [2, 2], [3, 3]]), torch.tensor([0, 1, 2, 4])
    return (input_ids, encoder_mask, beam_idx, positions, row_base, indirection, grid, slot, *cache, *cross)


def generation_defaults(model, checkpoint: Path | None = None, ignore_refused: bool = False) -> tuple:
    """(GenerationSettings, {ignored field: value}) from the model's generation config.

    A field that would change the tokens and that ortseq does not honour (graphs/generation.py's
    REFUSED; a checkpoint's custom_generate/generate.py too) is refused by name, unless ignore_refused:
    then it is returned to be recorded in the manifest."""
    settings, refused = settings_from_generation_config(model.generation_config.to_dict())
    if checkpoint is not None and (Path(checkpoint) / CUSTOM_GENERATE).is_file():
        refused["custom_generate"] = CUSTOM_GENERATE
    if refused and not ignore_refused:
        listed = ", ".join(f"{name}={value!r}" for name, value in refused.items())
        raise UnsupportedModelError(
            f"the checkpoint's generation config sets {listed}, which ortseq does not apply and which changes "
            "the tokens transformers generates: remove it from generation_config.json, or export with "
            "--ignore-generation-fields (the manifest then records what is ignored)"
        )
    if refused:
        log(f"ignoring generation config fields (recorded in the manifest): {sorted(refused)}")
    return settings, {name: _json_value(value) for name, value in refused.items()}


CUSTOM_GENERATE = "custom_generate/generate.py"  # transformers runs it instead of generate() (trust_remote_code)


def _json_value(value):
    """A generation config value as the manifest can hold it (plain JSON)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    return repr(value)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    from ..graphs import __version__

    return {
        "ortseq": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
