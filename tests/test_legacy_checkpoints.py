"""Checkpoints written by transformers 4.x (tests/fixtures/legacy, `make legacy-golden`): ortseq's export
generates exactly what 4.x's own generate() returned, and never exports a tensor the files do not hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.torch import load_file, save_file

from ortseq.exporter.checkpoint_check import CheckpointMismatchError
from ortseq.exporter.pipeline import export
from ortseq.exporter.tokenizer_files import MissingTokenizerError
from ortseq.runtime.model import Seq2SeqModel

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"
NAMES = sorted(path.name for path in FIXTURES.iterdir() if (path / "goldens.json").is_file())


def _goldens(name: str) -> dict:
    return json.loads((FIXTURES / name / "goldens.json").read_text())


def _cases() -> list[tuple[str, str]]:
    return [(name, case["name"]) for name in NAMES for case in _goldens(name)["cases"]]


@pytest.fixture(scope="session")
def legacy_exports(tmp_path_factory) -> dict[str, Path]:
    """Each fixture exported once per session."""
    root = tmp_path_factory.mktemp("legacy")
    for name in NAMES:
        export(str(FIXTURES / name), root / name)
    return {name: root / name for name in NAMES}


def _eos_end(row: list[int], eos: int) -> int:
    return row.index(eos, 1) + 1 if eos in row[1:] else len(row)


@pytest.mark.parametrize(("name", "case_name"), _cases())
def test_export_of_a_transformers_4x_checkpoint_generates_4x_tokens(legacy_exports, name, case_name):
    goldens = _goldens(name)
    case = next(case for case in goldens["cases"] if case["name"] == case_name)
    model = Seq2SeqModel.load(legacy_exports[name])
    expected = case["sequences"]
    eos = model.manifest.special_tokens.eos_token_id
    ids, mask = np.array(goldens["input_ids"]), np.array(goldens["attention_mask"])
    # the golden is not degenerate: input rows of varied lengths, several tokens in every output row,
    # not every row the same
    assert len(set(mask.sum(axis=1).tolist())) == len(mask)
    assert min(_eos_end(row, eos) for row in expected) >= 4 and len({tuple(row) for row in expected}) > 1
    if _fills_beams_with_pad(goldens, name, case):
        expected = _filled_as_5x(expected, eos, model.manifest.special_tokens.pad_token_id)
    assert np.array_equal(model.generate(ids, mask, **case["kwargs"]), np.array(expected))


def _fills_beams_with_pad(goldens: dict, name: str, case: dict) -> bool:
    """A genuine difference, after the tokens: transformers before 4.50 (BeamSearchScorer.finalize) fills a
    beam output's row after its EOS with pad_token_id; 4.57's and 5.x's _beam_search with `pad_token_id or
    eos_token_id` (EOS when pad is 0). Greedy fills with pad in every version."""
    major, minor = (int(part) for part in goldens["writer"]["transformers"].split(".")[:2])
    defaults = _generation_defaults(name)
    return (major, minor) < (4, 50) and case["kwargs"].get("num_beams", defaults.get("num_beams", 1)) > 1


def _generation_defaults(name: str) -> dict:
    """The checkpoint's generation fields: generation_config.json, or config.json where there is none
    (checkpoints written before transformers 4.26 keep them there)."""
    folder = FIXTURES / name
    path = folder / "generation_config.json"
    return json.loads((path if path.is_file() else folder / "config.json").read_text())


def _filled_as_5x(rows: list[list[int]], eos: int, pad: int) -> list[list[int]]:
    """The rows with 5.x's filler after each row's EOS, which must be 4.x's pad there: the tokens themselves
    (up to and including EOS) are compared exactly."""
    filled = []
    for row in rows:
        end = _eos_end(row, eos)
        assert all(token == pad for token in row[end:]), row
        filled.append(row[:end] + [pad or eos] * (len(row) - end))
    return filled


def test_untied_checkpoint_exports_the_stored_embedding_not_a_random_one(legacy_exports):
    """transformers 5.x leaves both embed_tokens of an untied 4.x Pegasus random; the export holds the file's."""
    stored = load_file(FIXTURES / "pegasus_untied" / "model.safetensors")["model.shared.weight"].numpy()
    for graph in ("encoder.onnx", "decoder.onnx"):
        model = onnx.load(str(legacy_exports["pegasus_untied"] / graph))
        initializers = {init.name: init for init in model.graph.initializer}
        # the token lookup's table (the untied LM head, a table of the same shape, is another tensor)
        looked_up = [node.input[0] for node in model.graph.node if node.op_type == "Gather"]
        tables = [onnx.numpy_helper.to_array(initializers[name]) for name in looked_up if name in initializers]
        tables = [table for table in tables if table.shape == stored.shape]
        assert tables and all(np.array_equal(table, stored) for table in tables), graph


def test_tie_encoder_decoder_checkpoint_exports_the_stored_weights_on_both_sides(legacy_exports):
    """4.57 stores tie_encoder_decoder's shared weights once, under the decoder's names; transformers 5.x
    leaves the encoder random. The export's encoder holds the stored word embeddings."""
    stored = load_file(FIXTURES / "roberta2roberta_tied" / "model.safetensors")
    table = stored["decoder.roberta.embeddings.word_embeddings.weight"].numpy()
    assert "encoder.embeddings.word_embeddings.weight" not in stored
    model = onnx.load(str(legacy_exports["roberta2roberta_tied"] / "encoder.onnx"))
    tables = [onnx.numpy_helper.to_array(init) for init in model.graph.initializer]
    assert any(t.shape == table.shape and np.array_equal(t, table) for t in tables)


def test_fixtures_have_a_case_for_every_generation_field_that_changes_their_tokens():
    """A field without a case is one the maker found to change nothing on that fixture (listed)."""
    for name in NAMES:
        goldens = _goldens(name)
        cases = {case["name"] for case in goldens["cases"]}
        assert {"greedy", "beams4", "defaults_max_length_unset"} <= cases, name
        assert len(cases) + len(goldens.get("fields_without_effect", [])) == 11, name


def _copy_with(tmp_path: Path, change) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(FIXTURES / "pegasus_untied", folder)
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_export_refuses_a_checkpoint_missing_a_tensor_by_name(tmp_path):
    name = "model.encoder.layers.0.fc1.weight"
    folder = _copy_with(tmp_path, lambda weights: weights.pop(name))
    with pytest.raises(CheckpointMismatchError, match=rf"not in the checkpoint: {name}"):
        export(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_tensor_stored_with_another_shape(tmp_path):
    name = "model.decoder.layers.1.fc2.bias"

    def shrink(weights):
        weights[name] = weights[name][:-1].clone()

    folder = _copy_with(tmp_path, shrink)
    # transformers itself may refuse first; either way the message names the tensor, on one line
    with pytest.raises(ValueError, match=name) as refusal:
        export(str(folder), tmp_path / "out")
    assert "\n" not in str(refusal.value)


def test_export_refuses_a_checkpoint_without_tokenizer_files_by_name(tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(FIXTURES / "pegasus_tied", folder)
    for name in ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    with pytest.raises(MissingTokenizerError, match="no tokenizer files.*spiece.model") as refusal:
        export(str(folder), tmp_path / "out")
    assert "\n" not in str(refusal.value)


def test_cli_refuses_a_checkpoint_without_tokenizer_files_with_exit_2(tmp_path):
    from ortseq.runtime.cli import main

    folder = tmp_path / "checkpoint"
    shutil.copytree(FIXTURES / "pegasus_tied", folder)
    for name in ("tokenizer.json", "spiece.model"):
        (folder / name).unlink()
    assert main(["export", str(folder), "--out", str(tmp_path / "out")]) == 2


def test_the_reference_transformers_model_gets_the_stored_tensors_too(tmp_path, monkeypatch):
    """transformers 5.x loads the untied 4.x Pegasus with random embed_tokens; the export's reference is
    repaired from the same files, else the right export would be compared with a random model."""
    from ortseq.exporter import verify
    from ortseq.exporter.verify import GraphMismatchError

    monkeypatch.setattr(verify, "load_checkpoint_tensors", lambda *args: None)
    with pytest.raises(GraphMismatchError, match="logits differ from transformers'"):
        export(str(FIXTURES / "pegasus_untied"), tmp_path / "out")
