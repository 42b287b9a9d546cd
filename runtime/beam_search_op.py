"""Run the single-graph export of ONNX Runtime's BeamSearch op (exporter/beam_search_op.py).

The whole search runs inside one `session.run`: no Python per step. `Seq2SeqModel.load(dir,
engine="beam-search-op")` uses it (runtime/engines.py). What the op cannot honour is refused here
rather than silently changed (docs/generation.md, "BeamSearch-op engine").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..graphs.contract import BEAM_SEARCH_FILE
from ..graphs.generation import non_default
from .errors import InvalidInputError
from .search import PROMPT_LEN, SearchSettings
from .sessions import create_session

# Settings the op has no input or attribute for: refused by name unless at transformers' defaults.
OP_UNSUPPORTED = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "remove_invalid_values",
)


class BeamSearchOpModel:
    """An engine over beam_search.onnx: token ids in, [batch * returned, length] int64 out.

    no_repeat_ngram_size and early_stopping are attributes of the graph's op, fixed at export (the
    graph's metadata records them). The op returns transformers' tokens for greedy search (1 beam)
    and for beam search with early_stopping=True; without early stopping its stopping rule is
    transformers 4.x's, which returned other beams in our comparisons. Anything else is refused.
    """

    def __init__(self, session):
        self.session = session
        metadata = session.get_modelmeta().custom_metadata_map
        self.eos_token_id, self.pad_token_id = int(metadata["eos_token_id"]), int(metadata["pad_token_id"])
        # graphs written before these keys existed: Pegasus with forced EOS, attributes 0 / off
        forced_eos = metadata.get("forced_eos_token_id", str(self.eos_token_id))
        self.forced_eos_token_id = int(forced_eos) if forced_eos != "" else None
        self.no_repeat_ngram_size = int(metadata.get("no_repeat_ngram_size", "0"))
        self.early_stopping = metadata.get("early_stopping", "0") == "1"

    @classmethod
    def load(cls, directory: str | Path, provider: str = "cpu", threads: int | None = None) -> BeamSearchOpModel:
        path = Path(directory) / BEAM_SEARCH_FILE
        if not path.is_file():
            raise InvalidInputError(f"{path} is missing: export with `ortseq export SOURCE --out DIR --beam-search-op`")
        return cls(create_session(path, provider, threads))

    def check(self, settings: SearchSettings) -> None:
        """Refuse settings the graph cannot honour exactly (InvalidInputError says what to do instead)."""
        unsupported = non_default(settings, OP_UNSUPPORTED)
        if unsupported:
            raise InvalidInputError(
                f"the beam-search-op engine cannot apply {', '.join(unsupported)}: use the loop engine for "
                f"{'that setting' if len(unsupported) == 1 else 'those settings'}"
            )
        if settings.forced_eos_token_id != self.forced_eos_token_id:
            raise InvalidInputError(
                f"the beam-search-op engine runs with forced_eos_token_id={self.forced_eos_token_id} (fixed in the "
                f"graph), not {settings.forced_eos_token_id}: use the loop engine for that setting"
            )
        if settings.no_repeat_ngram_size != self.no_repeat_ngram_size:
            raise InvalidInputError(
                f"the beam-search-op engine runs with no_repeat_ngram_size={self.no_repeat_ngram_size} (fixed in "
                f"the graph), not {settings.no_repeat_ngram_size}: use the loop engine for that setting"
            )
        if settings.num_beams > 1 and not (settings.early_stopping is True and self.early_stopping):
            raise InvalidInputError(
                f"the beam-search-op engine gives ortseq's tokens for beam search only with early_stopping=True "
                f"(asked: {settings.early_stopping!r}): pass early_stopping=True, 1 beam, or use the loop engine"
            )

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, settings: SearchSettings) -> np.ndarray:
        """Search with resolved settings that check() accepted (Seq2SeqModel.settings() calls it)."""
        # the ban on EOS, in total decoder length (the op counts the start token, as transformers does)
        min_length = settings.min_length
        if (
            self.forced_eos_token_id is not None
        ):  # forced EOS (in the graph) decides the last step: the op's ban must not overlap it
            min_length = min(min_length, settings.max_length - 1)
        feeds = {
            "input_ids": np.asarray(input_ids, dtype=np.int32),
            "max_length": np.array([settings.max_length], dtype=np.int32),
            "min_length": np.array([min_length], dtype=np.int32),
            "num_beams": np.array([settings.num_beams], dtype=np.int32),
            "num_return_sequences": np.array([settings.num_return_sequences], dtype=np.int32),
            "length_penalty": np.array([settings.length_penalty], dtype=np.float32),
            "attention_mask": np.asarray(attention_mask, dtype=np.int32),
        }
        (sequences,) = self.session.run(["sequences"], feeds)
        # transformers' greedy search fills finished rows with the pad id, its beam search with
        # `pad_token_id or eos_token_id` (EOS when pad is 0)
        fill = self.pad_token_id if settings.num_beams == 1 else self.pad_token_id or self.eos_token_id
        return as_transformers_layout(
            sequences.reshape(-1, sequences.shape[-1]), self.eos_token_id, self.pad_token_id, fill
        )

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        *,
        num_beams: int = 1,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        length_penalty: float = 1.0,
        num_return_sequences: int = 1,
    ) -> np.ndarray:
        """Without a manifest (benchmarks): explicit settings, the graph's own n-gram and early-stopping
        attributes (whatever tokens those give)."""
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        settings = SearchSettings(
            num_beams=num_beams,
            max_length=PROMPT_LEN + max_new_tokens,
            min_length=PROMPT_LEN + min_new_tokens,
            length_penalty=length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            early_stopping=self.early_stopping,
            num_return_sequences=num_return_sequences,
            forced_eos_token_id=self.forced_eos_token_id,
        )
        return self.run(input_ids, attention_mask, settings)


def as_transformers_layout(sequences: np.ndarray, eos_token_id: int, pad_token_id: int, fill: int) -> np.ndarray:
    """The op stores a finished hypothesis without its EOS and pads it with the pad id; transformers
    keeps the EOS, fills the rest with `fill` and trims to the longest row.
    A hypothesis ends after its last non-pad token (a model that generates pad tokens last is ambiguous)."""
    sequences = sequences.astype(np.int64)
    rows, max_length = sequences.shape
    generated = sequences[:, 1:] != pad_token_id
    lengths = np.where(generated.any(axis=1), max_length - np.argmax(generated[:, ::-1], axis=1), 1)
    for row, length in enumerate(lengths):
        if length < max_length:
            sequences[row, length] = eos_token_id
            sequences[row, length + 1 :] = fill
    return sequences[:, : min(max_length, int(lengths.max()) + 1)]
