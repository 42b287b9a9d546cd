"""Seq2SeqModel: the public Python API of the runtime (no torch, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..graphs.external_data import check_graph_data
from ..graphs.generation import SETTING_NAMES, GenerationSettingError, resolve_settings
from ..graphs.manifest import LOOP_ENGINE, MANIFEST_FILE, Manifest, ManifestError
from .engines import open_engine
from .errors import InvalidInputError
from .search import SearchSettings
from .sessions import EncoderDecoderSessions
from .texts import check_unicode
from .tokenizer import TextTokenizer


@dataclass(frozen=True)
class CountedSummary:
    text: str
    input_tokens: int  # of its input, special tokens included (after truncation to the model's maximum)
    output_tokens: int  # generated, the end token included


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
        search_engine = open_engine(engine, directory, manifest, provider, threads)
        # the tokenizer reads its file on first use: a caller of generate(ids) never needs it
        tokenizer = TextTokenizer(directory, manifest.tokenizer, manifest.special_tokens.pad_token_id)
        return cls(directory, manifest, search_engine, tokenizer)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **options):
        """load(), under the name Hugging Face users type: a local export directory (`ortseq export` writes
        one). A hub id or a transformers checkpoint is not an export: refused with the command that makes one."""
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ManifestError(
                f"{name_or_path} is not a local export directory; ortseq runs exported models (no hub download "
                f"at run time): export it first, `ortseq export {name_or_path} --out exports/NAME`, then "
                "Seq2SeqModel.from_pretrained('exports/NAME')"
            )
        if not (path / MANIFEST_FILE).is_file() and (path / "config.json").is_file():
            raise ManifestError(
                f"{path} is a transformers checkpoint, not an ortseq export: `ortseq export {path} --out "
                "exports/NAME`, then Seq2SeqModel.from_pretrained('exports/NAME')"
            )
        return cls.load(path, **options)

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
        return [summary.text for summary in self.summaries(texts, batch_size, **settings)]

    def summaries(self, texts: list[str], batch_size: int | None = None, **settings) -> list[CountedSummary]:
        """As summarize(), each summary with its token counts: num_return_sequences per text, in order."""
        check_texts(texts)
        if batch_size is not None and batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        per_text = self.settings(**settings).num_return_sequences  # reject bad settings before any work
        batch_size = batch_size or len(texts) or 1
        eos = self.manifest.special_tokens.eos_token_id
        summaries: list[CountedSummary] = []
        for start in range(0, len(texts), batch_size):
            input_ids, attention_mask = self.tokenizer.encode(list(texts[start : start + batch_size]))
            output = self.generate(input_ids, attention_mask, **settings)
            input_tokens = np.repeat(attention_mask.sum(axis=1), per_text)
            summaries += [
                CountedSummary(text, int(length), len(generated_ids(row, eos)))
                for text, length, row in zip(self.tokenizer.decode(output), input_tokens, output)
            ]
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


def check_texts(texts, noun: str = "text") -> None:
    """A list of non-blank strings of valid Unicode, or InvalidInputError naming the first bad one (counted
    from 1, as the command line counts its text arguments and input lines)."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InvalidInputError(f"{noun}s must be a list of strings")
    for number, text in enumerate(texts, 1):
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"{noun} {number} is empty or only whitespace: there is nothing to summarize")
        check_unicode(text, f"{noun} {number}")


def generated_ids(output_row: np.ndarray, eos_token_id: int) -> list[int]:
    """The tokens a row generated: after the start token, up to the first end token (kept). Rows that
    finished early are filled after it (with pad or end ids) only because the batch is a rectangle."""
    ids = [int(token) for token in output_row[1:]]
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids


def _as_int64_matrix(name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"{name} must be a non-empty [batch, seq] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{name} must hold integers, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.int64)
