"""tiny-marian: a small random MarianMTModel in opus-mt's layout, built locally and offline.

Its tokenizer is opus-mt's kind: a unigram sentencepiece model trained on the spot, saved as both
source.spm and target.spm, with vocab.json numbering the pieces as Marian does (</s> 0, <unk> 1, the
pieces, <pad> last: not the sentencepiece ids), loaded as transformers' MarianTokenizer. The model
starts decoding with <pad>, never generates it (opus-mt's bad_words_ids), and ties its LM head to the
one embedding table.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..progress import log
from .kit import bart_lineage_parts, make_outputs_input_dependent
from .text import tokenizer_corpus, train_unigram_sentencepiece


@dataclass(frozen=True)
class TinyMarianShape:
    d_model: int = 64
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_dim: int = 128
    max_position_embeddings: int = 64
    spm_vocab_size: int = 400
    init_std: float = 0.3  # larger than 0.02 so that outputs depend on the input
    eos_logit_bias: float = 7.5  # a tied random decoder repeats a token: an EOS bias ends hypotheses at varied lengths


def build_tiny_marian(out_dir: Path, shape: TinyMarianShape = TinyMarianShape(), seed: int = 0) -> Path:
    import torch
    from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"building tiny-marian in {out_dir} (sentencepiece trained on the spot)")
    tokenizer = _marian_tokenizer(out_dir, shape, seed, MarianTokenizer)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    token_ids = dict(pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad, forced_eos_token_id=eos)
    config = MarianConfig(
        vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), d_model=shape.d_model,
        encoder_layers=shape.encoder_layers, decoder_layers=shape.decoder_layers,
        encoder_attention_heads=shape.heads, decoder_attention_heads=shape.heads, encoder_ffn_dim=shape.ffn_dim,
        decoder_ffn_dim=shape.ffn_dim, max_position_embeddings=shape.max_position_embeddings,
        activation_function="swish", scale_embedding=True, share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True, init_std=shape.init_std, **token_ids,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    make_outputs_input_dependent(bart_lineage_parts(model), shape.eos_logit_bias)
    model.generation_config = GenerationConfig(num_beams=4, max_length=32, bad_words_ids=[[pad]], **token_ids)
    model.save_pretrained(out_dir)
    return out_dir


def _marian_tokenizer(out_dir: Path, shape: TinyMarianShape, seed: int, tokenizer_class):
    spm_dir = out_dir / "_spm"
    spm_dir.mkdir()
    spiece = train_unigram_sentencepiece(
        spm_dir, tokenizer_corpus(seed), shape.spm_vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1
    )
    for name in ("source.spm", "target.spm"):
        shutil.copy(spiece, out_dir / name)
    shutil.rmtree(spm_dir)
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(out_dir / "source.spm"))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = ["</s>", "<unk>", *(piece for piece in pieces if piece not in ("<unk>", "<s>", "</s>")), "<pad>"]
    (out_dir / "vocab.json").write_text(json.dumps({piece: index for index, piece in enumerate(vocab)}))
    tokenizer = tokenizer_class(
        str(out_dir / "source.spm"), str(out_dir / "target.spm"), str(out_dir / "vocab.json"),
        model_max_length=shape.max_position_embeddings,
    )  # fmt: skip
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer_class.from_pretrained(str(out_dir))
