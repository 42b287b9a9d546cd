"""EncoderDecoderModel (bert2bert, roberta2roberta, BertGeneration): fp32 generate() equals transformers'.

Six tiny random checkpoints, each kind untied and with tie_encoder_decoder=True (as transformers 4.x
saved such checkpoints: decoder weights equal to the encoder's), exported once per session.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    PEAKED_SUFFIX,
    SETTINGS,
    assert_disagreements_are_fp32_ties,
    discriminating_batch,
    parity_lengths,
    parity_shape,
    seed_of,
    torch_generate,
    with_peaked,
)

from ortseq.exporter.pipeline import export
from ortseq.exporter.tiny.encoder_decoder import TinyEncoderDecoderShape, build_tiny_encoder_decoder
from ortseq.graphs import contract
from ortseq.graphs.manifest import Manifest
from ortseq.runtime import Seq2SeqModel

torch.set_num_threads(1)
logging.getLogger("ortseq").setLevel(logging.WARNING)

# name -> (kind, shape): odd head counts, head_dim 12, asymmetric depth, short position tables. Random
# ids need other EOS biases than the demo texts the tiny-* defaults are tuned for (see the test below).
S = TinyEncoderDecoderShape
MODELS = {
    "bert2bert": ("bert2bert", S(eos_logit_bias=6.0)),
    "bert2bert_tied": ("bert2bert", S(
        hidden=36, heads=3, intermediate=60, max_position_embeddings=40, eos_logit_bias=6.0, tie_encoder_decoder=True)),
    "roberta2roberta": ("roberta2roberta", S(encoder_layers=3, decoder_layers=1, eos_logit_bias=7.0)),
    "roberta2roberta_tied": ("roberta2roberta", S(
        hidden=48, heads=2, max_position_embeddings=48, eos_logit_bias=4.0, tie_encoder_decoder=True)),
    "bertgeneration": ("bertgeneration", S(encoder_layers=1, decoder_layers=3, max_position_embeddings=50)),
    "bertgeneration_tied": ("bertgeneration", S(hidden=48, heads=4, tie_encoder_decoder=True)),
    # head_dim 32: DecoderMaskedMultiHeadAttention (the others get the plain-ONNX self-attention)
    "roberta2roberta_head32": ("roberta2roberta", S(hidden=64, heads=2, eos_logit_bias=7.0)),
}  # fmt: skip
SHAPES = {name: shape for name, (_, shape) in MODELS.items()}

PARITY_SETTINGS = [
    "greedy",
    "greedy_no_repeat_2",
    "beam2_lp1",
    "beam4_lp06",
    "beam8_lp2",
    "beam4_no_repeat_3",
    "beam4_early_stopping",
    "beam4_return4",
    "beam2_min_new_tokens",
    "model_defaults",
]


@dataclasses.dataclass
class ExportedEncoderDecoder:
    checkpoint: Path
    export_dir: Path
    torch_model: torch.nn.Module
    ours: Seq2SeqModel


@pytest.fixture(scope="session")
def encdec(tmp_path_factory):
    """encdec(name) -> ExportedEncoderDecoder for a model of MODELS or its peaked twin (helpers.with_peaked),
    built and exported once."""
    from transformers import EncoderDecoderModel

    cache: dict[str, ExportedEncoderDecoder] = {}

    def get(name: str) -> ExportedEncoderDecoder:
        if name not in cache:
            kind, shape = MODELS[name.removesuffix(PEAKED_SUFFIX)][0], with_peaked(SHAPES)[name]
            root = tmp_path_factory.mktemp(name)
            checkpoint = build_tiny_encoder_decoder(kind, root / "checkpoint", shape, seed=seed_of(SHAPES, name))
            export(str(checkpoint), root / "export")
            model = EncoderDecoderModel.from_pretrained(str(checkpoint)).eval()
            cache[name] = ExportedEncoderDecoder(checkpoint, root / "export", model, Seq2SeqModel.load(root / "export"))
        return cache[name]

    return get


def padded_batch(model: ExportedEncoderDecoder, lengths: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random non-special ids right-padded with the model's pad id, one row per length."""
    rng = np.random.default_rng(seed)
    vocab, pad = model.ours.manifest.dims.vocab_size, model.ours.manifest.special_tokens.pad_token_id
    ids = np.full((len(lengths), max(lengths)), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(5, vocab, size=length)  # ids 0..4 are the special tokens
        mask[row, :length] = 1
    return ids, mask


# Tied and head_dim-32 checkpoints differ from the others only in their weights or attention body: a few settings
# by default, all in `make test-full`.
TIED_DEFAULT_SETTINGS = {"greedy", "beam4_lp06", "beam4_return4", "model_defaults"}
PARITY_CASES = [
    pytest.param(
        name,
        setting,
        marks=[pytest.mark.slow]
        if ("tied" in name or "head32" in name) and setting not in TIED_DEFAULT_SETTINGS
        else [],
    )
    for setting in PARITY_SETTINGS
    for name in MODELS
]


@pytest.mark.parametrize("name, setting", PARITY_CASES)
def test_generate_matches_transformers_on_padded_batch(encdec, name, setting):
    """On the first padded batch (by seed) where the case discriminates: rows end at varied lengths, some
    before the maximum, and the tokens differ from the same case without its setting (helpers.degenerate)."""
    model = encdec(parity_shape(name, setting))
    max_len = model.ours.manifest.dims.max_position_embeddings
    assert max_len == MODELS[name][1].max_position_embeddings  # RoBERTa's offset of 2 accounted for
    ids, mask, expected = discriminating_batch(
        model.torch_model,
        setting,
        lambda seed: padded_batch(model, parity_lengths(max_len), seed=seed),
        first_seed=zlib.crc32(setting.encode()) % 1000,
        eos=model.ours.manifest.special_tokens.eos_token_id,
    )
    np.testing.assert_array_equal(model.ours.generate(ids, mask, **SETTINGS[setting]), expected)


@pytest.mark.parametrize("name", ["bert2bert", "roberta2roberta", "bertgeneration"])
def test_fixtures_end_hypotheses_at_varied_lengths(encdec, name):
    """The parity cases only mean something if beams finish early, at different steps."""
    model = encdec(name)
    ids, mask = padded_batch(model, [30, 12, 5, 1], seed=11)
    out = model.ours.generate(ids, mask, num_beams=4, max_new_tokens=30, num_return_sequences=4)
    eos = model.ours.manifest.special_tokens.eos_token_id
    lengths = {int(np.argmax(row == eos)) for row in out if (row == eos).any()}
    assert len(lengths) >= 3, f"hypotheses end at too few distinct lengths: {lengths}"
    assert len(np.unique(out[:, 1:])) >= 8, "the fixture decodes too few distinct tokens"


@pytest.mark.parametrize("name", ["bert2bert_tied", "roberta2roberta_tied", "bertgeneration_tied"])
def test_tied_checkpoints_load_with_decoder_weights_equal_to_encoder(encdec, name):
    model = encdec(name).torch_model
    encoder = dict(model.encoder.named_parameters())
    shared = [(n, p) for n, p in model.decoder.base_model.named_parameters() if n in encoder]
    assert len(shared) > 10
    for param_name, param in shared:
        torch.testing.assert_close(param, encoder[param_name], rtol=0, atol=0, msg=param_name)


def test_roberta_decoder_gives_a_generated_pad_token_the_padding_position(encdec):
    """transformers' RoBERTa decoder computes positions from the ids it gets: with a cache a pad id
    gets position padding_idx, later tokens keep counting from past length. The graph must agree."""
    model = encdec("roberta2roberta")
    hf, session = model.torch_model, model.ours.sessions
    tokens = model.ours.manifest.special_tokens
    decoder_ids = [tokens.decoder_start_token_id, 17, tokens.pad_token_id, 23, tokens.pad_token_id, 42]
    ids, mask = padded_batch(model, [9, 4], seed=5)
    memory = session.encode(ids, mask)
    step = session.decoder_step(memory, rows=2, max_len=len(decoder_ids))
    with torch.no_grad():
        encoder_out = hf.encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        past = None
        for token in decoder_ids:
            out = hf(
                encoder_outputs=encoder_out,
                attention_mask=torch.from_numpy(mask),
                decoder_input_ids=torch.full((2, 1), token),
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            ours = step(np.full(2, token, dtype=np.int64), np.arange(2, dtype=np.int64))
            np.testing.assert_allclose(ours, out.logits[:, -1].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["bert2bert", "roberta2roberta", "bertgeneration"])
def test_summarize_equals_transformers_tokenize_generate_decode(encdec, kind):
    """Text in, text out, with the tokenization the manifest records (special tokens or not)."""
    from transformers import AutoTokenizer

    model = encdec(kind)
    tokenizer = AutoTokenizer.from_pretrained(str(model.checkpoint))
    info = model.ours.manifest.tokenizer
    texts = [
        "The city council said the new river bridge will open next year, the minister reported.",
        "Police said the museum was closed on Sunday!",
        "Zürich café: 100% naïve?",
    ]
    batch = tokenizer(
        texts,
        add_special_tokens=info.add_special_tokens,
        padding=True,
        truncation=True,
        max_length=info.model_max_length,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.torch_model.generate(batch.input_ids, attention_mask=batch.attention_mask, num_beams=3)
    expected = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert model.ours.summarize(texts, num_beams=3) == expected


DEMO_TEXTS = [  # the Makefile's demo texts
    "The city council said the new river bridge will open next year after the election, the minister reported.",
    "Police said the museum was closed on Sunday when water from the river reached the station.",
]


def test_aliases_record_special_tokens_and_tokenization_of_the_model_cards(tmp_path):
    """bert2bert: [CLS] starts, [SEP] ends, inputs with special tokens (bert2bert_cnn_daily_mail's card);
    roberta2roberta: <s>/</s>/<pad>; it and BertGeneration tokenize without special tokens (google's cards)."""
    expected = {
        "tiny-bert2bert": (("[CLS]", "[SEP]", "[PAD]"), True),
        "tiny-roberta2roberta": (("<s>", "</s>", "<pad>"), False),
        "tiny-bertgeneration": (("<s>", "</s>", "<pad>"), False),
    }
    for alias, (names, add_special_tokens) in expected.items():
        export(alias, tmp_path / alias)
        manifest = Manifest.read(tmp_path / alias)
        vocab = json.loads((tmp_path / alias / "tokenizer.json").read_text())["added_tokens"]
        by_id = {token["id"]: token["content"] for token in vocab}
        tokens = manifest.special_tokens
        assert (by_id[tokens.decoder_start_token_id], by_id[tokens.eos_token_id], by_id[tokens.pad_token_id]) == names
        assert manifest.tokenizer.add_special_tokens is add_special_tokens, alias
        assert manifest.family == "encoder-decoder"
        summaries = Seq2SeqModel.load(tmp_path / alias).summarize(DEMO_TEXTS)
        assert all(summary.strip() for summary in summaries), (alias, summaries)  # `make demo` shows words


def test_decoder_graph_shares_cross_key_values_across_beams(encdec):
    """Cross K/V enter the decoder once per input ([batch, ...]), not once per beam."""
    import onnx

    model = encdec("bert2bert")
    graph = onnx.load(str(model.export_dir / contract.DECODER_FILE)).graph
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert shapes["cross_key_0"][0] == "batch" and shapes["cache_key_0"][0] == "rows"


def test_tied_checkpoint_storing_shared_weights_once_exports_the_encoder_weights(encdec, tmp_path):
    """transformers 4.x saved a tie_encoder_decoder=True model's shared weights once, under the encoder's
    names. transformers 5.x ignores tie_encoder_decoder and initialises those decoder weights at random;
    the export takes them from the encoder, as the checkpoint means, and generates what the model with
    both copies generates."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import EncoderDecoderModel

    model = encdec("roberta2roberta_tied")
    checkpoint = tmp_path / "deduplicated"
    shutil.copytree(model.checkpoint, checkpoint)
    weights = load_file(str(checkpoint / "model.safetensors"))
    shared = [name for name in weights if name.startswith("decoder.roberta.") and "crossattention" not in name]
    assert len(shared) > 10
    save_file({k: v for k, v in weights.items() if k not in shared}, str(checkpoint / "model.safetensors"))

    reloaded = EncoderDecoderModel.from_pretrained(str(checkpoint))
    assert not torch.equal(
        reloaded.decoder.roberta.embeddings.word_embeddings.weight, reloaded.encoder.embeddings.word_embeddings.weight
    )

    export(str(checkpoint), tmp_path / "export")
    ids, mask = padded_batch(model, [20, 7], seed=4)
    settings = dict(num_beams=4, max_new_tokens=12)
    ours = Seq2SeqModel.load(tmp_path / "export").generate(ids, mask, **settings)
    np.testing.assert_array_equal(ours, torch_generate(model.torch_model, ids, mask, settings))


@pytest.mark.parametrize("name", ["bert2bert", "roberta2roberta", "bertgeneration"])
def test_without_attention_mask_pad_ids_are_attended_like_transformers(encdec, name):
    """No mask: generate() attends every token, pad ids included (RoBERTa still gives them the padding position)."""
    model = encdec(name)
    ids, _ = padded_batch(model, [20, 9], seed=3)
    settings = dict(num_beams=4, max_new_tokens=10)
    with torch.no_grad():
        expected = model.torch_model.generate(torch.from_numpy(ids), **settings).numpy()
    np.testing.assert_array_equal(model.ours.generate(ids, **settings), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert2bert", "roberta2roberta", "bertgeneration"])
@pytest.mark.parametrize("setting", ["greedy", "beam4_lp06"])
def test_disagreements_are_fp32_ties_that_float64_decides_our_way(encdec, name, setting):
    """Sweep many inputs; wherever our tokens differ from transformers' fp32 tokens, float64 must agree
    with ours (see tests/test_generate_parity.py for why two fp32 implementations may differ on a tie)."""
    model = encdec(name)
    max_len = model.ours.manifest.dims.max_position_embeddings
    batches = (padded_batch(model, [max_len, max_len // 2 + 1, 1], seed=seed) for seed in range(100))
    assert_disagreements_are_fp32_ties(model.ours, model.torch_model, batches, SETTINGS[setting], max_ties=2)


def test_encoder_narrower_than_decoder_projects_the_memory_like_transformers(tmp_path):
    """EncoderDecoderModel inserts enc_to_dec_proj when the hidden sizes differ; the encoder graph applies it."""
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel, GenerationConfig

    from ortseq.exporter.tiny.encoder_decoder import train_wordpiece

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    vocab = len(train_wordpiece(checkpoint, 400, 0))
    sizes = dict(vocab_size=vocab, num_attention_heads=4, max_position_embeddings=32, initializer_range=0.3)
    encoder = BertConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, **sizes)
    decoder = BertConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, is_decoder=True, add_cross_attention=True, **sizes
    )
    tokens = dict(decoder_start_token_id=2, pad_token_id=0, eos_token_id=3)
    torch.manual_seed(0)
    model = EncoderDecoderModel(config=EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder, **tokens))
    assert model.enc_to_dec_proj.in_features == 48
    model.generation_config = GenerationConfig(bos_token_id=2, **tokens)
    model.save_pretrained(checkpoint)
    export(str(checkpoint), tmp_path / "export")
    reference = EncoderDecoderModel.from_pretrained(str(checkpoint)).eval()
    ours = Seq2SeqModel.load(tmp_path / "export")
    ids, mask = np.full((2, 32), 0), np.zeros((2, 32), dtype=np.int64)
    rng = np.random.default_rng(1)
    for row, length in enumerate([32, 9]):
        ids[row, :length], mask[row, :length] = rng.integers(5, vocab, size=length), 1
    for settings in (dict(num_beams=1, max_new_tokens=10), dict(num_beams=4, max_new_tokens=10)):
        np.testing.assert_array_equal(
            ours.generate(ids, mask, **settings), torch_generate(reference, ids, mask, settings)
        )


def test_special_tokens_follow_generate_rules_when_the_generation_config_lacks_some(encdec):
    """generate() starts with BOS when there is no decoder start id and pads with EOS when there is no pad id."""
    import copy

    from ortseq.exporter.families import UnsupportedModelError
    from ortseq.exporter.families.encoder_decoder import EncoderDecoderFamily

    model = copy.deepcopy(encdec("roberta2roberta").torch_model)
    model.generation_config.decoder_start_token_id = None
    model.generation_config.pad_token_id = None
    tokens = EncoderDecoderFamily().special_tokens(model)
    assert (tokens.decoder_start_token_id, tokens.pad_token_id) == (model.generation_config.bos_token_id, 2)
    model.generation_config.eos_token_id = [2, 7]
    with pytest.raises(UnsupportedModelError, match="several EOS"):
        EncoderDecoderFamily().special_tokens(model)
