"""BART (BartForConditionalGeneration): fp32 generate() equals transformers', its tokenizer too, and it quantizes.

Three tiny random checkpoints exported once per session: bart-large-cnn's layout (unscaled, tied,
forced BOS after the decoder start), a scaled and untied one with odd heads and asymmetric depth,
and the cnn layout without forced BOS. The tests that run the forced-BOS model need the runtime's
forced_bos_token_id (marked `forced_bos` below); the others do not.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    CORPUS,
    SETTINGS,
    discriminating_batch,
    ortseq,
    padded_batch,
    parity_lengths,
    parity_shape,
    seed_of,
    with_peaked,
)

from ortseq.exporter.families import family_for
from ortseq.exporter.families.bart import BartFamily
from ortseq.exporter.pipeline import export
from ortseq.exporter.quantization.pipeline import quantize
from ortseq.exporter.sources import ALIASES
from ortseq.exporter.tiny.bart import TinyBartShape, build_tiny_bart
from ortseq.exporter.tiny.trained import synthetic_documents
from ortseq.runtime import Seq2SeqModel
from ortseq.runtime.tokenizer import TextTokenizer

S = TinyBartShape
MODELS = {
    "cnn_layout": S(),  # tiny-bart: what bart-large-cnn is, at tiny size
    "scaled_untied": S(
        d_model=60, heads=3, encoder_layers=3, decoder_layers=1, ffn_dim=72, max_position_embeddings=40,
        scale_embedding=True, tie_embeddings=False, forced_bos=False, eos_logit_bias=4.0,
    ),
    "cnn_layout_no_forced_bos": S(forced_bos=False),
}  # fmt: skip
WITHOUT_FORCED_BOS = ["scaled_untied", "cnn_layout_no_forced_bos"]


@dataclasses.dataclass
class ExportedBart:
    checkpoint: Path
    export_dir: Path
    torch_model: torch.nn.Module
    ours: Seq2SeqModel


@pytest.fixture(scope="session")
def bart(tmp_path_factory):
    """bart(name) -> ExportedBart for a model of MODELS or its peaked twin (helpers.with_peaked), built and
    exported once."""
    from transformers import BartForConditionalGeneration

    cache: dict[str, ExportedBart] = {}

    def get(name: str) -> ExportedBart:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            checkpoint = build_tiny_bart(root / "checkpoint", with_peaked(MODELS)[name], seed=seed_of(MODELS, name))
            export(str(checkpoint), root / "export")
            model = BartForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
            cache[name] = ExportedBart(checkpoint, root / "export", model, Seq2SeqModel.load(root / "export"))
        return cache[name]

    return get


def parity_case(bart, name: str, setting: str) -> tuple[ExportedBart, np.ndarray, np.ndarray, np.ndarray]:
    """(model, ids, mask, transformers' tokens) on the first padded batch (by seed) where the case
    discriminates: rows end at varied lengths, some before the maximum, and the tokens differ from the
    same case without its setting (helpers.degenerate). Ids above BART's specials."""
    model = bart(parity_shape(name, setting))
    manifest = model.ours.manifest

    def batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = padded_batch(manifest, parity_lengths(manifest.dims.max_position_embeddings), seed=seed)
        ids[mask == 1] = np.maximum(ids[mask == 1], 5)  # no <s>/<pad>/</s>/<unk>/<mask> inside the text
        return ids, mask

    first_seed = zlib.crc32(setting.encode()) % 1000
    eos = manifest.special_tokens.eos_token_id
    return model, *discriminating_batch(model.torch_model, setting, batch, first_seed, eos)


@pytest.mark.parametrize("name", WITHOUT_FORCED_BOS)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_bart_generate_matches_transformers_on_padded_batch(bart, name, setting):
    model, ids, mask, expected = parity_case(bart, name, setting)
    np.testing.assert_array_equal(model.ours.generate(ids, mask, **SETTINGS[setting]), expected)


@pytest.mark.parametrize("setting", ["greedy", "beam4_lp06", "beam4_no_repeat_3", "model_defaults"])
def test_bart_with_forced_bos_matches_transformers(bart, setting):
    """forced_bos_token_id (bart-large-cnn: <s> after the decoder start </s>); needs the runtime to honour it."""
    model, ids, mask, expected = parity_case(bart, "cnn_layout", setting)
    assert (expected[:, 1] == 0).all()  # transformers forced <s> second
    np.testing.assert_array_equal(model.ours.generate(ids, mask, **SETTINGS[setting]), expected)


def test_bart_fixtures_end_hypotheses_at_varied_lengths(bart):
    """The parity cases only mean something if beams finish early, at different steps."""
    ours = bart("cnn_layout_no_forced_bos").ours
    ids, mask = padded_batch(ours.manifest, [30, 12, 5, 1], seed=11)
    ids = np.maximum(ids, 5)
    out = ours.generate(ids, mask, num_beams=4, max_new_tokens=30, num_return_sequences=4, no_repeat_ngram_size=0)
    eos = ours.manifest.special_tokens.eos_token_id
    lengths = {int(np.argmax(row[1:] == eos)) for row in out if (row[1:] == eos).any()}
    assert len(lengths) >= 3, f"hypotheses end at too few distinct lengths: {lengths}"


def test_bart_runtime_tokenizer_equals_transformers(bart):
    """The byte-level BPE tokenizer.json the runtime runs gives BartTokenizer's ids and decoded text,
    <s> ... </s> added; any generated ids decode as transformers decodes them."""
    from transformers import AutoTokenizer

    model = bart("cnn_layout")
    reference = AutoTokenizer.from_pretrained(str(model.checkpoint))
    manifest = model.ours.manifest
    runtime = TextTokenizer(model.export_dir, manifest.tokenizer, manifest.special_tokens.pad_token_id)
    for text in CORPUS:
        expected = reference(text).input_ids
        ids, mask = runtime.encode([text], max_length=10**6)
        assert ids[0][mask[0] == 1].tolist() == expected, text[:60]
        assert runtime.decode([expected]) == [reference.decode(expected, skip_special_tokens=True)], text[:60]
    rng = np.random.default_rng(0)
    for _ in range(100):
        ids = rng.integers(0, len(reference), size=rng.integers(1, 40)).tolist()
        assert runtime.decode([ids]) == [reference.decode(ids, skip_special_tokens=True)], ids


def test_bart_aliases_and_family():
    assert ALIASES["bart-large-cnn"] == "facebook/bart-large-cnn"
    assert ALIASES["distilbart-cnn"] == "sshleifer/distilbart-cnn-12-6"
    assert ALIASES["tiny-bart"] == "tiny:bart"


def test_bart_large_cnn_config_is_read_as_bart(tmp_path):
    """bart-large-cnn's real config (on the meta device: no weights) gives its dims and special tokens."""
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    config = BartConfig(
        vocab_size=50264, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
        decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
        scale_embedding=False, bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=0, forced_eos_token_id=2,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    family = family_for(tmp_path)
    assert type(family) is BartFamily and family.name == "bart"
    with torch.device("meta"):
        model = BartForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    dims = family.dims(model)
    assert (dims.d_model, dims.encoder_layers, dims.decoder_layers, dims.decoder_heads, dims.head_dim) == (
        1024, 12, 12, 16, 64)  # fmt: skip
    assert (dims.vocab_size, dims.max_position_embeddings) == (50264, 1024)
    tokens = family.special_tokens(model)
    assert (tokens.pad_token_id, tokens.eos_token_id, tokens.decoder_start_token_id) == (1, 2, 2)


def test_tiny_bart_alias_exports_and_summarizes(tmp_path):
    out = tmp_path / "tiny-bart"
    result = ortseq("export", "tiny-bart", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["family"] == "bart"
    result = ortseq("generate", str(out), "--num-beams", "2", "--max-new-tokens", "8", stdin="The council met.\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_bart_quantizes_to_an_export_that_loads_and_generates(bart, tmp_path, fmt):
    """The post-LN BART graphs go through `quantize` in every format. The gate is set to 0 here: on random
    weights agreement measures nothing (the trained tiny BART below measures it)."""
    manifest = quantize(bart("cnn_layout_no_forced_bos").export_dir, tmp_path / fmt, fmt, min_agreement=0.0)
    assert manifest.precision == fmt and "greedy" in manifest.quantization.quality
    ours = Seq2SeqModel.load(tmp_path / fmt)
    out = ours.generate(*padded_batch(ours.manifest, [9, 4], seed=1), num_beams=2, max_new_tokens=6)
    assert out.shape[0] == 2 and (out[:, 0] == ours.manifest.special_tokens.decoder_start_token_id).all()


@pytest.fixture(scope="module")
def trained_bart(tmp_path_factory) -> Path:
    """tiny-bart-trained exported: trained once per machine (about 2.5 min, then cached), see
    exporter/tiny/trained.py."""
    out = tmp_path_factory.mktemp("trained-bart") / "fp32"
    export("tiny-bart-trained", out)
    return out


@pytest.mark.slow
def test_trained_bart_export_summarizes_held_out_documents(trained_bart):
    docs = synthetic_documents(60, seed=123_456)  # neither the training's nor the held-out report's seed
    summaries = Seq2SeqModel.load(trained_bart).summarize([doc for doc, _ in docs], num_beams=1)
    exact = np.mean([summary.strip() == lead for summary, (_, lead) in zip(summaries, docs)])
    assert exact >= 0.9, exact


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_trained_bart_quantizes_past_the_quality_gate(trained_bart, tmp_path, fmt):
    """A model that has learned its task, so token agreement measures the quantization: the gate at 0.95."""
    manifest = quantize(trained_bart, tmp_path / fmt, fmt, min_agreement=0.95)
    report = manifest.quantization.quality
    for mode in ("greedy", "beam4"):
        assert report[mode]["token_agreement"] >= 0.95, (mode, report)
    assert report["logits"]["max_abs_error"] < report["logits"]["fp32_logit_std"]
    docs = synthetic_documents(40, seed=123_457)
    summaries = Seq2SeqModel.load(tmp_path / fmt).summarize([doc for doc, _ in docs], num_beams=4)
    assert np.mean([summary.strip() == lead for summary, (_, lead) in zip(summaries, docs)]) >= 0.9
