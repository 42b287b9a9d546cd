"""Texts one per line, summarized batch by batch, each batch's summaries printed as soon as it is done.

What `ortseq generate` does with stdin or `--input FILE`: a blank line gets an empty output line (and one
warning naming it), so output line N always belongs to input line N (with several hypotheses per text,
each line says its input and rank); a line that is not UTF-8 is refused with its number.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from typing import BinaryIO, TextIO

from .errors import InvalidInputError

logger = logging.getLogger("ortseq")
DEFAULT_BATCH_SIZE = 8  # texts per generate call: small enough that output keeps coming


def check_unicode(text: str, what: str) -> None:
    """Python turns bytes that are not UTF-8 (a Latin-1 shell argument, a file read with
    errors="surrogateescape") into lone surrogates, which no tokenizer can encode: refuse them by position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} is not UTF-8 text (character {exc.start + 1} is {text[exc.start]!r}, an undecodable byte); "
            "convert it to UTF-8 first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_lines(stream: BinaryIO, name: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line of a binary stream, decoded as UTF-8, read lazily."""
    for number, raw in enumerate(stream, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(
                f"{name} line {number} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                "convert the file first, e.g. iconv -f latin1 -t utf-8"
            ) from exc
        yield number, text.rstrip("\n").rstrip("\r")


def summarize_stream(
    model,
    lines: Iterable[tuple[int, str]],
    batch_size: int | None,
    settings: dict,
    out: TextIO,
    progress: TextIO,
    as_json: bool = False,
) -> int:
    """Summarize (number, text) pairs batch by batch, printing each batch's summaries as it finishes;
    returns the number of lines read. One line per summary: the summary alone, or, with several
    hypotheses per text (num_return_sequences), "N.R<TAB>summary" (input N, hypothesis R). as_json: one
    JSON object per input instead: {"input", "summaries", "input_tokens", "output_tokens"}."""
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {batch_size}")
    per_text = model.settings(**settings).num_return_sequences
    show_progress = progress.isatty()
    done = 0
    for batch in _batches(lines, batch_size):
        texts = [text for _, text in batch if text.strip()]
        summaries = iter(model.summaries(texts, **settings) if texts else [])
        for number, text in batch:
            if not text.strip():
                logger.warning(
                    "line %d is blank: its output %s", number, "has no summary" if as_json else "line is empty"
                )
            hypotheses = [next(summaries) for _ in range(per_text)] if text.strip() else []
            out.write(_format(number, hypotheses, per_text, as_json))
        out.flush()
        done += len(batch)
        if show_progress:
            progress.write(f"\rortseq: {done} texts summarized")
            progress.flush()
    if show_progress and done:
        progress.write("\n")
    return done


def _format(number: int, hypotheses: list, per_text: int, as_json: bool) -> str:
    """The output lines of one input (hypotheses: its CountedSummary list, empty for a blank line)."""
    if as_json:
        record = {
            "input": number,
            "summaries": [hypothesis.text for hypothesis in hypotheses],
            "input_tokens": hypotheses[0].input_tokens if hypotheses else 0,
            "output_tokens": [hypothesis.output_tokens for hypothesis in hypotheses],
        }
        return json.dumps(record, ensure_ascii=False) + "\n"
    texts = [hypothesis.text.replace("\n", " ") for hypothesis in hypotheses] or [""] * per_text
    if per_text == 1:
        return texts[0] + "\n"
    return "".join(f"{number}.{rank}\t{text}\n" for rank, text in enumerate(texts, 1))


def _batches(lines: Iterable[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    """Batches of `size` lines. A line refused while a batch fills (not UTF-8) ends the stream only after
    the lines read before it have been handed out as a last batch: their summaries are not lost."""
    iterator = iter(lines)
    while True:
        batch: list[tuple[int, str]] = []
        try:
            batch.extend(itertools.islice(iterator, size))
        except InvalidInputError:
            if batch:
                yield batch
            raise
        if not batch:
            return
        yield batch
