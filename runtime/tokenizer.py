"""Text <-> ids with the tokenizers library, exactly as transformers' tokenizer does it.

The export directory holds the `tokenizer.json` that transformers itself runs (its tokenizers
backend), so encoding is the same code on the same file; decoding adds transformers' optional
clean-up of spaces before punctuation.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from ..graphs.manifest import ManifestError, TokenizerInfo

logger = logging.getLogger("ortseq")


class TextTokenizer:
    """Thread-safe: the tokenizers object keeps its truncation setting as mutable state, and mutating it
    while another thread encodes or decodes fails ("Already borrowed"), so every use takes one lock.

    The file is read on first use, not when the model loads: a caller that passes token ids never needs
    it, and the library and a real vocabulary's tables (5 MiB resident with a 500-token file, tens of MB
    with a 96k one) would add to the peak of every id-only process (docs/benchmarks.md). The server reads
    it at start-up, with its warm-up request."""

    def __init__(self, directory: Path, info: TokenizerInfo, pad_token_id: int):
        self.path = Path(directory) / info.file
        if not self.path.is_file():
            raise ManifestError(f"{self.path} is missing: the export has no tokenizer file; export again")
        self._tokenizer = None
        self._lock = threading.Lock()
        self.info = info
        self.pad_token_id = pad_token_id
        self._warned_truncation = False

    def read(self) -> None:
        """Read the file now, not at the first text: a server does at start-up, so that a bad file fails
        there (ManifestError) and not at its first request."""
        with self._lock:
            self._backend()

    def _backend(self):
        """The tokenizers object, read from the file the first time (the caller holds the lock)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            try:
                tokenizer = Tokenizer.from_file(str(self.path))
            except Exception as exc:  # the tokenizers library raises plain Exception for every malformed file
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ManifestError(
                    f"{self.path} is not a tokenizer file tokenizers can read ({reason}); export again"
                ) from exc
            tokenizer.no_padding()
            self._tokenizer = tokenizer
        return self._tokenizer

    def encode(self, texts: list[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Batch-encode, right-padded with the pad id; over-long texts are cut to max_length tokens
        the way transformers' truncation=True cuts them (room kept for the special tokens)."""
        return self.pad(self.token_ids(texts, max_length or self.info.model_max_length))

    def token_ids(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """The ids of each text; with max_length, over-long texts are truncated (one warning), without, never."""
        with self._lock:
            tokenizer = self._backend()
            if max_length is None:
                tokenizer.no_truncation()
            else:
                tokenizer.enable_truncation(max_length)
            encodings = tokenizer.encode_batch(texts, add_special_tokens=self.info.add_special_tokens)
        if any(encoding.overflowing for encoding in encodings) and not self._warned_truncation:
            logger.warning("an input was longer than %d tokens: truncated to the model's maximum", max_length)
            self._warned_truncation = True
        return [encoding.ids for encoding in encodings]

    def pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask of rows of ids, right-padded with the pad id to the longest."""
        width = max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = row
            attention_mask[index, : len(row)] = 1
        return input_ids, attention_mask

    def token_id(self, token: str) -> int | None:
        """The id of a token of the vocabulary (added and special tokens included), None if it has none."""
        with self._lock:
            return self._backend().token_to_id(token)

    def decode(self, ids: np.ndarray) -> list[str]:
        with self._lock:
            texts = self._backend().decode_batch([list(map(int, row)) for row in ids], skip_special_tokens=True)
        if self.info.strip_decoded_text:  # before the clean-up, in the order transformers' slow tokenizers do it
            texts = [text.strip() for text in texts]
        if self.info.clean_up_tokenization_spaces:
            texts = [_clean_up_tokenization(text) for text in texts]
        return texts


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and common contractions."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text
