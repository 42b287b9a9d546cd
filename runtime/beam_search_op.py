"""Run the single-graph export of ONNX Runtime's BeamSearch op (exporter/beam_search_op.py).

The whole search runs inside one `session.run`: no Python per step. What the op cannot honour is
refused here rather than silently changed (see README, "BeamSearch op engine").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import InvalidInputError
from runtime.sessions import create_session

BEAM_SEARCH_FILE = "beam_search.onnx"  # the exporter's name for the graph, in the same directory


class BeamSearchOpModel:
    """generate() over beam_search.onnx: token ids in, [batch * returned, length] int64 out."""

    def __init__(self, session):
        self.session = session
        tokens = session.get_modelmeta().custom_metadata_map
        self.eos_token_id, self.pad_token_id = int(tokens["eos_token_id"]), int(tokens["pad_token_id"])

    @classmethod
    def load(cls, directory: str | Path, provider: str = "cpu", threads: int | None = None) -> BeamSearchOpModel:
        path = Path(directory) / BEAM_SEARCH_FILE
        if not path.is_file():
            raise InvalidInputError(f"{path} is missing: export with `ortseq export ... --beam-search-op`")
        return cls(create_session(path, provider, threads))

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
        input_ids = np.asarray(input_ids, dtype=np.int32)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        max_length = 1 + max_new_tokens  # the op counts the decoder start token, as transformers does
        # forced EOS (in the graph) decides the last step; the op's own min-length ban must not overlap it
        min_length = min(1 + min_new_tokens, max_length - 1)
        feeds = {
            "input_ids": input_ids,
            "max_length": np.array([max_length], dtype=np.int32),
            "min_length": np.array([min_length], dtype=np.int32),
            "num_beams": np.array([num_beams], dtype=np.int32),
            "num_return_sequences": np.array([num_return_sequences], dtype=np.int32),
            "length_penalty": np.array([length_penalty], dtype=np.float32),
            "attention_mask": np.asarray(attention_mask, dtype=np.int32),
        }
        (sequences,) = self.session.run(["sequences"], feeds)
        return as_transformers_layout(sequences.reshape(-1, sequences.shape[-1]), self.eos_token_id, self.pad_token_id)


def as_transformers_layout(sequences: np.ndarray, eos_token_id: int, pad_token_id: int) -> np.ndarray:
    """The op stores a finished hypothesis without its EOS and pads it with the pad id; transformers
    keeps the EOS, fills the rest with `pad_token_id or eos_token_id` and trims to the longest row.
    A hypothesis ends after its last non-pad token (a model that generates pad tokens last is ambiguous)."""
    sequences = sequences.astype(np.int64)
    rows, max_length = sequences.shape
    generated = sequences[:, 1:] != pad_token_id
    lengths = np.where(generated.any(axis=1), max_length - np.argmax(generated[:, ::-1], axis=1), 1)
    fill = pad_token_id or eos_token_id
    for row, length in enumerate(lengths):
        if length < max_length:
            sequences[row, length] = eos_token_id
            sequences[row, length + 1 :] = fill
    return sequences[:, : min(max_length, int(lengths.max()) + 1)]
