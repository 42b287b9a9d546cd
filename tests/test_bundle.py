"""`ortseq bundle`: a folder that installs into a bare venv and summarizes from the command line there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ortseq.runtime import ManifestError, Seq2SeqModel
from ortseq.runtime.bundle import make_bundle

TEXTS = ["The city council said the new river bridge will open next year.", "Police closed the museum on Sunday."]


def summarize(python: str, bundle: Path, *args: str, cwd: Path, input_text: str | None = None):
    """Run the bundle's launcher isolated (-I): no PYTHONPATH, no current directory, no user site."""
    return subprocess.run(
        [python, "-I", str(bundle / "summarize"), *args],
        input=input_text, capture_output=True, text=True, cwd=cwd, timeout=300,
    )  # fmt: skip


def test_bundle_holds_the_model_runtime_and_runtime_requirements_only(exported, tmp_path):
    bundle = make_bundle(exported("base").export_dir, tmp_path / "bundle")
    assert sorted(p.name for p in bundle.iterdir()) == [
        "README.md",
        "model",
        "ortseq",
        "requirements.txt",
        "summarize",
    ]
    assert sorted(p.name for p in (bundle / "ortseq").iterdir()) == ["__init__.py", "graphs", "runtime"]
    names = [line.split("=")[0].split(">")[0] for line in (bundle / "requirements.txt").read_text().splitlines()]
    assert names == ["onnxruntime", "numpy", "tokenizers"]
    assert not (bundle / "ortseq" / "runtime" / "serving").exists() and not (bundle / "exporter").exists()
    result = summarize(sys.executable, bundle, *TEXTS, "--num-beams", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model = Seq2SeqModel.load(exported("base").export_dir)
    assert result.stdout.splitlines() == model.summarize(TEXTS, num_beams=3)


def test_bundle_of_a_corrupted_export_fails_and_leaves_nothing(exported, tmp_path):
    export_dir = tmp_path / "export"
    shutil.copytree(exported("base").export_dir, export_dir)
    with open(export_dir / "decoder.onnx", "ab") as graph:
        graph.write(b"\0")
    (tmp_path / "out").mkdir()
    with pytest.raises(ManifestError, match="decoder.onnx is corrupted"):
        make_bundle(export_dir, tmp_path / "out" / "bundle")
    assert list((tmp_path / "out").iterdir()) == []


def test_bundle_installs_into_a_fresh_venv_and_summarizes_without_torch(exported, tmp_path):
    bundle = make_bundle(exported("base").export_dir, tmp_path / "bundle")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-r", str(bundle / "requirements.txt")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    result = summarize(python, bundle, cwd=tmp_path, input_text="\n".join(TEXTS) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == Seq2SeqModel.load(exported("base").export_dir).summarize(TEXTS)
    for heavy in ("torch", "transformers", "ortseq"):
        probe = subprocess.run([python, "-I", "-c", f"import {heavy}"], capture_output=True, cwd=tmp_path)
        assert probe.returncode != 0, f"{heavy} is importable in the bundle's venv"
