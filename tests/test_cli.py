"""The ortseq command line, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from helpers import ortseq


def test_export_alias_then_generate_from_stdin(tmp_path):
    out = tmp_path / "tiny"
    result = ortseq("export", "tiny-pegasus", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "verified decoder.onnx" in result.stderr
    assert all(line.startswith("ortseq: ") for line in result.stderr.splitlines()), result.stderr  # no bars
    texts = "The council said the bridge will open.\nPolice closed the museum on Sunday.\nA third text.\n"
    result = ortseq("generate", str(out), "--num-beams", "2", "--max-new-tokens", "8", stdin=texts)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3


def test_generate_arguments_with_options_after_texts(exported):
    result = ortseq("generate", str(exported("base").export_dir), "one text", "another", "--num-beams", "3")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2


def test_bad_input_exits_non_zero_with_a_message_and_no_traceback(exported):
    export_dir = str(exported("base").export_dir)
    cases = [
        (("generate", export_dir, "text", "--num-beams", "-1"), "num_beams"),
        (("generate", export_dir, "text", "--max-new-tokens", "2", "--min-new-tokens", "4"), "min_new_tokens"),
        (("generate", export_dir, "   "), "empty"),
        (("generate", "/nonexistent/export", "text"), "does not exist"),
        (("export", "/nonexistent/checkpoint", "--out", "/tmp/x"), "not a directory"),
    ]
    for args, message in cases:
        result = ortseq(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


def test_hub_export_offline_fails_fast_and_leaves_nothing(tmp_path):
    start = time.monotonic()
    result = ortseq("export", "pegasus-xsum", "--out", str(tmp_path / "xsum"), env={"HF_HOME": str(tmp_path / "hf")})
    assert time.monotonic() - start < 60
    assert result.returncode == 2
    assert "unreachable" in result.stderr and "ortseq export DIR" in result.stderr
    assert not (tmp_path / "xsum").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf"] == []


# Runs `ortseq ARGS` in a fresh interpreter and reports which heavy libraries it imported before answering.
IMPORT_PROBE = """
import json, sys
from ortseq.runtime.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(name for name in ("torch", "transformers", "onnx") if name in sys.modules)
sys.stderr.write("PROBE " + json.dumps({"code": code, "imported": heavy}) + "\\n")
"""


@pytest.mark.parametrize(
    "args, code, says",
    [
        (("export", "--help"), 0, "tiny-pegasus-trained"),
        (("export", "tiny-pegasuss", "--out", "x"), 2, "did you mean 'tiny-pegasus'?"),
        (("export", "bart-larg-cnn", "--out", "x"), 2, "did you mean 'bart-large-cnn'?"),
        (("quantize", "--help"), 0, "--min-agreement"),
        (("generate", "--help"), 0, "--num-return-sequences"),
    ],
    ids=["export_help", "alias_typo", "another_family_typo", "quantize_help", "generate_help"],
)
def test_help_and_alias_typos_answer_before_torch_is_imported(tmp_path, args, code, says):
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, *args], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    elapsed = time.monotonic() - start
    probe = json.loads(result.stderr.rsplit("PROBE ", 1)[1])
    assert probe == {"code": code, "imported": []}, result.stderr
    assert says in " ".join((result.stdout + result.stderr).split())
    assert elapsed < 5, f"{args} took {elapsed:.1f} s"  # generous on a loaded machine: torch alone takes longer


def test_the_aliases_read_from_the_family_modules_are_the_families_aliases():
    from ortseq.exporter import families
    from ortseq.exporter.aliases import declared_aliases

    assert declared_aliases() == families.aliases() and "tiny-pegasus" in declared_aliases()
