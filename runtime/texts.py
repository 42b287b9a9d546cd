"""Texts one per line, summarized batch by batch, each batch's summaries printed as soon as it is done.

What `ortseq generate` does with stdin or `--input FILE`: a blank line gets an empty output line (and one
warning naming it), so output line N always belongs to input line N; a line that is not UTF-8 is refused
with its number.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import BinaryIO, TextIO

from .errors import InvalidInputError

logger = logging.getLogger("ortseq")
DEFAULT_BATCH_SIZE = 8  # texts per generate call: small enough that output keeps coming


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
    model, lines: Iterable[tuple[int, str]], batch_size: int | None, settings: dict, out: TextIO, progress: TextIO
) -> int:
    """Summarize (line number, text) pairs batch by batch, printing each batch's summaries (one per
    line, num_return_sequences per text) as it finishes; returns the number of lines read."""
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {batch_size}")
    per_text = settings.get("num_return_sequences") or 1
    show_progress = progress.isatty()
    done = 0
    for batch in _batches(lines, batch_size):
        texts = [text for _, text in batch if text.strip()]
        summaries = iter(model.summarize(texts, **settings) if texts else [])
        for number, text in batch:
            if not text.strip():
                logger.warning("line %d is blank: its output line is empty", number)
            for _ in range(per_text):
                out.write((next(summaries) if text.strip() else "").replace("\n", " ") + "\n")
        out.flush()
        done += len(batch)
        if show_progress:
            progress.write(f"\rortseq: {done} texts summarized")
            progress.flush()
    if show_progress and done:
        progress.write("\n")
    return done


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
