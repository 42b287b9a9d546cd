"""Marian (MarianMTModel): the translation models of Marian NMT (Helsinki-NLP/opus-mt-*), a BART relative.

MarianFamily states only what differs from BART (exporter/families/bart.py): sinusoidal positions (a
table computed from the config, no offset, never saved), no layernorm_embedding, post-LayerNorm layers
as BART's, embeddings scaled by embed_scale outside the embedding module; its decoder starts with the
pad token (its configs say so). Its tokenizer ships as source.spm and target.spm (sentencepiece models
of the source and target texts) with vocab.json (the ids of both), and is sentencepiece-backed in
transformers: MarianConverter below makes the one tokenizer.json of the tokenizer contract
(exporter/families/base.py) from source.spm with vocab.json's ids. One tokenizer.json decodes the
target text only if target.spm has source.spm's pieces: other checkpoints are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from ..tiny.marian import build_tiny_marian
from .bart import BartFamily, Layout
from .base import UnsupportedModelError

MARIAN_LAYOUT = Layout(
    sinusoidal_positions=True,
    position_offset=0,
    embedding_layer_norm=False,
    pre_layer_norm=False,
    final_layer_norm=False,
    scale_outside_embedding=True,
)


class MarianFamily(BartFamily):
    """Marian (MarianMTModel) with one vocabulary for both sides (share_encoder_decoder_embeddings)."""

    name: ClassVar[str] = "marian"
    aliases: ClassVar[dict[str, str]] = {
        "opus-mt-en-de": "Helsinki-NLP/opus-mt-en-de",
        "tiny-marian": "tiny:marian",
    }
    model_type: ClassVar[str] = "marian"
    model_class: ClassVar[str] = "MarianMTModel"
    layout: ClassVar[Layout] = MARIAN_LAYOUT
    trained_tiny_kinds: ClassVar[tuple[str, ...]] = ()

    def tokenizer_files(self) -> tuple[tuple[str, ...], ...]:
        return (("source.spm", "target.spm", "vocab.json"),)

    def tokenizer_converters(self) -> dict[str, type]:
        return {"MarianTokenizer": marian_converter()}

    def tiny_builders(self) -> dict[str, Callable[[Path], Path]]:
        return {"marian": build_tiny_marian}


def marian_converter() -> type:
    """transformers has no tokenizers converter for MarianTokenizer: source.spm's pieces and scores, at
    vocab.json's ids, </s> appended as the slow tokenizer's build_inputs_with_special_tokens does."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    class MarianConverter(SpmConverter):
        def __init__(self, tokenizer):  # noqa: D107 (SpmConverter reads a `vocab_file`, Marian has two)
            self.original_tokenizer = tokenizer
            _check_one_vocabulary(tokenizer)
            self.proto = import_protobuf().ModelProto()
            self.proto.ParseFromString(Path(tokenizer.spm_files[0]).read_bytes())

        def vocab(self, proto):
            scores = {piece.piece: piece.score for piece in proto.pieces}
            unused = min(scores.values()) - 100.0  # vocab.json's pieces source.spm lacks: chosen by nothing
            by_id = sorted(self.original_tokenizer.encoder.items(), key=lambda item: item[1])
            if [token_id for _, token_id in by_id] != list(range(len(by_id))):
                raise UnsupportedModelError("MarianTokenizer: vocab.json's ids are not 0..n-1")
            return [(piece, scores.get(piece, unused)) for piece, _ in by_id]

        def unk_id(self, proto):
            return self.original_tokenizer.encoder[self.original_tokenizer.unk_token]

        def post_processor(self):
            eos = self.original_tokenizer.eos_token
            return processors.TemplateProcessing(
                single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, self.original_tokenizer.eos_token_id)]
            )

    return MarianConverter


def _check_one_vocabulary(tokenizer) -> None:
    """Refuse what one tokenizer.json cannot be: two vocabularies, language codes, differing spm models."""
    if tokenizer.separate_vocabs:
        raise UnsupportedModelError("MarianTokenizer with separate source and target vocabularies is not supported")
    if getattr(tokenizer, "supported_language_codes", []):
        raise UnsupportedModelError("multilingual Marian (>>lang<< codes in the text) is not supported")
    source, target = ({piece for piece in _pieces(path)} for path in tokenizer.spm_files)
    if source != target:
        raise UnsupportedModelError(
            f"source.spm and target.spm differ ({len(source ^ target)} pieces): one tokenizer.json cannot decode "
            f"the target text as target.spm does"
        )


def _pieces(path: str) -> list[str]:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    return [processor.id_to_piece(index) for index in range(processor.get_piece_size())]
