"""The `ortseq` command line: generate and bundle (runtime only), serve (needs the [serve] extra), batch and
serve --replicas (need the [ray] extra). export and quantize come from the exporter (exporter/cli.py),
registered through the `ortseq.commands` entry-point group: the runtime never imports the exporter."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path

from ..graphs import __version__
from ..graphs.directories import OutputDirError
from ..graphs.generation import add_generation_arguments, generation_overrides
from ..graphs.manifest import BEAM_SEARCH_OP_ENGINE, LOOP_ENGINE
from .errors import InvalidInputError, ManifestError
from .library_output import third_party_output_hidden
from .texts import DEFAULT_BATCH_SIZE, check_unicode, read_lines, summarize_stream

EXIT_USAGE = 2
USER_ERRORS = (InvalidInputError, ManifestError, OutputDirError)


@contextmanager
def needs_extra(command: str, what: str, install: str):
    """Imports of an optional extra: a missing package becomes a usage error that says how to install it."""
    try:
        yield
    except ImportError as exc:
        raise InvalidInputError(f"`ortseq {command}` needs {what} ({exc.name} is missing): {install}") from exc


def _generate(args: argparse.Namespace) -> int:
    from .model import Seq2SeqModel

    _check_text_arguments(args.texts, args.input)
    model = Seq2SeqModel.load(args.export_dir, provider=args.provider, threads=args.threads, engine=args.engine)
    settings = generation_overrides(args)
    model.settings(**settings)  # reject bad settings before reading any input
    with _opened_input(args.input) as (source, name):
        lines = enumerate(args.texts, 1) if args.texts else read_lines(source, name)
        count = summarize_stream(model, lines, args.batch_size, settings, sys.stdout, sys.stderr, args.json)
    if count == 0:
        raise InvalidInputError(f"no input: {name} holds no line; give texts as arguments, --input FILE or stdin")
    return 0


def _check_text_arguments(texts: list[str], input_file: str | None) -> None:
    """Texts given as arguments: none blank or not UTF-8, none that is only a file name, not with --input."""

    if texts and input_file:
        raise InvalidInputError("give texts as arguments or --input FILE, not both")
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise InvalidInputError(
                f"text argument {number} is empty or only whitespace: there is nothing to summarize"
            )
        check_unicode(text, f"text argument {number}")
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


def _batch(args: argparse.Namespace) -> int:
    from .batch import default_errors_path
    from .ray_batch import BatchJob, import_ray, run_batch

    import_ray()  # a missing Ray is a usage error before anything is read or written
    if generation_overrides(args).get("num_return_sequences", 1) != 1:
        raise InvalidInputError("num_return_sequences must be 1 in a batch job: it writes one summary per id")
    output = Path(args.output)
    job = BatchJob(
        export_dir=Path(args.export_dir),
        input=Path(args.input),
        output=output,
        errors=Path(args.errors) if args.errors else default_errors_path(output),
        workers=args.workers,
        threads=args.threads,
        batch_size=args.batch_size,
        address=args.address,
        text_field=args.text_field,
        id_field=args.id_field,
        provider=args.provider,
        engine=args.engine,
        generate_kwargs=generation_overrides(args),
        verbose=args.verbose,
    )
    with third_party_output_hidden(not args.verbose):  # Ray's own notices (its C++ core's too): only with -v
        report = run_batch(job)
    print(
        f"ortseq: {report.summarized} summarized, {report.already_done} already in {output}, "
        f"{report.rejected} refused (see {job.errors})",
        file=sys.stderr,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    with needs_extra("serve", "the serving dependencies", "pip install -e '.[serve]'"):
        from .serving.server import ServerOptions, bound_socket, serve
    from .serving.batcher import BatchingConfig
    from .serving.schema import RequestLimits

    limits = RequestLimits(args.max_inputs, args.max_input_tokens, args.max_num_beams)
    batching = BatchingConfig(
        args.max_batch_size, args.max_wait_ms, args.max_queue, args.scheduler, args.max_rows, args.max_decoder_tokens
    )
    if args.replicas is not None:
        return _serve_on_ray(args, limits, batching)
    if args.address is not None:
        raise InvalidInputError("--address goes with --replicas (a Ray Serve deployment)")
    socket = bound_socket(args.host, args.port)  # a taken port fails here, before the model loads
    options = ServerOptions(
        args.host,
        args.port,
        args.provider,
        args.threads,
        ServerOptions.graceful_timeout_s if args.graceful_timeout is None else args.graceful_timeout,
        ServerOptions.max_connections if args.max_connections is None else args.max_connections,
    )
    serve(args.export_dir, options, limits, batching, socket)
    return 0


def _serve_on_ray(args: argparse.Namespace, limits, batching) -> int:
    # uvicorn's connection limit is this process's; Ray Serve's proxy has its own
    if args.max_connections is not None:
        raise InvalidInputError("--max-connections does not apply with --replicas (Ray Serve's proxy)")
    from .ray_batch import import_ray

    import_ray()
    from .serving.ray_serve import serve_on_ray
    from .serving.schema import GRACEFUL_TIMEOUT_S

    graceful_timeout_s = GRACEFUL_TIMEOUT_S if args.graceful_timeout is None else args.graceful_timeout
    with third_party_output_hidden(not args.verbose):  # Ray's own notices (its C++ core's too): only with -v
        serve_on_ray(
            args.export_dir, args.host, args.port, args.replicas, args.provider, args.threads, limits, batching,
            args.address, graceful_timeout_s, args.verbose,
        )  # fmt: skip
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from .bundle import make_bundle

    make_bundle(args.export_dir, args.out, force=args.force)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the rule for every error), pointing at --help instead of printing usage."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option's help, except where the default is "not given" (None/False):
    those helps say in words what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or isinstance(action.default, list):
            return action.help or ""
        return super()._get_help_string(action)


def bounded(kind, low=None, high=None, what: str = ""):
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


POSITIVE = bounded(int, 1, None, "at least 1")
THREADS = bounded(int, 1, None, "at least 1 thread")
PORT = bounded(int, 1, 65535, "a port lies in 1..65535")
NON_NEGATIVE = bounded(float, 0.0, None, "at least 0")


def common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="more log output, and the libraries' own warnings and progress"
    )


def out_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--out",
        required=True,
        help=f"{what} directory to write: a new or empty directory, or an existing ortseq {what} with --force "
        "(written beside it and renamed into place only when complete)",
    )
    parser.add_argument("--force", action="store_true", help=f"replace an existing ortseq {what} at --out")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ortseq", description=__doc__, formatter_class=HelpFormatter)
    common_options(parser)
    parser.add_argument("--version", action="version", version=f"ortseq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_plugin_commands(commands)
    _add_generate(commands)
    _add_serve(commands)
    _add_batch(commands)
    _add_bundle(commands)
    return parser


def _add_plugin_commands(commands) -> None:
    """Commands other installed parts of ortseq register (export and quantize, from the exporter). A bundle
    ships without the exporter: its entry points, if a full install is also present, do not import."""
    for entry_point in entry_points(group="ortseq.commands"):
        try:
            register = entry_point.load()
        except ImportError:
            continue
        register(commands)


def _add_generate(commands) -> None:
    generate = commands.add_parser(
        "generate", help="summarize texts with an export directory", formatter_class=HelpFormatter
    )
    common_options(generate)
    generate.add_argument("export_dir", help="an export directory (ortseq export / ortseq quantize)")
    generate.add_argument(
        "texts", nargs="*", help="texts to summarize; without any, one text per line from --input FILE or stdin"
    )
    generate.add_argument(
        "--input",
        metavar="FILE",
        help="read one text per line from FILE (UTF-8; a blank line gets an empty output line) instead of stdin",
    )
    generate.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per input: {"input": N, "summaries": [...], "input_tokens": n, "output_tokens": [...]} '
        "(several summaries with --num-return-sequences); without it, one summary per line, and with several "
        'per input each line starts "N.R<TAB>" (input N, hypothesis R)',
    )
    add_generation_arguments(generate)
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
        "serve", help="serve an export directory over HTTP (needs the [serve] extra)", formatter_class=HelpFormatter
    )
    common_options(serve)
    serve.add_argument("export_dir", help="the export directory to serve (fixed for the server's life)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: this machine only)")
    serve.add_argument("--port", type=PORT, default=8080, help="TCP port to listen on")
    serve.add_argument("--max-batch-size", type=POSITIVE, default=16, help="most inputs merged into one generate call")
    serve.add_argument(
        "--max-wait-ms", type=NON_NEGATIVE, default=10.0, help="longest a request waits for others to join"
    )
    serve.add_argument("--max-queue", type=POSITIVE, default=64, help="requests waiting; more get 503 + Retry-After")
    serve.add_argument(
        "--scheduler",
        choices=["dynamic", "inflight"],
        default="dynamic",
        help="dynamic: requests with equal settings share generate calls; inflight: requests of any settings "
        "join and leave one running decode loop at every step (CPU; an export made with --inflight; "
        "docs/serving-scheduler.md)",
    )
    serve.add_argument(
        "--max-rows", type=POSITIVE, default=64, help="inflight: decoder rows (beams) running at once; more wait"
    )
    serve.add_argument(
        "--max-decoder-tokens",
        type=POSITIVE,
        default=256,
        help="inflight: cache slots per row; a request whose max_length - 1 exceeds it is refused",
    )
    serve.add_argument("--max-inputs", type=POSITIVE, default=16, help="inputs per request (at most --max-batch-size)")
    serve.add_argument(
        "--max-input-tokens", type=POSITIVE, help="tokens per input; longer get 422 (default: the model's maximum)"
    )
    serve.add_argument("--max-num-beams", type=POSITIVE, default=8, help="largest num_beams a request may ask for")
    serve.add_argument(
        "--max-connections",
        type=POSITIVE,
        help="concurrent connections; more get 503 (default: 256; not with --replicas)",
    )
    serve.add_argument(
        "--graceful-timeout",
        type=NON_NEGATIVE,
        help="seconds to finish the requests in flight and queued on SIGTERM (default: 60)",
    )
    serve.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime execution provider")
    serve.add_argument("--threads", type=THREADS, help="onnxruntime intra-op threads (default: all cores)")
    serve.add_argument(
        "--replicas",
        type=POSITIVE,
        help="run as a Ray Serve deployment with this many replicas (needs the [ray] extra)",
    )
    serve.add_argument("--address", help="with --replicas: Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    serve.set_defaults(run=_serve)


def _add_batch(commands) -> None:
    batch = commands.add_parser(
        "batch",
        help="summarize a corpus (JSON Lines or Parquet) on Ray Data; resumable (needs the [ray] extra)",
        formatter_class=HelpFormatter,
    )
    common_options(batch)
    batch.add_argument("export_dir", help="an export directory (ortseq export / ortseq quantize)")
    batch.add_argument("--input", required=True, help="JSON Lines (or .parquet) with an id and a text per line")
    batch.add_argument("--output", required=True, help="JSON Lines of {id, summary, ...}; a rerun resumes it")
    batch.add_argument("--errors", help="refused inputs with line and reason (default: OUTPUT's stem + .errors.jsonl)")
    batch.add_argument("--text-field", default="text", help="the field holding each document's text")
    batch.add_argument("--id-field", default="id", help="the field holding each document's id")
    batch.add_argument("--workers", type=POSITIVE, help="actors, each with its own model (default: CPUs / --threads)")
    batch.add_argument("--threads", type=THREADS, default=1, help="onnxruntime threads (and CPUs) per worker")
    batch.add_argument("--batch-size", type=POSITIVE, default=16, help="documents per generate call")
    batch.add_argument("--address", help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")
    add_generation_arguments(batch)
    batch.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="onnxruntime execution provider")
    batch.add_argument(
        "--engine", default=LOOP_ENGINE, choices=[LOOP_ENGINE, BEAM_SEARCH_OP_ENGINE], help="see `generate --help`"
    )
    batch.set_defaults(run=_batch)


def _add_bundle(commands) -> None:
    bundle = commands.add_parser(
        "bundle", help="a self-contained folder to summarize with on another machine", formatter_class=HelpFormatter
    )
    common_options(bundle)
    bundle.add_argument("export_dir", help="the export directory to ship")
    out_options(bundle, "bundle")
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
