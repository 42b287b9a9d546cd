"""Small random EncoderDecoderModels (BERT, RoBERTa, BertGeneration), built locally and offline.

Each kind gets the tokenizer kind of its real relatives, trained on the spot with the tokenizers
or sentencepiece library: WordPiece, uncased (bert2bert), byte-level BPE (roberta2roberta),
SentencePiece (bert_for_seq_generation). The checkpoint folder is what save_pretrained writes, so
it goes through exactly the same export path as a hub checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..progress import log
from .kit import TinyModelParts, make_outputs_input_dependent
from .text import (
    load_saved_tokenizer,
    tokenizer_corpus,
    train_byte_level_bpe_vocab,
    train_unigram_sentencepiece,
)

KINDS = ("bert2bert", "roberta2roberta", "bertgeneration")

# Special-token layouts of the real checkpoints (bert-base-uncased, roberta-base, the
# bert_for_seq_generation sentencepiece model).
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@dataclass(frozen=True)
class TinyEncoderDecoderShape:
    """Sizes of a small random encoder-decoder; encoder and decoder share them (tying needs that)."""

    hidden: int = 64
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    intermediate: int = 128
    max_position_embeddings: int = 64
    tie_encoder_decoder: bool = False
    init_std: float = 0.3  # larger than 0.02 so that outputs depend on the input
    eos_logit_bias: float = 4.0  # makes hypotheses end at varied lengths (exercises finished beams)
    cross_attention_gain: float = 3.0  # sharper cross-attention: tokens depend on the input
    position_gain: float = 5.0  # stronger decoder positions: a step differs from the last (no fixed point)
    vocab_size: int = 400  # what the tokenizer is trained to


# The defaults of `build` (the tiny-* aliases): EOS biases with which summaries of real text end at
# varied, non-zero lengths (how strong a bias that takes depends on the LM head and tokenizer).
DEFAULT_SHAPES = {
    "bert2bert": TinyEncoderDecoderShape(eos_logit_bias=4.0),
    "roberta2roberta": TinyEncoderDecoderShape(eos_logit_bias=2.0),
    "bertgeneration": TinyEncoderDecoderShape(eos_logit_bias=2.0),
}


def build_tiny_encoder_decoder(
    kind: str, out_dir: Path, shape: TinyEncoderDecoderShape | None = None, seed: int = 0
) -> Path:
    """Save a small random EncoderDecoderModel of kind (see KINDS) and its tokenizer to out_dir."""
    if kind not in KINDS:
        raise ValueError(f"no tiny encoder-decoder called {kind!r}; known: {list(KINDS)}")
    shape = shape or DEFAULT_SHAPES[kind]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"building tiny-{kind} in {out_dir} (tokenizer trained on the spot)")
    tokenizer = TOKENIZER_BUILDERS[kind](out_dir, shape.vocab_size, seed)
    model = _random_model(kind, tokenizer, shape, seed)
    model.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- tokenizers


def train_wordpiece(out_dir: Path, vocab_size: int, seed: int):
    """Uncased WordPiece in bert-base-uncased's layout; loads as transformers' BertTokenizer.

    The vocab is built here rather than by tokenizers' WordPieceTrainer: that trainer breaks ties in
    Rust hash-map order, so its vocab changed from process to process (and with it every tiny model's
    inputs). Specials, then every character (alone and as a ##continuation), then the most frequent
    words (ties by spelling): every word still splits into known pieces.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word
        for line in tokenizer_corpus(seed)
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    )
    chars = sorted({char for word in words for char in word})
    vocab = [*BERT_SPECIALS, *chars, *(f"##{char}" for char in chars)]
    frequent = sorted((word for word in words if len(word) > 1), key=lambda word: (-words[word], word))
    vocab += frequent[: max(0, vocab_size - len(vocab))]
    (out_dir / "vocab.txt").write_text("".join(f"{token}\n" for token in vocab))
    return load_saved_tokenizer(out_dir, {"tokenizer_class": "BertTokenizer", "do_lower_case": True})


def train_byte_level_bpe(out_dir: Path, vocab_size: int, seed: int):
    """Byte-level BPE in roberta-base's layout; loads as transformers' RobertaTokenizer."""
    train_byte_level_bpe_vocab(out_dir, tokenizer_corpus(seed), vocab_size, ROBERTA_SPECIALS)
    return load_saved_tokenizer(out_dir, {"tokenizer_class": "RobertaTokenizer"})


def train_sentencepiece(out_dir: Path, vocab_size: int, seed: int):
    """Unigram sentencepiece in bert_for_seq_generation's layout (pad 0, eos 1, bos 2, unk 3)."""
    train_unigram_sentencepiece(out_dir, tokenizer_corpus(seed), vocab_size, pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    return load_saved_tokenizer(out_dir, {"tokenizer_class": "BertGenerationTokenizer"})


TOKENIZER_BUILDERS = {
    "bert2bert": train_wordpiece,
    "roberta2roberta": train_byte_level_bpe,
    "bertgeneration": train_sentencepiece,
}


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class _Layout:
    """A kind's config class and special tokens (decoder start, eos, pad), as its real checkpoints have them."""

    config_class: str
    decoder_start: str
    eos: str
    pad: str
    position_offset: int = 0  # RoBERTa's position table starts at padding_idx + 1


LAYOUTS = {
    "bert2bert": _Layout("BertConfig", decoder_start="[CLS]", eos="[SEP]", pad="[PAD]"),
    "roberta2roberta": _Layout("RobertaConfig", decoder_start="<s>", eos="</s>", pad="<pad>", position_offset=2),
    "bertgeneration": _Layout("BertGenerationConfig", decoder_start="<s>", eos="</s>", pad="<pad>"),
}


def _random_model(kind: str, tokenizer, shape: TinyEncoderDecoderShape, seed: int):
    import torch
    import transformers
    from transformers import EncoderDecoderConfig, EncoderDecoderModel, GenerationConfig

    layout = LAYOUTS[kind]
    start, eos, pad = (tokenizer.convert_tokens_to_ids(t) for t in (layout.decoder_start, layout.eos, layout.pad))
    config_class = getattr(transformers, layout.config_class)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.max_position_embeddings + layout.position_offset,
        initializer_range=shape.init_std,
        hidden_act="gelu",
        pad_token_id=pad,
        bos_token_id=start,
        eos_token_id=eos,
    )
    encoder = config_class(num_hidden_layers=shape.encoder_layers, **common)
    decoder = config_class(num_hidden_layers=shape.decoder_layers, is_decoder=True, add_cross_attention=True, **common)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        encoder, decoder, decoder_start_token_id=start, pad_token_id=pad, eos_token_id=eos,
        tie_encoder_decoder=shape.tie_encoder_decoder,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = EncoderDecoderModel(config=config).eval()
    _input_dependent(model, eos, shape)
    if shape.tie_encoder_decoder:
        tie_decoder_to_encoder(model)
    model.generation_config = GenerationConfig(
        num_beams=4, max_length=24, length_penalty=0.8, no_repeat_ngram_size=3, early_stopping=True,
        decoder_start_token_id=start, bos_token_id=start, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip
    return model


def _input_dependent(model, eos: int, shape: TinyEncoderDecoderShape) -> None:
    """exporter/tiny/kit.py's sharpening, for an EncoderDecoderModel of BERT-like stacks."""
    cross = [layer.crossattention.self for layer in model.decoder.base_model.encoder.layer]
    parts = TinyModelParts(
        embeddings=[model.encoder.get_input_embeddings().weight, model.decoder.get_input_embeddings().weight],
        cross_attention=[(attn.query.weight, attn.key.weight) for attn in cross],
        eos_logit_bias=model.decoder.get_output_embeddings().bias,
        eos_token_id=eos,
        positions=[model.decoder.base_model.embeddings.position_embeddings.weight],
    )
    make_outputs_input_dependent(parts, shape.eos_logit_bias, shape.cross_attention_gain, shape.position_gain)


def tie_decoder_to_encoder(model) -> None:
    """What transformers 4.x did for tie_encoder_decoder=True: every decoder weight that has an encoder
    counterpart of the same name (embeddings, self-attention, feed-forward) *is* the encoder's.

    transformers 5.x no longer ties them (the flag is ignored); checkpoints saved that way hold both
    copies, equal, which is what 5.x then loads.
    """
    import torch

    encoder = dict(model.encoder.named_parameters())
    with torch.no_grad():
        for name, param in model.decoder.base_model.named_parameters():
            if name in encoder and encoder[name].shape == param.shape:
                param.copy_(encoder[name])
