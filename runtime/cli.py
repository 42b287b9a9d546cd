"""The `ortseq` command line: export (needs the [export] extra), quantize (needs onnx), generate and bundle
(runtime only), serve (needs the [serve] extra), batch and serve --replicas (need the [ray] extra)."""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ortseq.graphs.generation import add_generation_arguments, generation_overrides
from ortseq.graphs.manifest import BEAM_SEARCH_OP_ENGINE, LOOP_ENGINE
from ortseq.runtime.errors import InvalidInputError, ManifestError

EXIT_USAGE = 2


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
    from ortseq.exporter.sources import SourceError
    from ortseq.exporter.verify import GraphMismatchError

    try:
        export(
            args.source,
            args.out,
            external_data=args.external_data,
            add_special_tokens=args.add_special_tokens,
            beam_search_op=args.beam_search_op,
            ignore_generation_fields=args.ignore_generation_fields,
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
        texts = [line for line in Path(args.texts).read_text().splitlines() if line.strip()]
    try:
        manifest = quantize(args.export_dir, args.out, args.to, settings, args.min_agreement, texts)
    except QuantizationError as exc:
        raise InvalidInputError(str(exc)) from exc
    print(format_report(manifest.quantization.quality))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from ortseq.runtime.model import Seq2SeqModel

    texts = args.texts if args.texts else [line.rstrip("\n") for line in sys.stdin]
    if not texts:
        raise InvalidInputError("no input: give texts as arguments or one per line on stdin")
    model = Seq2SeqModel.load(args.export_dir, provider=args.provider, threads=args.threads, engine=args.engine)
    summaries = model.summarize(texts, batch_size=args.batch_size, **generation_overrides(args))
    for summary in summaries:
        print(summary.replace("\n", " "), flush=True)
    return 0


def _batch(args: argparse.Namespace) -> int:
    from ortseq.runtime.batch import default_errors_path
    from ortseq.runtime.ray_batch import BatchJob, import_ray, run_batch

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
    )
    report = run_batch(job)
    print(
        f"ortseq: {report.summarized} summarized, {report.already_done} already in {output}, "
        f"{report.rejected} refused (see {job.errors})",
        file=sys.stderr,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    with _needs("serve", "the serving dependencies", "pip install -e '.[serve]'"):
        from ortseq.runtime.serving.server import ServerOptions, serve
    from ortseq.runtime.serving.batcher import BatchingConfig
    from ortseq.runtime.serving.schema import RequestLimits

    options = ServerOptions(
        args.host, args.port, args.provider, args.threads, args.graceful_timeout, args.max_connections
    )
    limits = RequestLimits(args.max_inputs, args.max_input_tokens, args.max_num_beams)
    batching = BatchingConfig(args.max_batch_size, args.max_wait_ms, args.max_queue)
    if args.replicas is None:
        serve(args.export_dir, options, limits, batching)
        return 0
    from ortseq.runtime.ray_batch import import_ray

    import_ray()
    from ortseq.runtime.serving.ray_serve import serve_on_ray

    serve_on_ray(
        args.export_dir,
        args.host,
        args.port,
        args.replicas,
        args.provider,
        args.threads,
        limits,
        batching,
        args.address,
    )
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from ortseq.runtime.bundle import make_bundle

    make_bundle(args.export_dir, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ortseq", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export a checkpoint to an ONNX directory (needs torch)")
    export.add_argument("-v", "--verbose", action="store_true", help="more log output")
    export.add_argument("source", help="alias (see README), hub id or local directory")
    export.add_argument("--out", required=True, help="export directory to create (replaced only when complete)")
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
    export.add_argument(
        "--ignore-generation-fields",
        action="store_true",
        help="export even if the generation config sets fields ortseq does not apply (recorded in the manifest)",
    )
    export.set_defaults(run=_export)

    quantize = commands.add_parser("quantize", help="make an int8/int4/fp16 copy of an export, with a quality report")
    quantize.add_argument("-v", "--verbose", action="store_true", help="more log output")
    quantize.add_argument("export_dir", help="an fp32 export directory")
    quantize.add_argument("--to", required=True, choices=["int8", "int4", "fp16"])
    quantize.add_argument("--out", required=True, help="directory to create (written only if the quality gate passes)")
    quantize.add_argument(
        "--min-agreement",
        type=float,
        default=0.9,
        help="refuse (exit 2, nothing written) when greedy or beam token agreement with fp32 is lower (default 0.9)",
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
    quantize.add_argument("--block-size", type=int, help="int4 block size (default 32)")
    quantize.add_argument(
        "--accuracy-level",
        type=int,
        choices=[0, 1, 2, 3, 4],
        help="int4 MatMulNBits compute type: 4 int8 activations on CPU (default, faster), 0 float",
    )
    quantize.add_argument(
        "--texts", help="file with one input text per line for the quality report (default: built-in)"
    )
    quantize.set_defaults(run=_quantize)

    generate = commands.add_parser("generate", help="summarize texts with an export directory")
    generate.add_argument("-v", "--verbose", action="store_true", help="more log output")
    generate.add_argument("export_dir")
    generate.add_argument("texts", nargs="*", help="texts to summarize; without any, one text per line on stdin")
    add_generation_arguments(generate)
    generate.add_argument("--batch-size", type=int, help="texts per generate call (default: all at once)")
    generate.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    generate.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    generate.add_argument(
        "--engine",
        default=LOOP_ENGINE,
        choices=[LOOP_ENGINE, BEAM_SEARCH_OP_ENGINE],
        help="loop: ortseq's search (default); beam-search-op: ONNX Runtime's BeamSearch op "
        "(export with --beam-search-op)",
    )
    generate.set_defaults(run=_generate)

    serve = commands.add_parser("serve", help="serve an export directory over HTTP (needs the [serve] extra)")
    serve.add_argument("-v", "--verbose", action="store_true", help="more log output")
    serve.add_argument("export_dir")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--max-batch-size", type=int, default=16, help="most inputs merged into one generate call")
    serve.add_argument("--max-wait-ms", type=float, default=10.0, help="longest a request waits for others to join")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting; more get 503 + Retry-After")
    serve.add_argument("--max-inputs", type=int, default=16, help="inputs per request (at most --max-batch-size)")
    serve.add_argument("--max-input-tokens", type=int, help="tokens per input (default: the model's maximum)")
    serve.add_argument("--max-num-beams", type=int, default=8, help="largest num_beams a request may ask for")
    serve.add_argument("--max-connections", type=int, default=256, help="concurrent connections; more get 503")
    serve.add_argument("--graceful-timeout", type=float, default=60.0, help="seconds to finish requests on SIGTERM")
    serve.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    serve.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    serve.add_argument(
        "--replicas", type=int, help="run as a Ray Serve deployment with this many replicas (needs the [ray] extra)"
    )
    serve.add_argument("--address", help="with --replicas: Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    serve.set_defaults(run=_serve)

    batch = commands.add_parser(
        "batch", help="summarize a corpus (JSON Lines or Parquet) on Ray Data; resumable (needs the [ray] extra)"
    )
    batch.add_argument("-v", "--verbose", action="store_true", help="more log output")
    batch.add_argument("export_dir")
    batch.add_argument("--input", required=True, help="JSON Lines (or .parquet) with an id and a text per line")
    batch.add_argument("--output", required=True, help="JSON Lines of {id, summary, ...}; a rerun resumes it")
    batch.add_argument("--errors", help="refused inputs with line and reason (default: OUTPUT's stem + .errors.jsonl)")
    batch.add_argument("--text-field", default="text")
    batch.add_argument("--id-field", default="id")
    batch.add_argument("--workers", type=int, help="actors, each with its own model (default: CPUs / --threads)")
    batch.add_argument("--threads", type=int, default=1, help="onnxruntime threads (and CPUs) per worker")
    batch.add_argument("--batch-size", type=int, default=16, help="documents per generate call (default 16)")
    batch.add_argument("--address", help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")
    add_generation_arguments(batch)
    batch.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    batch.add_argument("--engine", default=LOOP_ENGINE, choices=[LOOP_ENGINE, BEAM_SEARCH_OP_ENGINE])
    batch.set_defaults(run=_batch)

    bundle = commands.add_parser("bundle", help="a self-contained folder to summarize with on another machine")
    bundle.add_argument("-v", "--verbose", action="store_true", help="more log output")
    bundle.add_argument("export_dir")
    bundle.add_argument("--out", required=True, help="bundle directory to create (replaced only when complete)")
    bundle.set_defaults(run=_bundle)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Like parse_args, but options may follow the texts (`generate DIR "text" --num-beams 4`)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv and argv[0] in commands:  # argparse cannot intermix positionals and options under subparsers
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="ortseq: %(message)s", stream=sys.stderr
    )
    try:
        return args.run(args)
    except (InvalidInputError, ManifestError) as exc:
        print(f"ortseq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ortseq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
