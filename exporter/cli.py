"""`ortseq export` and `ortseq quantize`: the exporter's commands, registered into the runtime's `ortseq`
command line through the `ortseq.commands` entry-point group (pyproject.toml), so that the runtime never
imports the exporter. Importing this module imports neither torch nor onnx: each command does, when run."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..runtime.cli import HelpFormatter, bounded, common_options, needs_extra, out_options
from ..runtime.errors import InvalidInputError
from ..runtime.texts import read_lines
from .aliases import check_source_name, declared_aliases
from .errors import SourceError

FRACTION = bounded(float, 0.0, 1.0, "agreement is a fraction in [0, 1]")
SOURCE_HELP = "an alias, a hub id or a save_pretrained() directory"


def _block_size(text: str) -> int:
    """onnxruntime's MatMulNBits (and its quantizer) take power-of-two blocks of at least 16."""
    value = bounded(int, 16, None, "the block size must be a power of two >= 16")(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"{text} is not a power of two (16, 32, 64, 128, ...)")
    return value


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text


def register(commands) -> None:
    """The entry point: adds export and quantize to the `ortseq` subcommands."""
    add_export(commands)
    add_quantize(commands)


class _ExportHelp(HelpFormatter):
    """Lists the aliases, read from the families' declarations without importing them (they import torch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.help == SOURCE_HELP:
            return f"an alias ({', '.join(sorted(declared_aliases()))}), a hub id or a save_pretrained() directory"
        return super()._get_help_string(action)


def _export(args: argparse.Namespace) -> int:
    try:
        check_source_name(args.source)  # a mistyped alias is refused before torch is imported (seconds)
    except SourceError as exc:
        raise InvalidInputError(str(exc)) from exc
    with needs_extra("export", "the exporter dependencies", "pip install torch==2.13.0 -e '.[export]'"):
        from .pipeline import export
    from ..graphs.generation import GenerationSettingError
    from ..graphs.lsg import LSGConfigError
    from ..runtime.library_output import third_party_output_hidden
    from .families import UnsupportedModelError
    from .verify import GraphMismatchError

    try:
        with third_party_output_hidden(not args.verbose):
            export(
                args.source,
                args.out,
                external_data=args.external_data,
                add_special_tokens=args.add_special_tokens,
                beam_search_op=args.beam_search_op,
                plain_attention=args.plain_attention,
                inflight=args.inflight,
                ignore_generation_fields=args.ignore_generation_fields,
                force=args.force,
            )
    except (SourceError, UnsupportedModelError, GenerationSettingError, LSGConfigError) as exc:
        raise InvalidInputError(str(exc)) from exc
    except GraphMismatchError as exc:
        raise InvalidInputError(f"export failed verification, nothing was written: {exc}") from exc
    return 0


def _quantize(args: argparse.Namespace) -> int:
    with needs_extra("quantize", "onnx and onnxruntime's quantization tools", "pip install -e '.[quantize]'"):
        from .quantization import formats
        from .quantization.pipeline import QuantizationError, default_settings, quantize
        from .quantization.quality import format_report
    from ..runtime.library_output import third_party_output_hidden

    settings = default_settings(args.to)
    overrides = {
        "lm_head": args.lm_head,
        "embeddings": args.embeddings,
        "block_size": args.block_size,
        "accuracy_level": args.accuracy_level,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if overrides and not isinstance(settings, (formats.Int8Settings, formats.Int4Settings)):
        raise InvalidInputError(f"{sorted(overrides)} apply to int8/int4 only, not {args.to}")
    if {"block_size", "accuracy_level"} & set(overrides) and not isinstance(settings, formats.Int4Settings):
        raise InvalidInputError("--block-size and --accuracy-level apply to int4 only")
    settings = replace(settings, **overrides)
    texts = None
    if args.texts:
        with open(args.texts, "rb") as handle:
            texts = [text for _, text in read_lines(handle, args.texts) if text.strip()]
        if not texts:
            raise InvalidInputError(f"--texts {args.texts} holds no text")
    try:
        with third_party_output_hidden(not args.verbose):
            manifest = quantize(
                args.export_dir, args.out, args.to, settings, args.min_agreement, texts, force=args.force
            )
    except QuantizationError as exc:
        raise InvalidInputError(str(exc)) from exc
    print(format_report(manifest.quantization.quality))
    return 0


def add_export(commands) -> None:
    export = commands.add_parser(
        "export", help="export a checkpoint to an ONNX directory (needs torch)", formatter_class=_ExportHelp
    )
    common_options(export)
    export.add_argument("source", help=SOURCE_HELP)
    out_options(export, "export")
    export.add_argument(
        "--external-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store weights in a .data file beside each graph (default: only over 16 MiB)",
    )
    export.add_argument(
        "--add-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tokenize inputs with the tokenizer's special tokens (default: as the model card does; "
        "google's roberta2roberta/bert2bert/bert_for_seq_generation cards do not)",
    )
    export.add_argument(
        "--beam-search-op",
        action="store_true",
        help="also write beam_search.onnx, for `generate --engine beam-search-op` (Pegasus only)",
    )
    export.add_argument(
        "--inflight",
        action="store_true",
        help="also write decoder_inflight.onnx, for `serve --scheduler inflight` (requests join and leave "
        "the running decode loop at every step)",
    )
    export.add_argument(
        "--plain-attention",
        action="store_true",
        help="self-attention in standard ONNX ops only, for runtimes without onnxruntime's contrib ops "
        "(default: the encoder's is com.microsoft MultiHeadAttention, the decoder's "
        "DecoderMaskedMultiHeadAttention where the head size allows)",
    )
    export.add_argument(
        "--ignore-generation-fields",
        action="store_true",
        help="export even if the generation config sets fields ortseq does not apply (recorded in the manifest)",
    )
    export.set_defaults(run=_export)


def add_quantize(commands) -> None:
    quantize = commands.add_parser(
        "quantize",
        help="make an int8/int4/fp16 copy of an export, with a quality report",
        formatter_class=HelpFormatter,
    )
    common_options(quantize)
    quantize.add_argument("export_dir", help="an fp32 export directory")
    quantize.add_argument("--to", required=True, choices=["int8", "int4", "fp16"], help="the format to write")
    out_options(quantize, "export")
    quantize.add_argument(
        "--min-agreement",
        type=FRACTION,
        default=0.9,
        help="refuse (exit 2, nothing written) when greedy or beam token agreement with fp32 is lower",
    )
    quantize.add_argument(
        "--lm-head", action=argparse.BooleanOptionalAction, default=None, help="quantize the LM head (default: yes)"
    )
    quantize.add_argument(
        "--embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize the token embedding (default: yes)",
    )
    quantize.add_argument("--block-size", type=_block_size, help="int4 block size, a power of two >= 16 (default 32)")
    quantize.add_argument(
        "--accuracy-level",
        type=int,
        choices=[0, 1, 2, 3, 4],
        help="int4 MatMulNBits compute type: 4 int8 activations on CPU (default, faster), 0 float",
    )
    quantize.add_argument(
        "--texts",
        type=_existing_file,
        help="file with one input text per line for the quality report (default: built-in texts)",
    )
    quantize.set_defaults(run=_quantize)
