"""Synthetic text, and tokenizers trained on it on the spot: what every tiny model's tokenizer is made of."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

# Words of the synthetic corpus every tiny tokenizer is trained on.
_WORDS = (
    "the a of to and in is was for on that with as by at from his her it an are were which be this has had "
    "have not but its their they he she who one new after first been also more two than other year years "
    "when would there into over only city government people team time world state school company season "
    "river music film game war party church police court report council market water energy village "
    "summary article study research minister president election museum station island bridge festival "
    "said says will can may could should made make found found announced reported expected increased"
).split()


def synthetic_corpus(num_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 30))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(1, 2030)))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(["café", "naïve", "Zürich", "São", "—", "€5"]))
        lines.append(" ".join(words) + rng.choice([".", ".", "!", "?", ","]))
    return lines


def train_unigram_sentencepiece(out_dir: Path, lines: list[str], vocab_size: int, **special_ids: int) -> Path:
    """out_dir/spiece.model trained on lines, with the given pad/eos/unk/bos ids (-1: none)."""
    import sentencepiece as spm

    corpus = out_dir / "_corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out_dir / "spiece"),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **special_ids,
    )
    corpus.unlink()
    (out_dir / "spiece.vocab").unlink(missing_ok=True)
    return out_dir / "spiece.model"


def tokenizer_corpus(seed: int) -> list[str]:
    """Synthetic sentences plus every printable ASCII character, so that casing, digits and
    punctuation runs have pieces of their own (a tokenizer of nothing but <unk> tests little)."""
    alphabet = "".join(chr(c) for c in range(33, 127))
    return synthetic_corpus(4000, seed) + [" ".join(alphabet)] * 20 + [alphabet] * 20


def load_saved_tokenizer(out_dir: Path, tokenizer_config: dict):
    """Load the vocabulary files through AutoTokenizer and save the result as transformers writes it."""
    from transformers import AutoTokenizer

    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    staging = out_dir / "_tokenizer"
    tokenizer.save_pretrained(str(staging))
    for path in staging.iterdir():
        shutil.copy(path, out_dir / path.name)
    shutil.rmtree(staging)
    return AutoTokenizer.from_pretrained(str(out_dir))


def train_byte_level_bpe_vocab(out_dir: Path, lines: list[str], vocab_size: int, special_tokens: list[str]) -> None:
    """out_dir/vocab.json and merges.txt: byte-level BPE trained on lines, special_tokens first (ids 0, 1, ...)."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(lines, vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False)
    tokenizer.save_model(str(out_dir))
