"""Step 1 of `make legacy-golden` (ortseq's venv): the tiny models' tokenizer files, one folder per kind.

The fixtures' writer (make_fixtures.py, in a transformers 4.x venv without ortseq's dependencies)
loads these with its own AutoTokenizer and saves them with its own save_pretrained, so the
committed tokenizer files are written by 4.x too. Usage: python tokenizer_files.py OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ortseq.exporter.tiny.bart import train_bart_tokenizer
from ortseq.exporter.tiny.encoder_decoder import train_byte_level_bpe, train_wordpiece
from ortseq.exporter.tiny.pegasus import pegasus_tokenizer_from_spiece
from ortseq.exporter.tiny.text import (
    load_saved_tokenizer,
    synthetic_corpus,
    tokenizer_corpus,
    train_unigram_sentencepiece,
)

VOCAB_SIZE = 300  # small vocabularies keep the committed fixtures small
# no normalizer table in the sentencepiece models: it alone is ~240 KB per tokenizer file
SMALL = dict(normalization_rule_name="identity")


def main(out: Path) -> None:
    spm = out / "_spm"
    spm.mkdir(parents=True)
    lines = synthetic_corpus(4000, 0)
    spiece = train_unigram_sentencepiece(spm, lines, VOCAB_SIZE, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, **SMALL)
    pegasus_tokenizer_from_spiece(spiece, 64).save_pretrained(out / "pegasus")
    shutil.copy(spiece, out / "pegasus" / "spiece.model")
    shutil.rmtree(spm)
    generation = out / "bertgeneration"
    generation.mkdir()
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    train_unigram_sentencepiece(generation, tokenizer_corpus(0), VOCAB_SIZE, **ids, **SMALL)
    load_saved_tokenizer(generation, {"tokenizer_class": "BertGenerationTokenizer"})
    for kind, train in (("bert2bert", train_wordpiece), ("roberta2roberta", train_byte_level_bpe)):
        (out / kind).mkdir()
        train(out / kind, VOCAB_SIZE, 0)
    (out / "bart").mkdir()
    train_bart_tokenizer(out / "bart", VOCAB_SIZE, 0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
