"""Seq2SeqModel: the public Python API of the runtime (no torch, no transformers)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ortseq.graphs.external_data import check_graph_data
from ortseq.graphs.manifest import LOOP_ENGINE, Manifest
from ortseq.runtime.engines import open_engine
from ortseq.runtime.errors import InvalidInputError
from ortseq.runtime.search import PROMPT_LEN, SearchSettings
from ortseq.runtime.sessions import EncoderDecoderSessions
from ortseq.runtime.tokenizer import TextTokenizer


class Seq2SeqModel:
    """An exported summarizer: `generate` works on token ids, `summarize` on texts."""

    def __init__(self, directory: Path, manifest: Manifest, engine, tokenizer: TextTokenizer):
        self.directory = directory
        self.manifest = manifest
        self.engine = engine  # runs the search: see runtime/engines.py
        self.tokenizer = tokenizer

    @classmethod
    def load(
        cls,
        directory: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        verify: bool = True,
        engine: str = LOOP_ENGINE,
    ):
        """Open an export directory. verify=True checks every file against its manifest sha256.
        engine: "loop" (ortseq's search, every setting) or "beam-search-op" (needs an export made
        with --beam-search-op; same tokens, refuses the settings its graph cannot honour)."""
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if verify:
            manifest.verify_files(directory)
        check_graph_data(directory, manifest)  # before onnxruntime opens any file a graph names
        tokenizer = TextTokenizer(directory, manifest.tokenizer, manifest.special_tokens.pad_token_id)
        search_engine = open_engine(engine, directory, manifest, provider, threads)
        return cls(directory, manifest, search_engine, tokenizer)

    @property
    def sessions(self) -> EncoderDecoderSessions:
        """The loop engine's encoder and decoder sessions (tests drive them step by step)."""
        return self.engine.sessions

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        *,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        length_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        early_stopping: bool | str | None = None,
        num_return_sequences: int = 1,
        max_length: int | None = None,
        min_length: int | None = None,
    ) -> np.ndarray:
        """Token ids in, token ids out, laid out exactly as transformers' generate() returns them."""
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        settings = self.settings(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            early_stopping=early_stopping,
            num_return_sequences=num_return_sequences,
            max_length=max_length,
            min_length=min_length,
        )
        return self.engine.run(input_ids, attention_mask, settings)

    def summarize(self, texts: list[str], batch_size: int | None = None, **generate_kwargs) -> list[str]:
        """Summaries of texts, one per text (num_return_sequences per text when asked)."""
        check_texts(texts)
        if batch_size is not None and batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        self.settings(**generate_kwargs)  # reject bad settings before any work
        batch_size = batch_size or len(texts) or 1
        summaries: list[str] = []
        for start in range(0, len(texts), batch_size):
            input_ids, attention_mask = self.tokenizer.encode(list(texts[start : start + batch_size]))
            summaries += self.tokenizer.decode(self.generate(input_ids, attention_mask, **generate_kwargs))
        return summaries

    def settings(
        self,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        length_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        early_stopping: bool | str | None = None,
        num_return_sequences: int = 1,
        max_length: int | None = None,
        min_length: int | None = None,
    ) -> SearchSettings:
        """Resolve one call's settings against the model's generation defaults, as generate() does."""
        defaults, tokens = self.manifest.generation, self.manifest.special_tokens
        if max_new_tokens is not None:
            _check_int("max_new_tokens", max_new_tokens, minimum=1)
            max_length = PROMPT_LEN + max_new_tokens
        elif max_length is not None:
            _check_int("max_length", max_length, minimum=PROMPT_LEN + 1)
        else:
            max_length = defaults.max_length
        settings = SearchSettings(
            num_beams=defaults.num_beams if num_beams is None else num_beams,
            max_length=max_length,
            min_length=defaults.min_length if min_length is None else min_length,
            min_new_tokens=0 if min_new_tokens is None else min_new_tokens,
            length_penalty=defaults.length_penalty if length_penalty is None else length_penalty,
            no_repeat_ngram_size=defaults.no_repeat_ngram_size
            if no_repeat_ngram_size is None
            else no_repeat_ngram_size,
            early_stopping=defaults.early_stopping if early_stopping is None else early_stopping,
            num_return_sequences=num_return_sequences,
            eos_token_id=tokens.eos_token_id,
            pad_token_id=tokens.pad_token_id,
            decoder_start_token_id=tokens.decoder_start_token_id,
            forced_eos_token_id=defaults.forced_eos_token_id,
        )
        self._check_settings(settings)
        self.engine.check(settings)
        return settings

    def _check_settings(self, s: SearchSettings) -> None:
        _check_int("num_beams", s.num_beams, minimum=1)
        _check_int("min_new_tokens", s.min_new_tokens, minimum=0)
        _check_int("min_length", s.min_length, minimum=0)
        _check_int("no_repeat_ngram_size", s.no_repeat_ngram_size, minimum=0)
        _check_int("num_return_sequences", s.num_return_sequences, minimum=1)
        if isinstance(s.length_penalty, bool) or not isinstance(s.length_penalty, (int, float)):
            raise InvalidInputError(f"length_penalty must be a number, got {s.length_penalty!r}")
        if not math.isfinite(s.length_penalty):
            raise InvalidInputError(f"length_penalty must be finite, got {s.length_penalty}")
        if s.early_stopping not in (True, False, "never"):
            raise InvalidInputError(f"early_stopping must be true, false or 'never', got {s.early_stopping!r}")
        new_tokens = s.max_length - PROMPT_LEN
        if s.min_new_tokens > new_tokens:
            raise InvalidInputError(f"min_new_tokens ({s.min_new_tokens}) is larger than max_new_tokens ({new_tokens})")
        positions = self.manifest.dims.max_position_embeddings
        if s.max_length > positions:
            raise InvalidInputError(
                f"max_new_tokens ({new_tokens}) is more than the model's {positions - PROMPT_LEN} decoder positions allow"
            )
        if s.num_return_sequences > s.num_beams:
            raise InvalidInputError(
                f"num_return_sequences ({s.num_return_sequences}) must not exceed num_beams ({s.num_beams})"
            )

    def _check_inputs(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        input_ids = _as_int64_matrix("input_ids", input_ids)
        vocab, positions = self.manifest.dims.vocab_size, self.manifest.dims.max_position_embeddings
        if input_ids.min() < 0 or input_ids.max() >= vocab:
            raise InvalidInputError(f"input_ids must lie in [0, {vocab}), the model's vocabulary")
        if input_ids.shape[1] > positions:
            raise InvalidInputError(
                f"input length {input_ids.shape[1]} exceeds the model's maximum of {positions} tokens; truncate it"
            )
        if attention_mask is None:  # generate() infers no mask for encoder-decoders: every token is seen
            attention_mask = np.ones_like(input_ids)
        attention_mask = _as_int64_matrix("attention_mask", attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise InvalidInputError(f"attention_mask has shape {attention_mask.shape}, input_ids {input_ids.shape}")
        if not np.isin(attention_mask, (0, 1)).all() or not attention_mask.any(axis=1).all():
            raise InvalidInputError("attention_mask must be 0/1 with at least one 1 per row")
        return input_ids, attention_mask


def check_texts(texts) -> None:
    """A list of non-blank strings, or InvalidInputError naming the first bad one."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InvalidInputError("texts must be a list of strings")
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"text {index} is empty or only whitespace: there is nothing to summarize")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def _as_int64_matrix(name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"{name} must be a non-empty [batch, seq] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{name} must hold integers, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.int64)
