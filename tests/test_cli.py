"""The ortseq command line, as a user runs it."""

from __future__ import annotations

import time

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
