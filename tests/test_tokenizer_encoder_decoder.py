"""The runtime tokenizer equals transformers 5.x's for the encoder-decoder tokenizer kinds:
uncased WordPiece (BertTokenizer), byte-level BPE (RobertaTokenizer), and SentencePiece
(BertGenerationTokenizer, still sentencepiece-backed in 5.x: the export converts it), with and
without special tokens, on ids, decoded text and truncation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from helpers import CORPUS

from ortseq.exporter.families.encoder_decoder import EncoderDecoderFamily
from ortseq.exporter.tiny.encoder_decoder import TOKENIZER_BUILDERS
from ortseq.exporter.tokenizer_files import save_tokenizer
from ortseq.runtime.tokenizer import TextTokenizer

MAX_POSITIONS = 64

EXTRA = [
    "Hello!!! What?!... WOW,,, (a) [b] {c} -- end... ;; :: \"quoted\" 'single'",
    "CamelCase UPPER lower MiXeD ÉCOLE straße İstanbul",
    "don't won't it's we're I'm they've a . b , c ! d ? e",
    "special-looking [CLS] [SEP] [PAD] [MASK] <s> </s> <pad> <unk> <mask> <::::> x",
    "numbers 3.14159 1,000,000 2026-11-21 #hashtag @user http://example.com/a?b=c",
    " x ",
    "\n\nnew lines\n",
]

# (tokenizer kind, extra tokenizer_config entries): bert-base-uncased's hub config asks for the
# clean-up of spaces before punctuation when decoding, so that path is checked too.
KINDS = {
    "wordpiece": ("bert2bert", {}),
    "wordpiece_clean_up": ("bert2bert", {"clean_up_tokenization_spaces": True}),
    "byte_level_bpe": ("roberta2roberta", {}),
    "sentencepiece": ("bertgeneration", {}),
}


@pytest.fixture(scope="module", params=list(KINDS))
def tokenizers(request, tmp_path_factory):
    """(transformers tokenizer, runtime TextTokenizer with special tokens, runtime one without)."""
    from transformers import AutoTokenizer

    kind, config = KINDS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    TOKENIZER_BUILDERS[kind](folder, 400, 3)
    if config:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    reference = AutoTokenizer.from_pretrained(str(folder))
    staging = tmp_path_factory.mktemp(request.param + "_export")
    converters = EncoderDecoderFamily().tokenizer_converters()
    info = save_tokenizer(folder, staging, MAX_POSITIONS, add_special_tokens=True, converters=converters)
    assert info.clean_up_tokenization_spaces == config.get("clean_up_tokenization_spaces", False)
    with_special = TextTokenizer(staging, info, reference.pad_token_id)
    without = TextTokenizer(staging, dataclasses.replace(info, add_special_tokens=False), reference.pad_token_id)
    return reference, with_special, without


def _ours(runtime: TextTokenizer, text: str, max_length: int = 10**6) -> list[int]:
    ids, mask = runtime.encode([text], max_length=max_length)
    return ids[0][mask[0] == 1].tolist()


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_and_text_match_transformers_tokenizer(tokenizers, add_special_tokens):
    reference, with_special, without = tokenizers
    runtime = with_special if add_special_tokens else without
    for text in CORPUS + EXTRA:
        ids = reference(text, add_special_tokens=add_special_tokens).input_ids
        assert _ours(runtime, text) == ids, text[:60]
        assert runtime.decode([ids]) == [reference.decode(ids, skip_special_tokens=True)], text[:60]


def test_decoding_any_ids_matches_transformers(tokenizers):
    """Generated ids are not the encoding of any text: special ids anywhere, word pieces that
    continue nothing, byte-level pieces that are not valid UTF-8 on their own."""
    reference, runtime, _ = tokenizers
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, len(reference), size=rng.integers(1, 40)).tolist()
        assert runtime.decode([ids]) == [reference.decode(ids, skip_special_tokens=True)], ids


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_truncation_matches_transformers(tokenizers, add_special_tokens):
    reference, with_special, without = tokenizers
    runtime = with_special if add_special_tokens else without
    text = "The river Bridge, café & Zürich! " * 200
    expected = reference(
        text, add_special_tokens=add_special_tokens, truncation=True, max_length=MAX_POSITIONS
    ).input_ids
    assert len(expected) == MAX_POSITIONS
    assert _ours(runtime, text, MAX_POSITIONS) == expected
