"""The family contract's hooks with defaults (exporter/families/base.py), each checked where it acts:
tokenizer files, download patterns, the tokenizer contract, the model attributes the export modules read,
and checkpoint_layout derived from Layout. The tiny Marian (a family added from outside, as a newcomer
would: exporter/families/marian.py) exercises the non-default answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ortseq.exporter import sources
from ortseq.exporter.errors import ModelAttributeError, TokenizerContractError
from ortseq.exporter.families import UnsupportedModelError, family_named
from ortseq.exporter.families.base import DEFAULT_TOKENIZER_FILES, check_model_attributes
from ortseq.exporter.families.marian import marian_converter
from ortseq.exporter.pipeline import load_checked_model
from ortseq.exporter.tokenizer_files import MissingTokenizerError, check_tokenizer_files, save_tokenizer

MARIAN = family_named("marian")


@pytest.fixture(scope="module")
def marian_checkpoint(tiny_export):
    return tiny_export("marian").checkpoint


def test_a_family_declares_its_tokenizer_files_and_a_checkpoint_missing_one_is_refused_by_name(
    marian_checkpoint, tmp_path
):
    with pytest.raises(MissingTokenizerError):  # the default vocabularies know no source.spm
        check_tokenizer_files(marian_checkpoint, DEFAULT_TOKENIZER_FILES)
    check_tokenizer_files(marian_checkpoint, MARIAN.tokenizer_files())
    folder = tmp_path / "checkpoint"
    shutil.copytree(marian_checkpoint, folder)
    (folder / "target.spm").unlink()
    with pytest.raises(MissingTokenizerError, match="source.spm with target.spm with vocab.json") as refusal:
        check_tokenizer_files(folder, MARIAN.tokenizer_files())
    assert "\n" not in str(refusal.value)


def test_a_hub_download_fetches_config_json_first_then_the_familys_patterns(marian_checkpoint, monkeypatch):
    """snapshot_download stands in for the hub (unreachable here): it serves the tiny Marian's folder."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns, local_files_only=False):
        calls.append((list(allow_patterns), local_files_only))
        if local_files_only:
            raise OSError("not cached")
        return str(marian_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert sources._download("someone/opus-mt-xx-yy") == Path(marian_checkpoint)
    assert [patterns for patterns, local in calls if not local] == [["config.json"], list(MARIAN.download_patterns())]
    assert {"source.spm", "target.spm", "*.safetensors", "*.json"} <= set(MARIAN.download_patterns())
    assert "source.spm" not in family_named("bart").download_patterns()


def test_a_hub_model_no_family_exports_is_refused_before_its_weights_are_fetched(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    calls = []

    def snapshot_download(repo_id, allow_patterns, local_files_only=False):
        calls.append(list(allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(UnsupportedModelError, match="model_type 't5' is not supported"):
        sources._download("google/t5-small")
    assert calls == [["config.json"]]


def test_the_tokenizer_contract_refuses_a_converter_that_drops_the_appended_eos(marian_checkpoint, tmp_path):
    class WithoutEos(marian_converter()):
        def post_processor(self):
            return None

    info = save_tokenizer(marian_checkpoint, tmp_path, 64, True, MARIAN.tokenizer_converters())
    assert info.strip_decoded_text  # MarianTokenizer is sentencepiece-backed: converted, its text stripped
    with pytest.raises(TokenizerContractError, match="MarianTokenizer: tokenizer.json encodes") as refusal:
        save_tokenizer(marian_checkpoint, tmp_path, 64, True, {"MarianTokenizer": WithoutEos})
    assert "\n" not in str(refusal.value)


def test_marian_with_two_different_sentencepiece_models_is_refused_by_name(marian_checkpoint, tmp_path):
    """One tokenizer.json decodes the target text as target.spm only if both models hold the same pieces."""
    from ortseq.exporter.tiny.text import tokenizer_corpus, train_unigram_sentencepiece

    folder = tmp_path / "checkpoint"
    shutil.copytree(marian_checkpoint, folder)
    (tmp_path / "spm").mkdir()
    other = train_unigram_sentencepiece(tmp_path / "spm", tokenizer_corpus(5)[:500], 300, unk_id=0, bos_id=1, eos_id=2)
    shutil.copy(other, folder / "target.spm")
    with pytest.raises(UnsupportedModelError, match="source.spm and target.spm differ"):
        save_tokenizer(folder, tmp_path, 64, True, MARIAN.tokenizer_converters())


@pytest.mark.parametrize("family", ["bart", "pegasus", "marian"])
def test_the_model_attributes_the_export_reads_are_checked_and_a_missing_one_is_named(tiny_export, family):
    model = family_named(family).load_model(str(tiny_export(family).checkpoint))  # its tiny kind is its name
    check_model_attributes(family_named(family), model)
    del model.model.decoder.layers[1].encoder_attn.scaling
    with pytest.raises(ModelAttributeError, match=r"has no model\.model\.decoder\.layers\[1\]\.encoder_attn\.scaling"):
        check_model_attributes(family_named(family), model)


def test_the_export_checks_the_model_attributes_right_after_loading(marian_checkpoint, monkeypatch):
    real_load = type(MARIAN).load_model

    def load_without_embed_scale(self, source_dir):
        model = real_load(self, source_dir)
        del model.model.encoder.embed_scale
        return model

    monkeypatch.setattr(type(MARIAN), "load_model", load_without_embed_scale)
    with pytest.raises(ModelAttributeError, match=r"model\.model\.encoder\.embed_scale"):
        load_checked_model(MARIAN, marian_checkpoint)


def test_checkpoint_layout_follows_the_layout(tiny_export):
    marian = MARIAN.checkpoint_layout(MARIAN.load_model(str(tiny_export("marian").checkpoint)))
    bart_family = family_named("bart")
    bart = bart_family.checkpoint_layout(bart_family.load_model(str(tiny_export("bart").checkpoint)))
    positions = {f"model.{side}.embed_positions.weight" for side in ("encoder", "decoder")}
    assert positions <= set(marian.computed) and not positions & set(bart.computed)  # sinusoidal or learned
    assert "final_logits_bias" in marian.computed and "final_logits_bias" in bart.computed
    assert "lm_head.weight" in marian.tied[0]  # tie_word_embeddings: the LM head is the embedding table


def test_a_checkpoint_without_final_logits_bias_loads_with_zeros(tiny_export, tmp_path):
    """transformers saves final_logits_bias, but some checkpoints lack it (Marian's loader expects that)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_export("marian").checkpoint, folder)
    weights = load_file(folder / "model.safetensors")
    assert weights.pop("final_logits_bias").abs().sum() > 0  # the tiny model's EOS bias: absent now
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    model = load_checked_model(MARIAN, folder)
    assert torch.equal(model.final_logits_bias, torch.zeros_like(model.final_logits_bias))
