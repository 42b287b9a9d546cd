"""What the runtime promises around generate: no torch, clear errors, intact files, external data."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ortseq.exporter.pipeline import export
from ortseq.exporter.verify import GraphMismatchError
from ortseq.runtime import InvalidInputError, ManifestError, Seq2SeqModel
from ortseq.runtime.sessions import decoder_threads

ROOT = Path(__file__).resolve().parent.parent

NO_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "optimum"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
from ortseq.runtime import Seq2SeqModel
model = Seq2SeqModel.load(sys.argv[1])
print(model.summarize(["The city council said the bridge will open next year."], num_beams=4)[0])
print(model.generate([[5, 6, 7, 1]], num_beams=2, max_new_tokens=5).tolist())
assert not any(m.split(".")[0] in ("torch", "transformers", "optimum") for m in sys.modules)
"""


def test_runtime_generates_where_torch_and_transformers_cannot_be_imported(exported):
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(exported("base").export_dir)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2


def test_external_data_export_generates_the_same_tokens(exported, tmp_path):
    model = exported("odd_heads")
    export(str(model.checkpoint), tmp_path / "ext", external_data=True)
    assert (tmp_path / "ext" / "decoder.onnx.data").is_file()
    assert (tmp_path / "ext" / "decoder.onnx").stat().st_size < 100_000  # weights are not inline
    ids = np.array([[5, 9, 44, 2, 1], [7, 8, 1, 0, 0]])
    mask = (np.arange(5) < np.array([[5], [3]])).astype(np.int64)
    inline = Seq2SeqModel.load(model.export_dir).generate(ids, mask, num_beams=3, max_new_tokens=12)
    external = Seq2SeqModel.load(tmp_path / "ext").generate(ids, mask, num_beams=3, max_new_tokens=12)
    np.testing.assert_array_equal(inline, external)


@pytest.fixture
def export_copy(exported, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(exported("base").export_dir, target)
    return target


@pytest.mark.parametrize("name", ["decoder.onnx", "encoder.onnx", "tokenizer.json", "search_step.onnx"])
def test_corrupted_file_is_named_in_the_error(export_copy, name):
    path = export_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=name):
        Seq2SeqModel.load(export_copy)


@pytest.mark.parametrize("name", ["decoder.onnx", "manifest.json", "search_step.onnx"])
def test_missing_file_is_named_in_the_error(export_copy, name):
    (export_copy / name).unlink()
    with pytest.raises(ManifestError, match=name):
        Seq2SeqModel.load(export_copy)


def test_missing_export_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        Seq2SeqModel.load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=-2), "num_beams"),
        (dict(max_new_tokens=3, min_new_tokens=5), "min_new_tokens"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=10_000), "decoder positions"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(length_penalty=float("nan")), "length_penalty"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    ],
)
def test_invalid_settings_raise_value_error(exported, kwargs, message):
    model = Seq2SeqModel.load(exported("base").export_dir)
    with pytest.raises(ValueError, match=message):
        model.generate(np.array([[5, 6, 1]]), **kwargs)
    with pytest.raises(ValueError, match=message):
        model.summarize(["a text"], **kwargs)


@pytest.mark.parametrize("texts", [[""], ["   \n\t"], ["fine", ""], "not a list", [3]])
def test_empty_or_malformed_texts_raise_value_error(exported, texts):
    with pytest.raises(InvalidInputError):
        Seq2SeqModel.load(exported("base").export_dir).summarize(texts)


@pytest.mark.parametrize(
    "ids, mask",
    [
        (np.zeros((0, 3), dtype=np.int64), None),
        (np.array([[1.5, 2.0]]), None),
        (np.array([[5, 99_999]]), None),
        (np.ones((1, 300), dtype=np.int64), None),  # longer than the 256 positions
        (np.array([[5, 6]]), np.array([[0, 0]])),
        (np.array([[5, 6]]), np.array([[1, 1, 1]])),
    ],
)
def test_invalid_token_arrays_raise_value_error(exported, ids, mask):
    with pytest.raises(ValueError):
        Seq2SeqModel.load(exported("base").export_dir).generate(ids, mask)


def test_overlong_text_is_truncated_with_one_warning(exported, caplog):
    model = Seq2SeqModel.load(exported("base").export_dir)
    long_text = "the river bridge " * 500
    with caplog.at_level("WARNING", logger="ortseq"):
        summaries = model.summarize([long_text, long_text], num_beams=2, max_new_tokens=5)
        model.summarize([long_text], num_beams=2, max_new_tokens=5)
    assert len(summaries) == 2
    assert sum("truncated" in r.message for r in caplog.records) == 1


def test_export_that_fails_verification_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    from ortseq.exporter import verify

    def broken(*args, **kwargs):
        raise GraphMismatchError("decoder at a new shape: output logits differs from PyTorch by up to 1")

    monkeypatch.setattr(verify, "verify_decoder", broken)
    with pytest.raises(GraphMismatchError):
        export(str(exported("base").checkpoint), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_verification_catches_a_graph_specialised_to_the_traced_shape(exported, tmp_path, monkeypatch):
    """A module whose shape logic the tracer freezes must fail export, not ship a wrong graph."""
    from ortseq.exporter.families.pegasus import PegasusFamily

    real_encoder_export = PegasusFamily.encoder_export

    def frozen_batch(self, model, **options):
        encoder = real_encoder_export(self, model, **options)
        forward = encoder.forward

        def frozen(input_ids, attention_mask):
            outputs = forward(input_ids, attention_mask)
            return (outputs[0] * float(input_ids.shape[1]) / 9.0, *outputs[1:])  # python float: traced as a constant

        encoder.forward = frozen
        return encoder

    monkeypatch.setattr(PegasusFamily, "encoder_export", frozen_batch)
    with pytest.raises(GraphMismatchError, match="encoder"):
        export(str(exported("base").checkpoint), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, recorded", [(True, True), (False, False), (None, False), ("never", "never")])
def test_generation_defaults_keep_early_stopping_never(value, recorded):
    """transformers' third early-stopping mode, "never", must not become True."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from ortseq.exporter.pipeline import generation_defaults

    config = GenerationConfig(early_stopping=value) if value is not None else GenerationConfig()
    settings, _ = generation_defaults(SimpleNamespace(generation_config=config))
    assert settings.early_stopping == recorded


def test_decoder_of_a_tiny_model_runs_on_one_thread_and_a_large_one_on_all_asked(exported):
    """The decoder-step thread rule (runtime/sessions.py): tiny steps lose more to the hand-off than they gain."""
    model = Seq2SeqModel.load(exported("base").export_dir, threads=2)
    sessions = model.sessions
    assert sessions.decoder.get_session_options().intra_op_num_threads == 1
    assert sessions.encoder.get_session_options().intra_op_num_threads == 2
    xsum = dataclasses.replace(model.manifest.dims, d_model=1024, decoder_layers=16, vocab_size=96103)
    assert decoder_threads(xsum, 2) == 2
    assert decoder_threads(xsum, None) is None
