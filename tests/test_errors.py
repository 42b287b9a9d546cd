"""Every bad input ends in one line on stderr and exit 2 (CLI), a ValueError subclass (API), a 4xx JSON (HTTP);
nothing outside the export is read, and nothing ortseq did not write is deleted or overwritten.

One table drives the CLI cases: each builds its inputs from a fresh copy of one tiny export (made once per
session by conftest's `exported`), runs `python -m ortseq.runtime.cli`, and checks the exit code, that
stderr is exactly one line saying the expected thing, and that what must stay untouched did.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ortseq.graphs.directories import OutputDirError
from ortseq.runtime import ManifestError, Seq2SeqModel
from ortseq.runtime.bundle import make_bundle

ROOT = Path(__file__).resolve().parent.parent
# As a user's shell runs it: stdout to a pipe is block-buffered unless ortseq flushes (no PYTHONUNBUFFERED)
ENV = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
TEXT = "The council said the bridge will open next year."


def ortseq(*args: str, cwd: Path, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ortseq.runtime.cli", *args],
        input=stdin or b"", capture_output=True, cwd=cwd, timeout=timeout, env=ENV,
    )  # fmt: skip


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_manifest(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """A corruption: change(manifest dict) edits it in place."""

    def corrupt(export: Path) -> None:
        raw = json.loads((export / "manifest.json").read_text())
        change(raw)
        (export / "manifest.json").write_text(json.dumps(raw))

    return corrupt


def manifest_in_a_list(export: Path) -> None:
    (export / "manifest.json").write_text(f"[{(export / 'manifest.json').read_text()}]")


def replace_file(name: str, content: bytes) -> Callable[[Path], None]:
    """A corruption that manifest.json does not catch by hash: new content, and its sha256 recorded."""

    def corrupt(export: Path) -> None:
        (export / name).write_bytes(content)
        edit_manifest(lambda raw: raw["files"].__setitem__(name, hashlib.sha256(content).hexdigest()))(export)

    return corrupt


def graph_with_unlisted_external_data(export: Path) -> None:
    """encoder.onnx keeps its weights in weights.bin, a file manifest.json does not list."""
    import onnx

    model = onnx.load(str(export / "encoder.onnx"))
    onnx.save(model, str(export / "encoder.onnx"), save_as_external_data=True, location="weights.bin")
    edit_manifest(lambda raw: raw["files"].__setitem__("encoder.onnx", sha(export / "encoder.onnx")))(export)


def point_tokenizer_outside(export: Path) -> None:
    """tokenizer.file names a (valid, hashed) tokenizer outside the export directory."""
    outside = export.parent / "elsewhere"
    outside.mkdir()
    shutil.copy(export / "tokenizer.json", outside / "tok.json")
    edit_manifest(lambda raw: raw["tokenizer"].update(file="../elsewhere/tok.json"))(export)
    edit_manifest(lambda raw: raw["files"].update({"../elsewhere/tok.json": sha(outside / "tok.json")}))(export)


def a_plain_directory(path: Path) -> Callable[[Path], None]:
    def make(_: Path) -> None:
        path.mkdir(exist_ok=True)
        (path / "notes.txt").write_text("mine")

    return make


def an_export_at(path: Path) -> Callable[[Path], None]:
    return lambda export: shutil.copytree(export, path)


def a_bundle_at(path: Path) -> Callable[[Path], None]:
    return lambda export: make_bundle(export, path)


def with_a_user_file(writer: Callable[[Path], Callable[[Path], None]], directory: str, name: str):
    """An ortseq directory (writer(export.parent / directory)) into which the user then put `name`."""

    def corrupt(export: Path) -> None:
        writer(export.parent / directory)(export)
        (export.parent / directory / name).parent.mkdir(parents=True, exist_ok=True)
        (export.parent / directory / name).write_text("mine")

    return corrupt


@dataclass
class Case:
    """args may name {export} (a fresh copy of the tiny export) and {tmp} (the case's own directory)."""

    name: str
    args: tuple[str, ...]
    says: str
    corrupt: Callable[[Path], None] | None = None
    stdin: bytes | None = None
    api: bool = False  # also: Seq2SeqModel.load(export) raises ManifestError saying the same
    api_at_first_text: bool = False  # ... not at load but at the first call with text (the tokenizer file)
    cwd: str = "{tmp}"
    untouched: list[str] = field(default_factory=list)  # paths under {tmp} that must keep their content


def generate(*flags: str) -> tuple[str, ...]:
    return ("generate", "{export}", TEXT, *flags)


CASES = [
    # manifest.json and the files it names
    Case("manifest_is_a_list", generate(), "not an object", manifest_in_a_list, api=True),
    Case("manifest_nested_too_deep", generate(), "nested too deeply",
         lambda export: (export / "manifest.json").write_text("[" * 100_000 + "]" * 100_000), api=True),
    Case("vocab_size_a_string", generate(), "dims.vocab_size",
         edit_manifest(lambda raw: raw["dims"].update(vocab_size="lots")), api=True),
    Case("decoder_layers_negative", generate(), "dims.decoder_layers",
         edit_manifest(lambda raw: raw["dims"].update(decoder_layers=-2)), api=True),
    Case("d_model_negative", generate(), "dims.d_model",
         edit_manifest(lambda raw: raw["dims"].update(d_model=-64)), api=True),
    Case("family_unknown", generate(), "family must be one of",
         edit_manifest(lambda raw: raw.update(family="t5")), api=True),
    Case("special_token_outside_vocab", generate(), "special_tokens.eos_token_id",
         edit_manifest(lambda raw: raw["special_tokens"].update(eos_token_id=10**6)), api=True),
    Case("early_stopping_unknown", generate(), "early_stopping must be true, false or 'never'",
         edit_manifest(lambda raw: raw["generation"].update(early_stopping="sometimes")), api=True),
    Case("engine_unknown", generate(), "engines[]", edit_manifest(lambda raw: raw.update(engines=["warp"])), api=True),
    Case("tokenizer_file_outside", generate(), "not a plain file name", point_tokenizer_outside, api=True),
    Case("listed_file_absolute", generate(), "not a plain file name",
         edit_manifest(lambda raw: raw["files"].update({"/etc/hostname": "0" * 64})), api=True),
    Case("tokenizer_not_hashed", generate(), "does not list",
         edit_manifest(lambda raw: raw["files"].pop("tokenizer.json")), api=True),
    Case("tokenizer_nested_too_deep", generate(), "tokenizer.json is not a tokenizer file",
         replace_file("tokenizer.json", b"[" * 100_000 + b"]" * 100_000), api=True, api_at_first_text=True),
    Case("tokenizer_malformed", generate(), "tokenizer.json is not a tokenizer file",
         replace_file("tokenizer.json", b'{"model": 3'), api=True, api_at_first_text=True),
    Case("graph_not_onnx", generate(), "encoder.onnx is not a readable ONNX graph",
         replace_file("encoder.onnx", b"\xff" * 64), api=True),
    Case("graph_names_unlisted_data", generate(), "weights.bin", graph_with_unlisted_external_data, api=True),
    # generate's inputs and flags
    Case("threads_negative", generate("--threads", "-3"), "--threads"),
    Case("batch_size_zero", generate("--batch-size", "0"), "--batch-size"),
    Case("stdin_not_utf8", ("generate", "{export}"), "stdin line 2 is not UTF-8", stdin=b"fine\n\xff\xfe\n"),
    Case("input_file_missing", ("generate", "{export}", "--input", "missing.txt"), "missing.txt"),
    Case("file_name_as_text", ("generate", "{export}", "docs.txt"), "did you mean --input docs.txt?",
         corrupt=lambda export: (export.parent / "docs.txt").write_text(TEXT)),
    Case("blank_text_argument", generate("  "), "text argument 2 is empty"),
    # a Latin-1 shell's argument: Python hands it over surrogate-escaped
    Case("text_argument_not_utf8", ("generate", "{export}", TEXT, os.fsdecode(b"caf\xe9 au lait")),
         "text argument 2 is not UTF-8 text (character 4"),
    # quantize and serve flags (refused before any import of onnx or fastapi work)
    Case("min_agreement_above_1", ("quantize", "{export}", "--to", "int8", "--out", "q", "--min-agreement", "1.5"),
         "--min-agreement"),
    Case("min_agreement_negative", ("quantize", "{export}", "--to", "int8", "--out", "q", "--min-agreement", "-1"),
         "--min-agreement"),
    Case("block_size_zero", ("quantize", "{export}", "--to", "int4", "--out", "q", "--block-size", "0"),
         "--block-size"),
    Case("block_size_not_power_of_two", ("quantize", "{export}", "--to", "int4", "--out", "q", "--block-size", "48"),
         "power of two"),
    Case("quality_texts_missing", ("quantize", "{export}", "--to", "int8", "--out", "q", "--texts", "missing.txt"),
         "missing.txt is not a file"),
    Case("port_out_of_range", ("serve", "{export}", "--port", "99999"), "--port"),
    Case("serve_with_a_malformed_tokenizer", ("serve", "{export}", "--host", "127.0.0.1", "--port", "18779"),
         "tokenizer.json is not a tokenizer file", replace_file("tokenizer.json", b'{"model": 3')),
    Case("replicas_with_a_uvicorn_flag", ("serve", "{export}", "--replicas", "2", "--max-connections", "5"),
         "--max-connections does not apply with --replicas"),
    Case("replicas_with_inputs_over_the_batch", ("serve", "{export}", "--replicas", "2", "--max-inputs", "64"),
         "max_inputs (64) must not exceed max_batch_size (16)"),
    Case("address_without_replicas", ("serve", "{export}", "--address", "127.0.0.1:6379"),
         "--address goes with --replicas"),
    # --out: never replace what ortseq did not write, never overlap the source
    Case("bundle_over_a_user_directory", ("bundle", "{export}", "--out", "mine"), "not an ortseq export or bundle",
         corrupt=lambda export: a_plain_directory(export.parent / "mine")(export), untouched=["mine/notes.txt"]),
    Case("bundle_into_the_current_directory", ("bundle", "../export", "--out", "."), "not an ortseq export or bundle",
         corrupt=lambda export: a_plain_directory(export.parent / "sub")(export), cwd="{tmp}/sub",
         untouched=["sub/notes.txt"]),
    Case("bundle_into_its_export", ("bundle", "{export}", "--out", "{export}"), "overlaps the source",
         untouched=["export/manifest.json"]),
    Case("bundle_inside_its_export", ("bundle", "{export}", "--out", "{export}/b"), "overlaps the source"),
    Case("bundle_over_a_bundle_without_force", ("bundle", "{export}", "--out", "old"), "pass --force",
         corrupt=lambda export: make_bundle(export, export.parent / "old"), untouched=["old/model/manifest.json"]),
    Case("quantize_over_its_source", ("quantize", "{export}", "--to", "int8", "--out", "{export}"),
         "overlaps the source", untouched=["export/encoder.onnx"]),
    Case("export_over_a_user_directory", ("export", "tiny-pegasus", "--out", "mine"), "not an ortseq export",
         corrupt=lambda export: a_plain_directory(export.parent / "mine")(export), untouched=["mine/notes.txt"]),
    Case("export_over_an_export_without_force", ("export", "tiny-pegasus", "--out", "other"), "pass --force",
         corrupt=lambda export: an_export_at(export.parent / "other")(export), untouched=["other/encoder.onnx"]),
    Case("export_alias_typo", ("export", "tiny-pegasuss", "--out", "x"), "did you mean 'tiny-pegasus'?"),
    # --force replaces an export's or a bundle's own files only
    Case("quantize_force_over_an_export_holding_a_user_file",
         ("quantize", "{export}", "--to", "int8", "--out", "other", "--force"), "other/notes.txt",
         corrupt=with_a_user_file(an_export_at, "other", "notes.txt"),
         untouched=["other/notes.txt", "other/encoder.onnx"]),
    Case("export_force_over_an_export_holding_a_user_directory",
         ("export", "tiny-pegasus", "--out", "other", "--force"), "other/mine",
         corrupt=with_a_user_file(an_export_at, "other", "mine/notes.txt"), untouched=["other/mine/notes.txt"]),
    Case("bundle_force_over_a_bundle_holding_its_venv", ("bundle", "{export}", "--out", "old", "--force"),
         "old/venv", corrupt=with_a_user_file(a_bundle_at, "old", "venv/pyvenv.cfg"),
         untouched=["old/venv/pyvenv.cfg", "old/model/manifest.json"]),
    Case("bundle_force_over_a_bundle_with_a_user_file_in_its_model", ("bundle", "{export}", "--out", "old", "--force"),
         "old/model/notes.txt", corrupt=with_a_user_file(a_bundle_at, "old", "model/notes.txt"),
         untouched=["old/model/notes.txt"]),
]  # fmt: skip


def prepare(case: Case, source: Path, tmp_path: Path) -> tuple[list[str], Path, dict[str, str]]:
    export = tmp_path / "export"
    shutil.copytree(source, export)
    if case.corrupt:
        case.corrupt(export)
    untouched = {name: sha(tmp_path / name) for name in case.untouched}
    args = [arg.format(export=export, tmp=tmp_path) for arg in case.args]
    return args, Path(case.cwd.format(tmp=tmp_path)), untouched


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_one_line_exit_2_and_touches_nothing(case, exported, tmp_path):
    args, cwd, untouched = prepare(case, exported("base").export_dir, tmp_path)
    result = ortseq(*args, cwd=cwd, stdin=case.stdin)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert case.says in stderr and "Traceback" not in stderr, stderr
    assert {name: sha(tmp_path / name) for name in untouched} == untouched
    if case.api:
        if case.api_at_first_text:
            model = Seq2SeqModel.load(tmp_path / "export")
            with pytest.raises(ManifestError, match=re.escape(case.says)):
                model.summarize([TEXT], max_new_tokens=2)
        else:
            with pytest.raises(ManifestError, match=re.escape(case.says)):
                Seq2SeqModel.load(tmp_path / "export")


def test_bundle_api_refuses_a_user_directory_and_replaces_a_bundle_only_with_force(exported, tmp_path):
    export = exported("base").export_dir
    a_plain_directory(tmp_path / "mine")(export)
    with pytest.raises(OutputDirError, match="not an ortseq export or bundle"):
        make_bundle(export, tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    make_bundle(export, tmp_path / "bundle")
    with pytest.raises(OutputDirError, match="--force"):
        make_bundle(export, tmp_path / "bundle")
    (tmp_path / "bundle" / "README.md").write_text("old")
    make_bundle(export, tmp_path / "bundle", force=True)
    assert (tmp_path / "bundle" / "README.md").read_text() != "old"
    (tmp_path / "empty").mkdir()
    inode = (tmp_path / "empty").stat().st_ino  # filled in place: a shell sitting in it keeps working
    assert make_bundle(export, tmp_path / "empty") == tmp_path / "empty"
    assert (tmp_path / "empty").stat().st_ino == inode and (tmp_path / "empty" / "summarize").is_file()


def test_an_export_of_symlinks_into_a_blob_store_loads_and_bundles(exported, tmp_path):
    """Hugging Face cache snapshots hold symlinks into a blob folder: those are the export's own files."""
    source = exported("base").export_dir
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for path in source.iterdir():
        shutil.copy(path, blobs / sha(path))
        (snapshot / path.name).symlink_to(blobs / sha(path))
    model = Seq2SeqModel.load(snapshot)
    assert model.summarize([TEXT], max_new_tokens=4) == Seq2SeqModel.load(source).summarize([TEXT], max_new_tokens=4)
    bundle = make_bundle(snapshot, tmp_path / "bundle")
    assert not (bundle / "model" / "encoder.onnx").is_symlink()


def test_a_blank_stdin_line_gets_an_empty_output_line_and_a_warning_with_its_number(exported, tmp_path):
    result = ortseq("generate", str(exported("base").export_dir), "--max-new-tokens", "4",
                    cwd=tmp_path, stdin=f"{TEXT}\n\n{TEXT}\n".encode())  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().split("\n")
    assert lines[1] == "" and lines[0] and lines[0] == lines[2] and lines[3:] == [""]
    assert result.stderr.decode().strip().splitlines() == ["ortseq: line 2 is blank: its output line is empty"]


def test_each_batch_is_printed_before_the_next_input_is_read(exported, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "ortseq.runtime.cli", "generate", str(exported("base").export_dir),
         "--batch-size", "1", "--max-new-tokens", "4"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, text=True, env=ENV,
    )  # fmt: skip
    try:
        process.stdin.write(TEXT + "\n")
        process.stdin.flush()
        # stdin is still open: only a summary printed (and flushed) per batch can arrive now
        assert select.select([process.stdout], [], [], 60)[0], "no output within 60 s while input was pending"
        first = process.stdout.readline()
        assert first.strip(), process.stderr.read()
        process.stdin.write(TEXT + "\n")
        process.stdin.close()
        assert process.stdout.read() == first
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()


def test_help_shows_defaults_and_the_aliases_and_version_answers(tmp_path):
    def help_of(command: str) -> str:  # unwrapped: argparse breaks lines anywhere
        return " ".join(ortseq(command, "--help", cwd=tmp_path).stdout.decode().split())

    generate = help_of("generate")
    assert "(default: 8)" in generate and "(default: the model's generation config)" in generate
    serve = help_of("serve")
    assert "(default: 8080)" in serve and "requests waiting; more get 503 + Retry-After (default: 64)" in serve
    export = help_of("export")
    assert "tiny-pegasus" in export and "--force" in export
    version = ortseq("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.decode().startswith("ortseq ")


def test_quantize_prints_only_its_own_progress_unless_verbose(exported, tmp_path):
    """fp16 conversion is the noisiest (onnxruntime's float16 tools dump protobufs and warn)."""
    result = ortseq("quantize", str(exported("base").export_dir), "--to", "fp16", "--out", "fp16",
                    "--min-agreement", "0", cwd=tmp_path, timeout=300)  # fmt: skip
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert all(line.startswith("ortseq: ") for line in stderr.splitlines()), stderr
    assert "quantized export complete" in stderr


def test_serve_on_a_taken_port_says_so_in_one_line_without_a_ready_log(exported, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = ortseq("serve", str(exported("base").export_dir), "--port", str(taken.getsockname()[1]), cwd=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "already in use" in stderr and not re.search(r"\bready\b", stderr), stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.fixture
def server(exported, tmp_path):
    """A real `ortseq serve` on 127.0.0.1, stopped after the test."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "ortseq.runtime.cli", "serve", str(exported("base").export_dir), "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5):
                break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline and process.poll() is None, "the server did not become ready"
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=60)


def test_an_oversized_body_from_an_ordinary_client_gets_the_413_json(server):
    body = json.dumps({"inputs": ["x" * (8 << 20)]}).encode()  # more than loopback's socket buffers take
    request = urllib.request.Request(server + "/v1/summarize", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["error"]["type"] == "too_large"


def test_docs_page_is_self_contained(server):
    with urllib.request.urlopen(server + "/docs", timeout=10) as response:
        page = response.read().decode()
    assert "/v1/summarize" in page and "SummarizeRequest" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_a_line_that_is_not_utf8_comes_after_the_summaries_of_the_lines_before_it(exported, tmp_path):
    """Nothing lost: the texts read before the bad line (in the same batch) are still summarized and printed."""
    result = ortseq("generate", str(exported("base").export_dir), "--max-new-tokens", "4",
                    cwd=tmp_path, stdin=f"{TEXT}\n{TEXT}\n".encode() + b"\xff\xfe\n")  # fmt: skip
    assert result.returncode == 2
    summaries = result.stdout.decode().splitlines()
    assert len(summaries) == 2 and summaries[0] and summaries[0] == summaries[1]
    assert result.stderr.decode().strip().splitlines() == [
        "ortseq: error: stdin line 3 is not UTF-8 text (byte 0: invalid start byte); convert the file first, "
        "e.g. iconv -f latin1 -t utf-8"
    ]


def test_text_that_is_not_utf8_is_refused_in_one_line_by_the_api_and_the_bundle(exported, tmp_path):
    from ortseq.runtime import InvalidInputError

    export = exported("base").export_dir
    latin1 = os.fsdecode(b"caf\xe9 au lait")  # what Python makes of a non-UTF-8 argument or file name
    with pytest.raises(InvalidInputError, match=r"text 2 is not UTF-8 text \(character 4"):
        Seq2SeqModel.load(export).summarize([TEXT, latin1])
    bundle = make_bundle(export, tmp_path / "bundle")
    result = subprocess.run(
        [sys.executable, str(bundle / "summarize"), os.fsencode(latin1)], capture_output=True, timeout=120, env=ENV
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2 and stderr.count("\n") == 1, stderr
    assert "text argument 1 is not UTF-8 text" in stderr and "Traceback" not in stderr


def test_several_hypotheses_per_text_say_whose_they_are_and_json_gives_their_token_counts(exported, tmp_path):
    export = str(exported("base").export_dir)
    texts = [TEXT, "Police closed the old library on Sunday morning."]
    settings = ("--num-beams", "4", "--num-return-sequences", "3", "--max-new-tokens", "6")
    plain = ortseq("generate", export, *texts, *settings, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.decode().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["1.1", "1.2", "1.3", "2.1", "2.2", "2.3"]
    as_json = ortseq("generate", export, *texts, *settings, "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    records = [json.loads(line) for line in as_json.stdout.decode().splitlines()]
    model = Seq2SeqModel.load(export)
    expected = model.summaries(texts, num_beams=4, num_return_sequences=3, max_new_tokens=6)
    assert [record["input"] for record in records] == [1, 2]
    assert [s for record in records for s in record["summaries"]] == [s.text for s in expected]
    assert [line.split("\t", 1)[1] for line in lines] == [s.text for s in expected]
    assert [record["input_tokens"] for record in records] == [len(ids) for ids in model.tokenizer.token_ids(texts)]
    counts = [n for record in records for n in record["output_tokens"]]
    assert counts == [s.output_tokens for s in expected] and all(1 <= n <= 6 for n in counts)
    assert len(set(counts)) > 1 or len({s.text for s in expected[:3]}) == 3  # the hypotheses differ
    one = ortseq("generate", export, TEXT, "--max-new-tokens", "6", "--json", cwd=tmp_path)
    (record,) = [json.loads(line) for line in one.stdout.decode().splitlines()]
    assert record["summaries"] == model.summarize([TEXT], max_new_tokens=6) and len(record["output_tokens"]) == 1


def test_from_pretrained_loads_an_export_and_refuses_a_hub_id_or_a_checkpoint_with_the_command(exported, tmp_path):
    model = exported("base")
    loaded = Seq2SeqModel.from_pretrained(str(model.export_dir), threads=1)
    assert loaded.summarize([TEXT], max_new_tokens=4) == Seq2SeqModel.load(model.export_dir).summarize(
        [TEXT], max_new_tokens=4
    )
    with pytest.raises(ManifestError, match=r"google/pegasus-xsum is not a local export directory.*ortseq export"):
        Seq2SeqModel.from_pretrained("google/pegasus-xsum")
    with pytest.raises(ManifestError, match="is a transformers checkpoint, not an ortseq export"):
        Seq2SeqModel.from_pretrained(model.checkpoint)
