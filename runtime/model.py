"""Seq2SeqModel: the public Python API of the runtime (no torch, no transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..graphs.external_data import check_graph_data
from ..graphs.generation import SETTING_NAMES, GenerationSettingError, resolve_settings
from ..graphs.manifest import LOOP_ENGINE, Manifest
from .engines import open_engine
from .errors import InvalidInputError
from .search import SearchSettings
from .sessions import EncoderDecoderSessions
from .tokenizer import TextTokenizer


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
        # the sessions first: building the decoder's is the peak of loading (packing its weights), and the
        # tokenizer (tens of MB for a real vocabulary) would sit under it
        search_engine = open_engine(engine, directory, manifest, provider, threads)
        tokenizer = TextTokenizer(directory, manifest.tokenizer, manifest.special_tokens.pad_token_id)
        return cls(directory, manifest, search_engine, tokenizer)

    @property
    def sessions(self) -> EncoderDecoderSessions:
        """The loop engine's encoder and decoder sessions (tests drive them step by step)."""
        return self.engine.sessions

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, **settings) -> np.ndarray:
        """Token ids in, token ids out, laid out exactly as transformers' generate() returns them.

        settings: any field of graphs/generation.py's GenerationSettings, with transformers' name and
        meaning (num_beams, max_new_tokens, repetition_penalty, bad_words_ids, ...); those left out or
        None take the model's generation defaults. Anything else is refused (InvalidInputError)."""
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        return self.engine.run(input_ids, attention_mask, self.settings(**settings))

    def summarize(self, texts: list[str], batch_size: int | None = None, **settings) -> list[str]:
        """Summaries of texts, one per text (num_return_sequences per text when asked); settings as generate()."""
        check_texts(texts)
        if batch_size is not None and batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        self.settings(**settings)  # reject bad settings before any work
        batch_size = batch_size or len(texts) or 1
        summaries: list[str] = []
        for start in range(0, len(texts), batch_size):
            input_ids, attention_mask = self.tokenizer.encode(list(texts[start : start + batch_size]))
            summaries += self.tokenizer.decode(self.generate(input_ids, attention_mask, **settings))
        return summaries

    def settings(self, **overrides) -> SearchSettings:
        """Resolve one call's settings against the model's generation defaults, as generate() does
        (graphs/generation.py's resolve_settings), and check that the engine can honour them."""
        dims, tokens = self.manifest.dims, self.manifest.special_tokens
        try:
            resolved = resolve_settings(
                self.manifest.generation, overrides, dims.vocab_size, dims.max_position_embeddings
            )
        except GenerationSettingError as exc:
            raise InvalidInputError(str(exc)) from exc
        settings = SearchSettings(
            **{name: getattr(resolved, name) for name in SETTING_NAMES},
            eos_token_id=tokens.eos_token_id,
            pad_token_id=tokens.pad_token_id,
            decoder_start_token_id=tokens.decoder_start_token_id,
        )
        self.engine.check(settings)
        return settings

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


def _as_int64_matrix(name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"{name} must be a non-empty [batch, seq] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{name} must hold integers, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.int64)
