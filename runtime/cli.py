"""The `ortseq` command line: export (needs the [export] extra), quantize (needs onnx), generate and bundle
(runtime only), serve (needs the [serve] extra)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ortseq.graphs import __version__
from ortseq.graphs.directories import OutputDirError
from ortseq.graphs.manifest import BEAM_SEARCH_OP_ENGINE, LOOP_ENGINE
from ortseq.runtime.errors import InvalidInputError, ManifestError
from ortseq.runtime.texts import DEFAULT_BATCH_SIZE, read_lines, summarize_stream

EXIT_USAGE = 2
USER_ERRORS = (InvalidInputError, ManifestError, OutputDirError)


@contextmanager
def _needs(command: str, what: str, install: str):
    """Imports of an optional extra: a missing package becomes a usage error that says how to install it."""
    try:
        yield
    except ImportError as exc:
        raise InvalidInputError(f"`ortseq {command}` needs {what} ({exc.name} is missing): {install}") from exc


def _export(args: argparse.Namespace) -> int:
    with _needs("export", "the exporter dependencies", "pip install torch==2.13.0 -e '.[export]'"):
        from ortseq.exporter.pipeline import export
    from ortseq.exporter.families import UnsupportedModelError
    from ortseq.exporter.progress import third_party_output_hidden
    from ortseq.exporter.sources import SourceError
    from ortseq.exporter.verify import GraphMismatchError

    try:
        with third_party_output_hidden(not args.verbose):
            export(
                args.source,
                args.out,
                external_data=args.external_data,
                add_special_tokens=args.add_special_tokens,
                beam_search_op=args.beam_search_op,
                force=args.force,
            )
    except (SourceError, UnsupportedModelError) as exc:
        raise InvalidInputError(str(exc)) from exc
    except GraphMismatchError as exc:
        raise InvalidInputError(f"export failed verification, nothing was written: {exc}") from exc
    return 0


def _quantize(args: argparse.Namespace) -> int:
    with _needs("quantize", "onnx and onnxruntime's quantization tools", "pip install -e '.[quantize]'"):
        from ortseq.exporter.quantization import formats
        from ortseq.exporter.quantization.pipeline import QuantizationError, default_settings, quantize
        from ortseq.exporter.quantization.quality import format_report
    from ortseq.exporter.progress import third_party_output_hidden

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


def _generate(args: argparse.Namespace) -> int:
    from ortseq.runtime.model import Seq2SeqModel

    _check_text_arguments(args.texts, args.input)
    model = Seq2SeqModel.load(args.export_dir, provider=args.provider, threads=args.threads, engine=args.engine)
    settings = {
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "length_penalty": args.length_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "early_stopping": args.early_stopping,
        "num_return_sequences": args.num_return_sequences,
    }
    model.settings(**settings)  # reject bad settings before reading any input
    with _opened_input(args.input) as (source, name):
        lines = enumerate(args.texts, 1) if args.texts else read_lines(source, name)
        count = summarize_stream(model, lines, args.batch_size, settings, sys.stdout, sys.stderr)
    if count == 0:
        raise InvalidInputError(f"no input: {name} holds no line; give texts as arguments, --input FILE or stdin")
    return 0


def _check_text_arguments(texts: list[str], input_file: str | None) -> None:
    """Texts given as arguments: none blank, none that is only a file name, not together with --input."""
    if texts and input_file:
        raise InvalidInputError("give texts as arguments or --input FILE, not both")
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise InvalidInputError(
                f"text argument {number} is empty or only whitespace: there is nothing to summarize"
            )
        if not any(c.isspace() for c in text) and Path(text).is_file():
            raise InvalidInputError(
                f"{text!r} is a file: did you mean --input {text}? (texts to summarize have spaces)"
            )


@contextmanager
def _opened_input(input_file: str | None):
    """The binary stream to read texts from (--input FILE, else stdin) and its name for messages."""
    if input_file is None or input_file == "-":
        yield sys.stdin.buffer, "stdin"
        return
    try:
        handle = open(input_file, "rb")
    except OSError as exc:
        raise InvalidInputError(f"--input {input_file}: {exc.strerror}") from exc
    with handle:
        yield handle, input_file


def _serve(args: argparse.Namespace) -> int:
    with _needs("serve", "the serving dependencies", "pip install -e '.[serve]'"):
        from ortseq.runtime.serving.server import ServerOptions, bound_socket, serve
    from ortseq.runtime.serving.batcher import BatchingConfig
    from ortseq.runtime.serving.schema import RequestLimits

    socket = bound_socket(args.host, args.port)  # a taken port fails here, before the model loads
    options = ServerOptions(
        args.host, args.port, args.provider, args.threads, args.graceful_timeout, args.max_connections
    )
    limits = RequestLimits(args.max_inputs, args.max_input_tokens, args.max_num_beams)
    batching = BatchingConfig(args.max_batch_size, args.max_wait_ms, args.max_queue)
    serve(args.export_dir, options, limits, batching, socket)
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from ortseq.runtime.bundle import make_bundle

    make_bundle(args.export_dir, args.out, force=args.force)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the rule for every error), pointing at --help instead of printing usage."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option's help, except where the default is "not given" (None/False):
    those helps say in words what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or isinstance(action.default, list):
            return action.help or ""
        return super()._get_help_string(action)


def _bounded(kind, low=None, high=None, what: str = ""):
    """An argparse type: kind(text) within [low, high], else a one-line usage error saying the range."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return value

    return parse


def _block_size(text: str) -> int:
    """onnxruntime's MatMulNBits (and its quantizer) take power-of-two blocks of at least 16."""
    value = _bounded(int, 16, None, "the block size must be a power of two >= 16")(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"{text} is not a power of two (16, 32, 64, 128, ...)")
    return value


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text


POSITIVE = _bounded(int, 1, None, "at least 1")
THREADS = _bounded(int, 1, None, "at least 1 thread")
PORT = _bounded(int, 1, 65535, "a port lies in 1..65535")
FRACTION = _bounded(float, 0.0, 1.0, "agreement is a fraction in [0, 1]")
NON_NEGATIVE = _bounded(float, 0.0, None, "at least 0")


def _aliases() -> str:
    """The export aliases, when the exporter is installed (a bundle ships without it)."""
    try:
        from ortseq.exporter.sources import ALIASES
    except ImportError:
        return "see README"
    return ", ".join(ALIASES)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="more log output, and the libraries' own warnings and progress"
    )


def _out_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--out",
        required=True,
        help=f"{what} directory to write: a new or empty directory, or an existing ortseq {what} with --force "
        "(written beside it and renamed into place only when complete)",
    )
    parser.add_argument("--force", action="store_true", help=f"replace an existing ortseq {what} at --out")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ortseq", description=__doc__, formatter_class=_Help)
    _common(parser)
    parser.add_argument("--version", action="version", version=f"ortseq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_export(commands)
    _add_quantize(commands)
    _add_generate(commands)
    _add_serve(commands)
    _add_bundle(commands)
    return parser


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export", help="export a checkpoint to an ONNX directory (needs torch)", formatter_class=_Help
    )
    _common(export)
    export.add_argument("source", help=f"an alias ({_aliases()}), a hub id or a save_pretrained() directory")
    _out_options(export, "export")
    export.add_argument(
        "--external-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store weights in a .data file beside each graph (default: only over 1 GiB)",
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
    export.set_defaults(run=_export)


def _add_quantize(commands) -> None:
    quantize = commands.add_parser(
        "quantize", help="make an int8/int4/fp16 copy of an export, with a quality report", formatter_class=_Help
    )
    _common(quantize)
    quantize.add_argument("export_dir", help="an fp32 export directory")
    quantize.add_argument("--to", required=True, choices=["int8", "int4", "fp16"], help="the format to write")
    _out_options(quantize, "export")
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


def _add_generate(commands) -> None:
    generate = commands.add_parser("generate", help="summarize texts with an export directory", formatter_class=_Help)
    _common(generate)
    generate.add_argument("export_dir", help="an export directory (ortseq export / ortseq quantize)")
    generate.add_argument(
        "texts", nargs="*", help="texts to summarize; without any, one text per line from --input FILE or stdin"
    )
    generate.add_argument(
        "--input",
        metavar="FILE",
        help="read one text per line from FILE (UTF-8; a blank line gets an empty output line) instead of stdin",
    )
    generate.add_argument("--num-beams", type=int, help="beams of the search, 1 is greedy (default: the model's)")
    generate.add_argument(
        "--max-new-tokens", type=int, help="most tokens to generate (default: the model's max_length)"
    )
    generate.add_argument("--min-new-tokens", type=int, help="fewest tokens before EOS is allowed (default: 0)")
    generate.add_argument("--length-penalty", type=float, help="beam score length exponent (default: the model's)")
    generate.add_argument(
        "--no-repeat-ngram-size", type=int, help="ban repeated n-grams of this size (default: the model's)"
    )
    generate.add_argument(
        "--early-stopping",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="end a beam search once num_beams hypotheses are finished (default: the model's)",
    )
    generate.add_argument("--num-return-sequences", type=int, default=1, help="summaries printed per text, best first")
    generate.add_argument(
        "--batch-size", type=POSITIVE, default=DEFAULT_BATCH_SIZE, help="texts per generate call; printed as each ends"
    )
    generate.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime execution provider")
    generate.add_argument("--threads", type=THREADS, help="onnxruntime intra-op threads (default: all cores)")
    generate.add_argument(
        "--engine",
        default=LOOP_ENGINE,
        choices=[LOOP_ENGINE, BEAM_SEARCH_OP_ENGINE],
        help="loop: ortseq's search; beam-search-op: ONNX Runtime's BeamSearch op (export with --beam-search-op)",
    )
    generate.set_defaults(run=_generate)


def _add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve", help="serve an export directory over HTTP (needs the [serve] extra)", formatter_class=_Help
    )
    _common(serve)
    serve.add_argument("export_dir", help="the export directory to serve (fixed for the server's life)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: this machine only)")
    serve.add_argument("--port", type=PORT, default=8080, help="TCP port to listen on")
    serve.add_argument("--max-batch-size", type=POSITIVE, default=16, help="most inputs merged into one generate call")
    serve.add_argument(
        "--max-wait-ms", type=NON_NEGATIVE, default=10.0, help="longest a request waits for others to join"
    )
    serve.add_argument("--max-queue", type=POSITIVE, default=64, help="requests waiting; more get 503 + Retry-After")
    serve.add_argument("--max-inputs", type=POSITIVE, default=16, help="inputs per request (at most --max-batch-size)")
    serve.add_argument(
        "--max-input-tokens", type=POSITIVE, help="tokens per input; longer get 422 (default: the model's maximum)"
    )
    serve.add_argument("--max-num-beams", type=POSITIVE, default=8, help="largest num_beams a request may ask for")
    serve.add_argument("--max-connections", type=POSITIVE, default=256, help="concurrent connections; more get 503")
    serve.add_argument(
        "--graceful-timeout", type=NON_NEGATIVE, default=60.0, help="seconds to finish requests on SIGTERM"
    )
    serve.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime execution provider")
    serve.add_argument("--threads", type=THREADS, help="onnxruntime intra-op threads (default: all cores)")
    serve.set_defaults(run=_serve)


def _add_bundle(commands) -> None:
    bundle = commands.add_parser(
        "bundle", help="a self-contained folder to summarize with on another machine", formatter_class=_Help
    )
    _common(bundle)
    bundle.add_argument("export_dir", help="the export directory to ship")
    _out_options(bundle, "bundle")
    bundle.set_defaults(run=_bundle)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Like parse_args, but options may follow the texts (`generate DIR "text" --num-beams 4`)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv and argv[0] in commands:  # argparse cannot intermix positionals and options under subparsers
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def _configure_logging(verbose: bool) -> None:
    """ortseq's own messages as "ortseq: ..."; other libraries' log records only with -v, under their name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ortseq: %(message)s"))
    ours = logging.getLogger("ortseq")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False
    logging.captureWarnings(True)  # Python warnings (numpy's RuntimeWarning, ...) become log records: hidden
    root = logging.getLogger()
    if verbose:
        others = logging.StreamHandler(sys.stderr)
        others.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.handlers[:] = [others]
        root.setLevel(logging.INFO)
    else:
        root.handlers[:] = [logging.NullHandler()]


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), sys.argv[1:] if argv is None else argv)
    _configure_logging(args.verbose)
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        print(f"ortseq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ortseq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
