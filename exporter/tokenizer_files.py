"""The tokenizer of an export: one `tokenizer.json` (tokenizers library) that the runtime runs.

Most tokenizers in transformers 5.x are tokenizers-backed, so their own tokenizer.json is copied.
A few are still sentencepiece-backed ("slow": BertGenerationTokenizer); those are converted with
transformers' own converter (one transformers does not register comes from the family:
Family.tokenizer_converters), their special tokens registered as tokenizers special tokens (so that
they are split off when typed in a text and skipped when decoding, as the slow tokenizer does), and
the manifest records that the slow tokenizer strips the decoded text.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..graphs.manifest import TokenizerInfo
from .errors import SourceError

TOKENIZER_FILE = "tokenizer.json"
# Files any one of which holds a vocabulary transformers can build a tokenizer from (tokenizers'
# own file; sentencepiece models; WordPiece; byte-level BPE, which also needs merges.txt).
VOCABULARY_FILES = (
    "tokenizer.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
)


class MissingTokenizerError(SourceError):
    """The checkpoint folder holds no tokenizer files: the export would have no tokenizer to ship."""


def check_tokenizer_files(checkpoint: Path) -> None:
    """Refuse a checkpoint without tokenizer files by name (transformers fails deep inside a tokenizer class)."""
    present = [name for name in VOCABULARY_FILES if (Path(checkpoint) / name).is_file()]
    if present == ["vocab.json"] and not (Path(checkpoint) / "merges.txt").is_file():
        present = []
    if not present:
        raise MissingTokenizerError(
            f"{checkpoint} has no tokenizer files (one of {', '.join(VOCABULARY_FILES)}; vocab.json with "
            f"merges.txt): save the tokenizer there too (tokenizer.save_pretrained(DIR))"
        )


def save_tokenizer(
    checkpoint: Path,
    staging: Path,
    max_positions: int,
    add_special_tokens: bool,
    converters: dict[str, type] | None = None,
) -> TokenizerInfo:
    """Write tokenizer.json for the runtime; returns how the runtime must use it.

    converters: slow-to-fast converters beyond transformers' registered ones (the family's
    Family.tokenizer_converters), by tokenizer class name."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    sentencepiece_backed = not getattr(tokenizer, "is_fast", True)
    if sentencepiece_backed:
        _converted_sentencepiece(tokenizer, converters or {}).save(str(staging / TOKENIZER_FILE))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            if not (Path(tmp) / TOKENIZER_FILE).is_file():
                raise ValueError(f"{checkpoint}: the tokenizer has no tokenizers-library form (tokenizer.json)")
            shutil.copy(Path(tmp) / TOKENIZER_FILE, staging / TOKENIZER_FILE)
    model_max_length = tokenizer.model_max_length
    if not isinstance(model_max_length, int) or model_max_length > max_positions:
        model_max_length = max_positions  # transformers uses a huge sentinel when the checkpoint says nothing
    return TokenizerInfo(
        file=TOKENIZER_FILE,
        model_max_length=model_max_length,
        add_special_tokens=add_special_tokens,
        clean_up_tokenization_spaces=bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        # the slow tokenizers' convert_tokens_to_string ends with str.strip()
        strip_decoded_text=sentencepiece_backed,
    )


def _converted_sentencepiece(tokenizer, extra_converters: dict[str, type]):
    """tokenizers.Tokenizer equivalent of a sentencepiece-backed transformers tokenizer."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SLOW_TO_FAST_CONVERTERS

    converters = {**extra_converters, **SLOW_TO_FAST_CONVERTERS}
    name = type(tokenizer).__name__
    if name not in converters:
        raise ValueError(f"{name} is sentencepiece-backed and transformers has no tokenizers converter for it")
    converted = converters[name](tokenizer).converted()
    special = set(tokenizer.all_special_tokens)
    for token_id, token in sorted(tokenizer.added_tokens_decoder.items()):
        added = AddedToken(token.content, special=token.content in special, normalized=False)
        converted.add_special_tokens([added]) if added.special else converted.add_tokens([added])
        if converted.token_to_id(token.content) != token_id:
            raise ValueError(f"{name}: added token {token.content!r} got another id than {token_id}")
    for token in sorted(special - {t.content for t in tokenizer.added_tokens_decoder.values()}):
        converted.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return converted
