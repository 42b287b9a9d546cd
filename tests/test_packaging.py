"""ortseq installs under one import name, `ortseq`, and a user's own modules cannot shadow it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (path,) = out.glob("ortseq-*.whl")
    return path


def test_wheel_installs_only_the_ortseq_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"ortseq"}
    for package in ("runtime", "graphs", "exporter"):
        assert f"ortseq/{package}/__init__.py" in names
    assert "ortseq/exporter/quantization/quality_texts.txt" in names
    assert not any(name.startswith(("ortseq/tests/", "ortseq/benchmarks/", "ortseq/scripts/")) for name in names)


def test_wheel_console_script_points_into_ortseq(wheel):
    dist_info = next(name for name in zipfile.ZipFile(wheel).namelist() if name.endswith("entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(dist_info).decode()
    assert "ortseq = ortseq.runtime.cli:main" in entry_points


def test_users_own_runtime_and_graphs_modules_do_not_break_ortseq(exported, tmp_path):
    # a user's script folder holding modules named like ortseq's old top-level packages
    for name in ("runtime", "graphs", "exporter"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    (tmp_path / "script.py").write_text(
        "import sys\n"
        "from ortseq import Seq2SeqModel\n"
        "model = Seq2SeqModel.load(sys.argv[1])\n"
        "print(model.summarize(['a short text to summarize'])[0] is not None)\n"
    )
    result = subprocess.run(
        [sys.executable, "script.py", str(exported("base").export_dir)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
