"""tiny-bart: a small random BART with bart-large-cnn's layout, built locally and offline.

Byte-level BPE in BART's token layout (<s> 0, <pad> 1, </s> 2, <unk> 3) trained on the spot, loaded
as transformers' BartTokenizer; the model starts decoding with </s>, forces <s> next (bart-large-cnn's
forced_bos_token_id; `forced_bos=False` leaves it out) and </s> last, and searches with
bart-large-cnn's generation settings at tiny lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..progress import log
from .kit import bart_lineage_parts, make_outputs_input_dependent
from .text import load_saved_tokenizer, tokenizer_corpus, train_byte_level_bpe_vocab

BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@dataclass(frozen=True)
class TinyBartShape:
    """Sizes and layout choices of a small random BART; the defaults are tiny-bart."""

    d_model: int = 64
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_dim: int = 128
    max_position_embeddings: int = 64
    vocab_size: int = 400  # what the tokenizer is trained to
    scale_embedding: bool = False  # bart-large-cnn: False
    tie_embeddings: bool = True  # bart-large-cnn ties the LM head to the embeddings
    forced_bos: bool = True  # bart-large-cnn forces <s> after the decoder start
    init_std: float = 0.3  # larger than 0.02 so that outputs depend on the input
    eos_logit_bias: float = (
        9.0  # a tied random decoder repeats a token: a strong EOS bias ends hypotheses at varied lengths
    )
    cross_attention_gain: float = 3.0  # sharper cross-attention: tokens depend on the input
    min_length: int = 6  # bart-large-cnn's generation config asks for at least 56 tokens: 6 at tiny lengths


def train_bart_tokenizer(out_dir: Path, vocab_size: int, seed: int, lines: list[str] | None = None, **config):
    """Byte-level BPE in BART's layout, trained on lines (default: the tiny corpus of seed); loads as
    transformers' BartTokenizer. config: more of tokenizer_config.json (model_max_length, ...)."""
    train_byte_level_bpe_vocab(out_dir, tokenizer_corpus(seed) if lines is None else lines, vocab_size, BART_SPECIALS)
    return load_saved_tokenizer(out_dir, {"tokenizer_class": "BartTokenizer", **config})


# BART's special tokens, and bart-large-cnn's decoding: start with </s>, force <s> next and </s> last
BART_TOKEN_IDS = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
TRAINED_VOCAB_MARGIN = 100  # byte-level BPE spends ~256 ids on bytes: more ids than sentencepiece for words


def untrained_for_task(folder: Path, lines: list[str], sizes):
    """(model, tokenizer) to train on a task whose text is `lines` (exporter/tiny/trained.py): a tied
    BART of `sizes` (d_model, heads, layers, ffn_dim, max_position_embeddings, spm_vocab_size), no
    dropout, forcing <s> first as bart-large-cnn, with a byte-level BPE tokenizer trained on lines."""
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    folder.mkdir(parents=True)
    vocab_size = sizes.spm_vocab_size + TRAINED_VOCAB_MARGIN
    tokenizer = train_bart_tokenizer(folder, vocab_size, 0, lines, model_max_length=sizes.max_position_embeddings)
    token_ids = dict(**BART_TOKEN_IDS, forced_bos_token_id=0)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=sizes.d_model, encoder_layers=sizes.encoder_layers,
        decoder_layers=sizes.decoder_layers, encoder_attention_heads=sizes.heads, decoder_attention_heads=sizes.heads,
        encoder_ffn_dim=sizes.ffn_dim, decoder_ffn_dim=sizes.ffn_dim,
        max_position_embeddings=sizes.max_position_embeddings, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, tie_word_embeddings=True, **token_ids,
    )  # fmt: skip
    model = BartForConditionalGeneration(config)
    model.generation_config = GenerationConfig(num_beams=4, max_length=40, **token_ids)
    return model, tokenizer


def save_task_checkpoint(model, tokenizer, folder: Path) -> None:
    """untrained_for_task's model, trained, saved in folder (its tokenizer files are there already)."""
    model.save_pretrained(folder)


def build_tiny_bart(out_dir: Path, shape: TinyBartShape = TinyBartShape(), seed: int = 0) -> Path:
    """Save a small random BartForConditionalGeneration and its tokenizer to out_dir."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"building tiny-bart in {out_dir} (tokenizer trained on the spot)")
    tokenizer = train_bart_tokenizer(out_dir, shape.vocab_size, seed)
    forced_bos = dict(forced_bos_token_id=0) if shape.forced_bos else {}
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=shape.d_model, encoder_layers=shape.encoder_layers,
        decoder_layers=shape.decoder_layers, encoder_attention_heads=shape.heads, decoder_attention_heads=shape.heads,
        encoder_ffn_dim=shape.ffn_dim, decoder_ffn_dim=shape.ffn_dim,
        max_position_embeddings=shape.max_position_embeddings, scale_embedding=shape.scale_embedding,
        tie_word_embeddings=shape.tie_embeddings, init_std=shape.init_std, activation_function="gelu",
        **BART_TOKEN_IDS, **forced_bos,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config).eval()
    make_outputs_input_dependent(bart_lineage_parts(model), shape.eos_logit_bias, shape.cross_attention_gain)
    # bart-large-cnn's search (4 beams, length penalty 2, no 3-gram repeats, early stopping) at tiny lengths
    model.generation_config = GenerationConfig(
        num_beams=4, max_length=32, min_length=shape.min_length, length_penalty=2.0, no_repeat_ngram_size=3, early_stopping=True,
        **BART_TOKEN_IDS, **forced_bos,
    )  # fmt: skip
    model.save_pretrained(out_dir)
    return out_dir
