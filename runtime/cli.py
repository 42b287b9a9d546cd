"""The `ortseq` command line: export (needs the [export] extra) and generate (runtime only)."""

from __future__ import annotations

import argparse
import logging
import sys

from graphs.manifest import BEAM_SEARCH_OP_ENGINE, LOOP_ENGINE
from runtime.errors import InvalidInputError, ManifestError

EXIT_USAGE = 2


def _export(args: argparse.Namespace) -> int:
    try:
        from exporter.pipeline import export
    except ImportError as exc:
        raise InvalidInputError(
            f"`ortseq export` needs the exporter dependencies ({exc.name} is missing): "
            "pip install torch==2.13.0 -e '.[export]'"
        ) from exc
    from exporter.families import UnsupportedModelError
    from exporter.sources import SourceError
    from exporter.verify import GraphMismatchError

    try:
        export(
            args.source,
            args.out,
            external_data=args.external_data,
            add_special_tokens=args.add_special_tokens,
            beam_search_op=args.beam_search_op,
        )
    except (SourceError, UnsupportedModelError) as exc:
        raise InvalidInputError(str(exc)) from exc
    except GraphMismatchError as exc:
        raise InvalidInputError(f"export failed verification, nothing was written: {exc}") from exc
    return 0


def _generate(args: argparse.Namespace) -> int:
    from runtime.model import Seq2SeqModel

    texts = args.texts if args.texts else [line.rstrip("\n") for line in sys.stdin]
    if not texts:
        raise InvalidInputError("no input: give texts as arguments or one per line on stdin")
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
    summaries = model.summarize(texts, batch_size=args.batch_size, **settings)
    for summary in summaries:
        print(summary.replace("\n", " "), flush=True)
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
    export.set_defaults(run=_export)

    generate = commands.add_parser("generate", help="summarize texts with an export directory")
    generate.add_argument("-v", "--verbose", action="store_true", help="more log output")
    generate.add_argument("export_dir")
    generate.add_argument("texts", nargs="*", help="texts to summarize; without any, one text per line on stdin")
    generate.add_argument("--num-beams", type=int)
    generate.add_argument("--max-new-tokens", type=int)
    generate.add_argument("--min-new-tokens", type=int)
    generate.add_argument("--length-penalty", type=float)
    generate.add_argument("--no-repeat-ngram-size", type=int)
    generate.add_argument(
        "--early-stopping",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="end a beam search once num_beams hypotheses are finished (default: the model's)",
    )
    generate.add_argument("--num-return-sequences", type=int, default=1)
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
