"""The checkpoint FILES users download: weight file layouts, stored dtypes, tensors generation never reads.

Each case exports a checkpoint of tests/fixtures/legacy (written by transformers 4.x, with 4.x's own
generate() goldens) in another file layout or stored dtype, and checks the export generates 4.x's tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ortseq.exporter.pipeline import export
from ortseq.runtime.model import Seq2SeqModel

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
TOKEN_CASES = ("greedy", "beams4")


def assert_generates_goldens(export_dir: Path, goldens: dict, cases=TOKEN_CASES) -> None:
    """The export's tokens equal the goldens' for each named case; each case discriminates (rows of
    several lengths, not all equal)."""
    model = Seq2SeqModel.load(export_dir)
    ids, mask = np.array(goldens["input_ids"]), np.array(goldens["attention_mask"])
    for case in (case for case in goldens["cases"] if case["name"] in cases):
        expected = np.array(case["sequences"])
        assert len({tuple(row) for row in expected.tolist()}) > 1, case["name"]
        got = model.generate(ids, mask, **case["kwargs"])
        assert got.shape == expected.shape and np.array_equal(got, expected), case["name"]


def copy_without_weights(fixture: str, folder: Path) -> Path:
    shutil.copytree(LEGACY / fixture, folder, ignore=shutil.ignore_patterns("*.safetensors", "goldens.json"))
    return folder


def test_pytorch_model_bin_exports_in_zip_and_legacy_serialization(tmp_path):
    """pytorch_model.bin, as torch.save writes it for transformers' save_pretrained(safe_serialization=False):
    the zip format, and the legacy (pre-1.6) format of many 2020-era checkpoints, which cannot be mmapped."""
    goldens = json.loads((LEGACY / "pegasus_tied" / "goldens.json").read_text())
    weights = load_file(LEGACY / "pegasus_tied" / "model.safetensors")
    for zip_format in (True, False):
        folder = copy_without_weights("pegasus_tied", tmp_path / f"zip{zip_format}")
        torch.save(weights, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
        export(str(folder), tmp_path / f"export-zip{zip_format}")
        assert_generates_goldens(tmp_path / f"export-zip{zip_format}", goldens)
