"""Token rows in, summaries out: what the worker thread that owns the model runs for one merged batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model import Seq2SeqModel, generated_ids


@dataclass
class Summary:
    text: str
    input_tokens: int
    output_ids: list[int]  # generated ids after the start token, up to and including the first end token


def summarize_rows(model: Seq2SeqModel, generate_kwargs: dict, rows: list[list[int]]) -> list[Summary]:
    """One generate call over rows of token ids (padded to the longest), one Summary per row."""
    input_ids, attention_mask = model.tokenizer.pad(rows)
    return summaries_of(model, rows, model.generate(input_ids, attention_mask, **generate_kwargs))


def summaries_of(model: Seq2SeqModel, rows: list[list[int]], output: np.ndarray) -> list[Summary]:
    """One Summary per row of input ids, from the generated ids `output` (a row per input)."""
    texts = model.tokenizer.decode(output)
    eos = model.manifest.special_tokens.eos_token_id
    return [Summary(text, len(row), generated_ids(ids, eos)) for text, row, ids in zip(texts, rows, output)]
