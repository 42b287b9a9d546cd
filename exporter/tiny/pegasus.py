"""Small random Pegasus models built locally, offline, with their own sentencepiece tokenizer.

``tiny-pegasus`` is the embedded default of the main job: a real checkpoint folder
(save_pretrained) that goes through exactly the same export path as a hub checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..progress import log
from .kit import bart_lineage_parts, make_outputs_input_dependent
from .text import synthetic_corpus, train_unigram_sentencepiece


def train_pegasus_sentencepiece(out_dir: Path, vocab_size: int = 400, seed: int = 0) -> Path:
    """Train a unigram sentencepiece model with Pegasus' special-token ids; returns spiece.model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = synthetic_corpus(4000, seed)
    return train_unigram_sentencepiece(out_dir, lines, vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)


@dataclass(frozen=True)
class TinyPegasusShape:
    """Sizes of a small random Pegasus; the defaults are tiny-pegasus, the main job's model."""

    d_model: int = 64
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_dim: int = 128
    extra_vocab: int = 0  # model vocab beyond the tokenizer's (allowed by Pegasus, exercises odd sizes)
    max_position_embeddings: int = 256
    init_std: float = 0.3  # larger than 0.02 so that outputs depend on the input (no near-uniform logits)
    eos_logit_bias: float = 3.0  # makes hypotheses end at varied lengths (exercises finished beams)
    # Pegasus ties the LM head to the embeddings; a random tied model repeats its last token forever,
    # so the tiny default is untied (both layouts export the same way).
    tie_embeddings: bool = False


def build_tiny_pegasus(out_dir: Path, shape: TinyPegasusShape = TinyPegasusShape(), seed: int = 0) -> Path:
    """Save a small random Pegasus (and its tokenizer) to out_dir, as save_pretrained would."""
    import torch
    from transformers import GenerationConfig, PegasusForConditionalGeneration

    out_dir = Path(out_dir)
    log(f"building tiny-pegasus in {out_dir} (sentencepiece trained on the spot)")
    spiece = train_pegasus_sentencepiece(out_dir / "_spm", seed=seed)
    tokenizer = pegasus_tokenizer_from_spiece(spiece, shape.max_position_embeddings)
    config = small_pegasus_config(
        shape,
        vocab_size=len(tokenizer) + shape.extra_vocab,
        init_std=shape.init_std,
        tie_word_embeddings=shape.tie_embeddings,
    )
    torch.manual_seed(seed)
    model = PegasusForConditionalGeneration(config).eval()
    make_outputs_input_dependent(bart_lineage_parts(model), shape.eos_logit_bias)
    model.generation_config = GenerationConfig(num_beams=4, max_length=32, length_penalty=0.6, **PEGASUS_TOKEN_IDS)
    save_pegasus_checkpoint(model, tokenizer, spiece, out_dir)
    return out_dir


def untrained_for_task(folder: Path, lines: list[str], sizes):
    """(model, tokenizer) to train on a task whose text is `lines` (exporter/tiny/trained.py): a tied
    Pegasus of `sizes` (d_model, heads, layers, ffn_dim, max_position_embeddings, spm_vocab_size), no
    dropout, with a sentencepiece tokenizer trained on lines in folder/_spm."""
    from transformers import GenerationConfig, PegasusForConditionalGeneration

    (folder / "_spm").mkdir(parents=True)
    spiece = train_unigram_sentencepiece(
        folder / "_spm", lines, sizes.spm_vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1
    )
    tokenizer = pegasus_tokenizer_from_spiece(spiece, sizes.max_position_embeddings)
    config = small_pegasus_config(
        sizes,
        vocab_size=len(tokenizer),
        dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=True,  # as Pegasus: the LM head is the embedding matrix
    )
    model = PegasusForConditionalGeneration(config)
    model.generation_config = GenerationConfig(num_beams=4, max_length=40, length_penalty=1.0, **PEGASUS_TOKEN_IDS)
    return model, tokenizer


def save_task_checkpoint(model, tokenizer, folder: Path) -> None:
    """untrained_for_task's model, trained, saved as a Pegasus checkpoint in folder."""
    save_pegasus_checkpoint(model, tokenizer, folder / "_spm" / "spiece.model", folder)


# Pegasus' special-token layout: pad 0 (also the decoder start), EOS 1, forced as the last token.
PEGASUS_TOKEN_IDS = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1)


def small_pegasus_config(sizes, vocab_size: int, **extra):
    """A PegasusConfig with Pegasus' layout (relu, scaled embeddings, its token ids) at small sizes.

    sizes: anything with d_model, heads, encoder_layers, decoder_layers, ffn_dim, max_position_embeddings.
    """
    from transformers import PegasusConfig

    return PegasusConfig(
        vocab_size=vocab_size,
        d_model=sizes.d_model,
        encoder_layers=sizes.encoder_layers,
        decoder_layers=sizes.decoder_layers,
        encoder_attention_heads=sizes.heads,
        decoder_attention_heads=sizes.heads,
        encoder_ffn_dim=sizes.ffn_dim,
        decoder_ffn_dim=sizes.ffn_dim,
        max_position_embeddings=sizes.max_position_embeddings,
        activation_function="relu",
        scale_embedding=True,
        **PEGASUS_TOKEN_IDS,
        **extra,
    )


def save_pegasus_checkpoint(model, tokenizer, spiece: Path, out_dir: Path) -> None:
    """save_pretrained of model and tokenizer, plus spiece.model as real Pegasus checkpoints ship it;
    the sentencepiece training folder is removed."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.copy(spiece, Path(out_dir) / "spiece.model")
    shutil.rmtree(spiece.parent)


def pegasus_tokenizer_from_spiece(spiece: Path, model_max_length: int):
    """transformers 5.x builds Pegasus' tokenizer from a folder with spiece.model and a config naming it."""
    import json

    from transformers import AutoTokenizer

    folder = spiece.parent
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PegasusTokenizer", "model_max_length": model_max_length})
    )
    return AutoTokenizer.from_pretrained(str(folder))
