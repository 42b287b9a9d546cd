"""An export is verified against transformers' own model, not only against ortseq's rewrite of it.

Each wrong export below passes the graph-vs-rewrite checks (the graphs are traced from the wrong
modules, so they agree with them) and must be refused by the comparison with transformers'
from_pretrained, forward and generate(): the export fails and nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import onnx
import pytest
import torch
from onnx import numpy_helper

from ortseq.exporter import pipeline
from ortseq.exporter.families import bart, encoder_decoder, tiny_builder
from ortseq.exporter.families.pegasus import PegasusFamily
from ortseq.exporter.pipeline import export
from ortseq.exporter.tiny.encoder_decoder import TinyEncoderDecoderShape, build_tiny_encoder_decoder
from ortseq.exporter.tiny.pegasus import TinyPegasusShape, build_tiny_pegasus
from ortseq.exporter.verify import GraphMismatchError
from ortseq.runtime.cli import main

torch.set_num_threads(1)
logging.getLogger("ortseq").setLevel(logging.WARNING)

SMALL_PEGASUS = TinyPegasusShape(d_model=32, heads=2, encoder_layers=2, decoder_layers=2, ffn_dim=48)


@pytest.fixture(scope="module")
def pegasus_checkpoint(tmp_path_factory):
    return build_tiny_pegasus(tmp_path_factory.mktemp("pegasus") / "checkpoint", SMALL_PEGASUS, seed=7)


@pytest.fixture(scope="module")
def bert2bert_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert2bert")
    return build_tiny_encoder_decoder(
        "bert2bert", root / "checkpoint", TinyEncoderDecoderShape(eos_logit_bias=6.0), seed=3
    )


def load_sign_flipped(monkeypatch, parameter) -> None:
    """The export's load (after the check against the checkpoint files, which would restore the stored
    value) returns the model with one weight matrix negated (parameter: model -> tensor)."""
    load_checked_model = pipeline.load_checked_model

    def load(family, checkpoint):
        model = load_checked_model(family, checkpoint)
        with torch.no_grad():
            parameter(model).neg_()
        return model

    monkeypatch.setattr(pipeline, "load_checked_model", load)


def assert_export_refused(checkpoint, out, match: str) -> None:
    with pytest.raises(GraphMismatchError, match=match):
        export(str(checkpoint), out)
    assert list(out.parent.iterdir()) == [], "a refused export must leave nothing behind"


def test_honest_exports_are_verified_against_transformers(pegasus_checkpoint, bert2bert_checkpoint, tmp_path, caplog):
    with caplog.at_level("INFO", logger="ortseq"):
        export(str(pegasus_checkpoint), tmp_path / "pegasus")
        export(str(bert2bert_checkpoint), tmp_path / "bert2bert")
    checked = [r.message for r in caplog.records if "against transformers'" in r.message]
    assert len(checked) == 2, checked
    assert "PegasusForConditionalGeneration" in checked[0] and "EncoderDecoderModel" in checked[1]


def test_pegasus_loaded_with_a_sign_flipped_weight_fails_export(pegasus_checkpoint, tmp_path, monkeypatch):
    load_sign_flipped(monkeypatch, lambda model: model.model.encoder.layers[0].fc2.weight)
    assert_export_refused(pegasus_checkpoint, tmp_path / "out", "logits differ from transformers' Pegasus")


@pytest.mark.parametrize("side", ["EncoderExport", "DecoderExport"])
def test_pegasus_rewrite_without_embedding_scale_fails_export(pegasus_checkpoint, tmp_path, monkeypatch, side):
    """A rewrite that forgets embed_scale (sqrt(d_model)) on one side, the model itself intact."""
    rewrite = getattr(bart, side)
    stack = "encoder" if side == "EncoderExport" else "decoder"

    class WithoutEmbeddingScale(rewrite):
        def forward(self, *inputs):
            module = getattr(self, stack)
            scale, module.embed_scale = module.embed_scale, 1.0
            try:
                return super().forward(*inputs)
            finally:
                module.embed_scale = scale

    monkeypatch.setattr(bart, side, WithoutEmbeddingScale)
    assert_export_refused(pegasus_checkpoint, tmp_path / "out", "logits differ")


def test_bert2bert_loaded_with_a_sign_flipped_weight_fails_export(bert2bert_checkpoint, tmp_path, monkeypatch):
    load_sign_flipped(monkeypatch, lambda model: model.encoder.encoder.layer[0].output.dense.weight)
    assert_export_refused(
        bert2bert_checkpoint, tmp_path / "out", "logits differ from transformers' EncoderDecoderModel"
    )


def test_bert2bert_rewrite_skipping_the_embedding_layer_norm_fails_export(bert2bert_checkpoint, tmp_path, monkeypatch):
    real_embed = encoder_decoder.embed

    def embed_without_layer_norm(embeddings, *args):
        norm, embeddings.LayerNorm = embeddings.LayerNorm, torch.nn.Identity()
        try:
            return real_embed(embeddings, *args)
        finally:
            embeddings.LayerNorm = norm

    monkeypatch.setattr(encoder_decoder, "embed", embed_without_layer_norm)
    assert_export_refused(bert2bert_checkpoint, tmp_path / "out", "logits differ")


TOKENS_DIFFER = (
    r"tokens differ from transformers' generate\(\) first at row \d+, position \d+ \(ours \d+, transformers \d+\)"
)


def test_wrong_generation_defaults_fail_export_at_the_first_differing_token(pegasus_checkpoint, tmp_path, monkeypatch):
    """Right logits, a wrong search setting in the manifest (an n-gram ban the model does not have): the tokens tell."""
    real = pipeline.generation_defaults

    def with_an_ngram_ban(*args):
        settings, ignored = real(*args)
        return dataclasses.replace(settings, no_repeat_ngram_size=2), ignored

    monkeypatch.setattr(pipeline, "generation_defaults", with_an_ngram_ban)
    assert_export_refused(
        pegasus_checkpoint, tmp_path / "out", r"tokens differ from transformers' generate\(\) first at row"
    )


def test_lsg_decoder_is_verified_against_transformers_pegasus_decoder(tmp_path, monkeypatch):
    """transformers has no LSG encoder, but its Pegasus decoder, given the export's encoder output, checks ours."""
    checkpoint = tiny_builder("lsg-pegasus")(tmp_path / "checkpoint")
    export(str(checkpoint), tmp_path / "exports" / "honest")
    load_sign_flipped(monkeypatch, lambda model: model.model.decoder.layers[0].fc2.weight)
    with pytest.raises(GraphMismatchError, match="logits differ from transformers' Pegasus"):
        export(str(checkpoint), tmp_path / "exports" / "flipped")
    assert not (tmp_path / "exports" / "flipped").exists()


def test_cli_export_of_a_wrong_load_exits_2_with_one_line(pegasus_checkpoint, tmp_path, monkeypatch, capsys):
    load_sign_flipped(monkeypatch, lambda model: model.model.decoder.layers[1].self_attn.v_proj.weight)
    assert main(["export", str(pegasus_checkpoint), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("ortseq: error: export failed verification, nothing was written: logits differ"), error
    assert not (tmp_path / "out").exists()


def test_a_loader_that_gets_a_stored_tensor_wrong_is_corrected_from_the_checkpoint_files(
    pegasus_checkpoint, tmp_path, monkeypatch
):
    """The export takes every tensor from the files (exporter/checkpoint_check.py) after the family's load."""
    load_model = PegasusFamily.load_model

    def load(self, source_dir):
        model = load_model(self, source_dir)
        with torch.no_grad():
            model.model.encoder.layers[0].fc2.weight.neg_()
        return model

    monkeypatch.setattr(PegasusFamily, "load_model", load)
    export(str(pegasus_checkpoint), tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").is_file()


def _vocab_sized_tensors(export_dir, vocab: int) -> list[str]:
    """Names of the decoder graph's float constants and initializers of shape [1, vocab] (a logits bias)."""
    graph = onnx.load(str(export_dir / "decoder.onnx"), load_external_data=False).graph
    tensors = [*graph.initializer, *(a.t for node in graph.node if node.op_type == "Constant" for a in node.attribute)]
    return [t.name for t in tensors if list(t.dims) == [1, vocab] and numpy_helper.to_array(t).dtype.kind == "f"]


@pytest.mark.parametrize("eos_logit_bias", [0.0, 3.0])
def test_final_logits_bias_is_in_the_graph_only_when_it_is_not_zero(tmp_path, eos_logit_bias):
    # released checkpoints keep it at zero: the graph then does without a vocabulary of float32; the
    # export is verified against transformers either way
    shape = dataclasses.replace(SMALL_PEGASUS, eos_logit_bias=eos_logit_bias)
    checkpoint = build_tiny_pegasus(tmp_path / "checkpoint", shape, seed=7)
    export(str(checkpoint), tmp_path / "export")
    vocab = json.loads((tmp_path / "export" / "manifest.json").read_text())["dims"]["vocab_size"]
    assert bool(_vocab_sized_tensors(tmp_path / "export", vocab)) == (eos_logit_bias != 0.0)
