"""`ortseq batch`'s bookkeeping, without Ray: read a corpus, refuse what cannot be summarized (with its line
and reason), skip ids already summarized by an earlier run, and append results in whole, synced blocks.

Nothing lost, nothing twice: the output file is only ever appended to in complete blocks (one write, then
fsync), so a killed job leaves at most one partial trailing line, which the next run drops before it reads
the ids already done. The errors file is a function of the input alone and is rewritten atomically by
every run; summaries that fail at run time are appended to it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidInputError

logger = logging.getLogger("ortseq")

DocumentId = str | int  # JSON ids: strings or integers, written back exactly as read


class BatchFileError(InvalidInputError):
    """The input or output file cannot be used as it is; the message says which and why."""


@dataclass(frozen=True)
class Document:
    line: int  # 1-based line (JSON Lines) or row (Parquet) in the input
    id: DocumentId
    text: str


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str
    id: DocumentId | None = None

    def record(self) -> dict:
        return {"line": self.line, "id": self.id, "reason": self.reason}


@dataclass
class Plan:
    """What a run has to do: the documents still to summarize, the inputs refused, the ids already done."""

    pending: list[Document] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    already_done: int = 0


@dataclass(frozen=True)
class Result:
    id: DocumentId
    summary: str
    input_tokens: int
    output_tokens: int

    def record(self) -> dict:
        return {
            "id": self.id,
            "summary": self.summary,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }


def default_errors_path(output: Path) -> Path:
    """Next to the output: summaries.jsonl -> summaries.errors.jsonl."""
    return output.with_name(f"{output.stem}.errors.jsonl")


def read_inputs(path: Path, text_field: str, id_field: str) -> Iterator[Document | Rejected]:
    """Every input line (or Parquet row) as a Document, or as Rejected with the reason it cannot be one."""
    if not path.is_file():
        raise BatchFileError(f"input file {path} does not exist")
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _json_lines(path)
    for line, row in rows:
        yield row if isinstance(row, Rejected) else _document(line, row, text_field, id_field)


def _json_lines(path: Path) -> Iterator[tuple[int, dict | Rejected]]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_number, Rejected(line_number, f"not valid JSON ({exc.msg})")
                continue
            yield line_number, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as exc:
        raise BatchFileError(f"reading {path} needs pyarrow: pip install pyarrow, or give JSON Lines") from exc
    line_number = 0
    for batch in parquet.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            line_number += 1
            yield line_number, row


def _document(line: int, row: object, text_field: str, id_field: str) -> Document | Rejected:
    if not isinstance(row, dict):
        return Rejected(line, f"not a JSON object (a {type(row).__name__})")
    if id_field not in row:
        return Rejected(line, f"no {id_field!r} field")
    doc_id = row[id_field]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return Rejected(line, f"the {id_field!r} field must be a string or an integer, got {doc_id!r}")
    if text_field not in row:
        return Rejected(line, f"no {text_field!r} field", doc_id)
    text = row[text_field]
    if not isinstance(text, str):
        return Rejected(line, f"the {text_field!r} field must be a string, got {type(text).__name__}", doc_id)
    if not text.strip():
        return Rejected(line, "empty text: there is nothing to summarize", doc_id)
    return Document(line, doc_id, text)


def make_plan(inputs: Iterable[Document | Rejected], done: set[DocumentId]) -> Plan:
    """Split inputs into pending and rejected; an id seen before (in this input) is a duplicate, refused
    at every occurrence after its first; an id in `done` was summarized by an earlier run."""
    plan, first_line = Plan(), {}
    for item in inputs:
        if isinstance(item, Rejected):
            plan.rejected.append(item)
        elif item.id in first_line:
            plan.rejected.append(Rejected(item.line, f"duplicate id (first on line {first_line[item.id]})", item.id))
        else:
            first_line[item.id] = item.line
            if item.id in done:
                plan.already_done += 1
            else:
                plan.pending.append(item)
    return plan


def check_distinct_files(input_path: Path, output: Path, errors: Path) -> None:
    """--input, --output and --errors are three files: a job reading the output it appends to would take
    every input id for one already summarized, and do nothing."""
    paths = {"--input": input_path, "--output": output, "--errors": errors}
    seen: dict[Path, str] = {}
    for flag, path in paths.items():
        resolved = Path(path).resolve()
        if resolved in seen:
            raise BatchFileError(f"{seen[resolved]} and {flag} are the same file ({path}): give {flag} another path")
        seen[resolved] = flag


def check_something_to_do(input_path: Path, plan: Plan) -> None:
    """An input of which no line is a document (plain text, or every line without the text field) is a
    wrong file or a wrong --text-field/--id-field, not a job that succeeded with everything refused."""
    if plan.pending or plan.already_done:
        return
    if not plan.rejected:
        raise BatchFileError(f"--input {input_path} is empty: give one JSON object per line")
    first = min(plan.rejected, key=lambda item: item.line)
    raise BatchFileError(
        f"--input {input_path}: none of its {len(plan.rejected)} lines is a document to summarize "
        f'(line {first.line}: {first.reason}); give JSON Lines of {{"id": ..., "text": ...}} (or name the '
        "fields with --id-field/--text-field); for plain text, one document per line: ortseq generate --input FILE"
    )


def length_grouped(documents: list[Document], window: int) -> list[Document]:
    """Documents sorted by length within consecutive windows: batches of neighbours pad little, and the
    run still moves through the corpus in order (so its rate, and the ETA, stay representative)."""
    grouped: list[Document] = []
    for start in range(0, len(documents), window):
        grouped += sorted(documents[start : start + window], key=lambda document: len(document.text))
    return grouped


def recover_output(path: Path) -> set[DocumentId]:
    """The ids an earlier run wrote to `path`. A partial last line (the run died mid-write) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with path.open("r+b") as output:
            output.truncate(len(complete))
            os.fsync(output.fileno())
    done = set()
    for line_number, line in enumerate(complete.splitlines(), start=1):
        try:
            record = json.loads(line)
            if "summary" not in record:  # an input line ({"id", "text"}) has an id too
                raise KeyError("summary")
            done.add(record["id"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BatchFileError(
                f"{path} line {line_number} is not an ortseq batch result: give another --output"
            ) from exc
    return done


class BlockWriter:
    """Appends blocks of JSON lines: each block is one write followed by fsync, and no id is written twice."""

    def __init__(self, path: Path, written: Iterable[DocumentId] = ()):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.written = set(written)

    def write(self, results: Iterable[Result]) -> int:
        """Appends the results whose id is new; returns how many were written."""
        fresh = []
        for result in results:
            if result.id not in self.written:
                self.written.add(result.id)
                fresh.append(result.record())
        if fresh:
            append_block(self._fd, fresh)
        return len(fresh)

    def close(self) -> None:
        os.close(self._fd)


def append_block(fd: int, records: list[dict]) -> None:
    data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode()
    written = os.write(fd, data)
    if written != len(data):  # a full disk: refuse rather than leave a silent partial block
        raise OSError(f"wrote {written} of {len(data)} bytes")
    os.fsync(fd)


def write_errors(path: Path, rejected: list[Rejected]) -> None:
    """The errors file, replaced as a whole (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as out:
        for item in sorted(rejected, key=lambda item: item.line):
            out.write(json.dumps(item.record(), ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


class Progress:
    """Documents done, documents/s and ETA, logged (`ortseq: ...` on stderr from the CLI) at most once per
    `every_s`: through ortseq's logger, which writes past the libraries' hidden output."""

    def __init__(self, total: int, every_s: float = 2.0):
        self.total, self.done, self.every_s = total, 0, every_s
        self.started = self._last = time.monotonic()

    def advance(self, documents: int) -> None:
        self.done += documents
        now = time.monotonic()
        if now - self._last >= self.every_s or self.done == self.total:
            self._last = now
            logger.info(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        eta = f"{(self.total - self.done) / rate:.0f} s" if rate > 0 else "unknown"
        return f"{self.done}/{self.total} documents, {rate:.1f} documents/s, ETA {eta}"
