"""The tokenizer of an export: one `tokenizer.json` (tokenizers library) that the runtime runs.

Most tokenizers in transformers 5.x are tokenizers-backed, so their own tokenizer.json is copied.
A few are still sentencepiece-backed ("slow": BertGenerationTokenizer); those are converted with
transformers' own converter (one transformers does not register comes from the family:
Family.tokenizer_converters), their special tokens registered as tokenizers special tokens (so that
they are split off when typed in a text and skipped when decoding, as the slow tokenizer does), and
the manifest records that the slow tokenizer strips the decoded text. The rules it must keep are the
tokenizer contract of exporter/families/base.py, checked on every export (check_tokenizer_contract).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..graphs.manifest import TokenizerInfo
from ..runtime.tokenizer import TextTokenizer
from .errors import SourceError
from .families.base import DEFAULT_TOKENIZER_FILES, check_tokenizer_contract

TOKENIZER_FILE = "tokenizer.json"
# Texts the export's tokenizer.json must encode and decode as the checkpoint's tokenizer does (the
# tokenizer contract): words, casing, digits, punctuation runs, accents, a dash.
CONTRACT_TEXTS = [
    "The city council said the bridge will open next year.",
    "Zürich and São Paulo — café, naïve: 100 km/h, 3.5% (est. 2030)!?",
    "a  b, c... d; e",
]


class MissingTokenizerError(SourceError):
    """The checkpoint folder holds no tokenizer files: the export would have no tokenizer to ship."""


def check_tokenizer_files(
    checkpoint: Path, vocabularies: tuple[tuple[str, ...], ...] = DEFAULT_TOKENIZER_FILES
) -> None:
    """Refuse a checkpoint without tokenizer files by name (transformers fails deep inside a tokenizer class).

    vocabularies: groups of files, each a complete vocabulary (the family's Family.tokenizer_files)."""
    if not any(all((Path(checkpoint) / name).is_file() for name in group) for group in vocabularies):
        wanted = "; ".join(" with ".join(group) for group in vocabularies)
        raise MissingTokenizerError(
            f"{checkpoint} has no tokenizer files (one of: {wanted}): save the tokenizer there too "
            f"(tokenizer.save_pretrained(DIR))"
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
    info = TokenizerInfo(
        file=TOKENIZER_FILE,
        model_max_length=model_max_length,
        add_special_tokens=add_special_tokens,
        clean_up_tokenization_spaces=bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        # the slow tokenizers' convert_tokens_to_string ends with str.strip()
        strip_decoded_text=sentencepiece_backed,
    )
    runtime = TextTokenizer(staging, info, pad_token_id=0)  # the pad id plays no part in the contract
    check_tokenizer_contract(tokenizer, runtime, CONTRACT_TEXTS, add_special_tokens)
    return info


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
    for _, token in sorted(tokenizer.added_tokens_decoder.items()):  # in id order: each keeps its id
        added = AddedToken(token.content, special=token.content in special, normalized=False)
        converted.add_special_tokens([added]) if added.special else converted.add_tokens([added])
    for token in sorted(special - {t.content for t in tokenizer.added_tokens_decoder.values()}):
        converted.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return converted
