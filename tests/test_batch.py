"""`ortseq batch`'s bookkeeping without Ray: refused inputs, resume, whole-block appends, length grouping; and
run_batch itself on an in-process Summarizer, so `make test` (which runs no Ray test) checks its resume."""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from ortseq.runtime import Seq2SeqModel
from ortseq.runtime.batch import (
    BatchFileError,
    BlockWriter,
    Document,
    Rejected,
    Result,
    length_grouped,
    make_plan,
    read_inputs,
    recover_output,
    write_errors,
)
from ortseq.runtime.cli import main
from ortseq.runtime.ray_batch import BatchJob, Summarizer, run_batch


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_inputs_that_cannot_be_summarized_are_refused_with_their_line_and_reason(tmp_path):
    corpus = write_lines(
        tmp_path / "docs.jsonl",
        [
            {"id": "a", "text": "The council met."},
            "{not json",
            {"text": "no id"},
            {"id": "b"},
            {"id": "c", "text": "   "},
            {"id": "a", "text": "A second a."},
            {"id": 7, "text": 12},
            ["a", "list"],
            {"id": 1.5, "text": "float id"},
            {"id": 8, "body": "Another field name.", "key": 8},
        ],
    )
    plan = make_plan(read_inputs(corpus, "text", "id"), done=set())
    assert [(d.line, d.id) for d in plan.pending] == [(1, "a")]
    reasons = {item.line: (item.id, item.reason) for item in plan.rejected}
    assert reasons[2][1].startswith("not valid JSON")
    assert reasons[3] == (None, "no 'id' field")
    assert reasons[4] == ("b", "no 'text' field")
    assert reasons[5] == ("c", "empty text: there is nothing to summarize")
    assert reasons[6] == ("a", "duplicate id (first on line 1)")
    assert reasons[7] == (7, "the 'text' field must be a string, got int")
    assert reasons[8] == (None, "not a JSON object (a list)")
    assert "must be a string or an integer" in reasons[9][1]
    assert reasons[10] == (8, "no 'text' field")
    renamed = make_plan(read_inputs(corpus, "body", "key"), done=set())
    assert [(d.line, d.id, d.text) for d in renamed.pending] == [(10, 8, "Another field name.")]


def test_ids_done_by_an_earlier_run_are_skipped_and_still_count_for_duplicates(tmp_path):
    corpus = write_lines(
        tmp_path / "docs.jsonl", [{"id": i, "text": f"Text {i}."} for i in range(5)] + [{"id": 1, "text": "again"}]
    )
    plan = make_plan(read_inputs(corpus, "text", "id"), done={1, 3})
    assert [d.id for d in plan.pending] == [0, 2, 4]
    assert plan.already_done == 2
    assert [(r.line, r.id) for r in plan.rejected] == [(6, 1)]


def test_parquet_input_reads_like_json_lines(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["x", "y", "x"], "text": ["First.", "", "Third."]}), tmp_path / "docs.parquet")
    plan = make_plan(read_inputs(tmp_path / "docs.parquet", "text", "id"), done=set())
    assert [(d.line, d.id, d.text) for d in plan.pending] == [(1, "x", "First.")]
    assert [(r.line, r.id) for r in plan.rejected] == [(2, "y"), (3, "x")]


def test_a_partial_last_line_left_by_a_killed_run_is_dropped_on_resume(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": "a", "summary": "s"}\n{"id": 2, "summary": "t"}\n{"id": "c", "summ')
    assert recover_output(output) == {"a", 2}
    assert output.read_text() == '{"id": "a", "summary": "s"}\n{"id": 2, "summary": "t"}\n'
    assert recover_output(tmp_path / "missing.jsonl") == set()


def test_a_foreign_output_file_is_refused_not_overwritten(tmp_path):
    output = write_lines(tmp_path / "out.jsonl", ['{"id": 1, "summary": "s"}', "not ours"])
    with pytest.raises(BatchFileError, match="line 2 is not an ortseq batch result"):
        recover_output(output)
    assert output.read_text() == '{"id": 1, "summary": "s"}\nnot ours\n'


def test_blocks_are_whole_lines_and_no_id_is_written_twice(tmp_path):
    output = tmp_path / "out.jsonl"
    writer = BlockWriter(output, written={"done"})
    assert writer.write([Result("a", "first", 3, 2), Result("done", "again", 1, 1)]) == 1
    assert writer.write([Result("a", "retried batch", 3, 2), Result(5, "ünïcode\nline", 4, 3)]) == 1
    writer.close()
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert records == [
        {"id": "a", "summary": "first", "input_tokens": 3, "output_tokens": 2},
        {"id": 5, "summary": "ünïcode\nline", "input_tokens": 4, "output_tokens": 3},
    ]


def test_errors_file_lists_refusals_in_input_order(tmp_path):
    errors = tmp_path / "errors.jsonl"
    write_errors(errors, [Rejected(9, "empty text", "z"), Rejected(2, "not valid JSON")])
    assert [json.loads(line) for line in errors.read_text().splitlines()] == [
        {"line": 2, "id": None, "reason": "not valid JSON"},
        {"line": 9, "id": "z", "reason": "empty text"},
    ]
    assert not (tmp_path / "errors.jsonl.tmp").exists()


def test_length_grouping_keeps_every_document_and_sorts_within_windows():
    documents = [Document(i, i, "x" * length) for i, length in enumerate([5, 1, 9, 3, 8, 2, 7])]
    grouped = length_grouped(documents, window=3)
    assert sorted(d.id for d in grouped) == list(range(7))
    assert [len(d.text) for d in grouped] == [1, 5, 9, 2, 3, 8, 7]


def test_batch_without_ray_is_a_one_line_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    corpus = write_lines(tmp_path / "docs.jsonl", [{"id": 1, "text": "The council met."}])
    code = main(["batch", str(tmp_path), "--input", str(corpus), "--output", str(tmp_path / "out.jsonl")])
    assert code == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "pip install 'ortseq[ray]'" in message
    assert not (tmp_path / "out.jsonl").exists()


@contextmanager
def in_process_blocks(job: BatchJob, documents: list[Document]):
    """What the Ray pipeline delivers, from one Summarizer in this process: the batches in order, the
    first one twice (as when Ray retries the batch of a worker it lost after that batch was delivered)."""
    summarizer = Summarizer(str(job.export_dir), job.provider, job.threads, job.engine, job.generate_kwargs)

    def blocks():
        for start in range(0, len(documents), job.batch_size):
            batch = documents[start : start + job.batch_size]
            block = summarizer({"key": np.arange(start, start + len(batch)), "text": np.array([d.text for d in batch])})
            yield from [block, block] if start == 0 else [block]

    yield blocks()


def test_a_rerun_resumes_after_a_killed_run_and_writes_every_id_once(exported, tmp_path):
    """run_batch's bookkeeping without Ray: the ids a killed run wrote are kept and skipped, its partial
    last line is dropped, a retried batch and a repeated input id are written once, and a second run
    has nothing left to do."""
    export_dir = exported("base").export_dir
    texts = {f"doc-{i}": f"The council met on day {i} to discuss the river bridge and the museum." for i in range(7)}
    corpus = write_lines(tmp_path / "docs.jsonl", [{"id": k, "text": v} for k, v in texts.items()])
    with corpus.open("a") as extra:
        extra.write(json.dumps({"id": "doc-2", "text": "A second doc-2."}) + "\n")
    output = tmp_path / "out.jsonl"
    output.write_text(
        '{"id": "doc-1", "summary": "earlier", "input_tokens": 1, "output_tokens": 1}\n{"id": "doc-4", "su'
    )
    settings = {"max_new_tokens": 8, "min_new_tokens": 2}
    job = BatchJob(export_dir, corpus, output, tmp_path / "errors.jsonl", batch_size=2, generate_kwargs=settings)

    report = run_batch(job, summarize=in_process_blocks)
    assert (report.summarized, report.already_done, report.rejected) == (6, 1, 1)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(record["id"] for record in records) == sorted(texts)  # each id once, doc-4 included
    expected = dict(zip(texts, Seq2SeqModel.load(export_dir).summarize(list(texts.values()), **settings)))
    assert {r["id"]: r["summary"] for r in records} == expected | {"doc-1": "earlier"}
    assert [json.loads(line)["line"] for line in job.errors.read_text().splitlines()] == [8]  # the second doc-2

    written = output.read_text()
    again = run_batch(job, summarize=in_process_blocks)
    assert (again.summarized, again.already_done) == (0, 7) and output.read_text() == written


def batch_job(tmp_path: Path, corpus: Path, output: Path, **fields):
    from ortseq.runtime.ray_batch import BatchJob

    # the export does not exist: these refusals come before it is opened (and before Ray starts)
    return BatchJob(tmp_path / "no-export", corpus, output, tmp_path / "errors.jsonl", **fields)


def test_a_job_whose_output_is_its_input_is_refused_before_anything_is_written(tmp_path):
    from ortseq.runtime.ray_batch import run_batch

    corpus = write_lines(tmp_path / "docs.jsonl", [{"id": 1, "text": "The council met."}])
    with pytest.raises(BatchFileError, match="--input and --output are the same file"):
        run_batch(batch_job(tmp_path, corpus, tmp_path / "." / "docs.jsonl"))
    with pytest.raises(BatchFileError, match="--output and --errors are the same file"):
        run_batch(batch_job(tmp_path, corpus, tmp_path / "errors.jsonl"))
    # an input file as --output (read for ids already done) is not a results file either
    other = write_lines(tmp_path / "other.jsonl", [{"id": 1, "text": "Another text."}])
    with pytest.raises(BatchFileError, match="line 1 is not an ortseq batch result"):
        run_batch(batch_job(tmp_path, corpus, other))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["docs.jsonl", "other.jsonl"]


@pytest.mark.parametrize(
    "lines, fields, says",
    [
        (["The council met on Monday.", "Police closed the library."], {}, "line 1: not valid JSON"),
        ([{"id": 1, "article": "The council met."}], {}, "line 1: no 'text' field"),
        ([], {}, "is empty"),
    ],
    ids=["plain_text", "wrong_text_field", "empty"],
)
def test_an_input_without_a_single_document_is_refused_not_run(tmp_path, lines, fields, says):
    from ortseq.runtime.ray_batch import run_batch

    corpus = write_lines(tmp_path / "docs.txt", lines)
    with pytest.raises(BatchFileError, match=re.escape(says)):
        run_batch(batch_job(tmp_path, corpus, tmp_path / "out.jsonl", **fields))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["docs.txt"]
