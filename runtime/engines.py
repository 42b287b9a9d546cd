"""Engines: what runs a generate() call once Seq2SeqModel has resolved and checked its settings.

- "loop" (default): ortseq's own search (runtime/search.py) over encoder.onnx and decoder.onnx;
  every setting, cross K/V shared by the beams.
- "beam-search-op": beam_search.onnx (`ortseq export --beam-search-op`), ONNX Runtime's BeamSearch
  op running the whole search in C++; the same tokens, fewer settings (runtime/beam_search_op.py).

An engine has check(settings) (raise InvalidInputError for what it cannot honour) and
run(input_ids, attention_mask, settings) -> token ids laid out as transformers returns them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..graphs.manifest import BEAM_SEARCH_OP_ENGINE, LOOP_ENGINE, Manifest
from .beam_search_op import BeamSearchOpModel
from .errors import InvalidInputError
from .search import EncoderTokens, HostCandidates, SearchSettings, beam_search, greedy_search
from .search_step import DeviceCandidates
from .sessions import EncoderDecoderSessions

ENGINES = (LOOP_ENGINE, BEAM_SEARCH_OP_ENGINE)


class LoopEngine:
    """ortseq's numpy search loop driving the decoder session one step at a time."""

    # Where the logits are in host memory already, numpy chooses faster than search_step.onnx (batch 8 x
    # 8 beams x 96k vocabulary: 54 vs 107 ms per step, greedy batch 1: 0.02 vs 0.31 ms; onnxruntime's CPU
    # TopK scans every score, numpy's top_k only the best blocks, and the graph's bans are full passes):
    # the graph serves devices (CUDA). The tests switch it on for the CPU too, so that every parity suite
    # runs the device path.
    search_step_on_cpu = False

    def __init__(self, sessions: EncoderDecoderSessions):
        self.sessions = sessions

    def check(self, settings: SearchSettings) -> None:
        """Every setting Seq2SeqModel accepts is supported."""

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, settings: SearchSettings) -> np.ndarray:
        batch = input_ids.shape[0]
        # the decoder reads every token but the last one generated: max_length - 1 steps at most (a search
        # makes its first step whatever max_length says)
        step = self.sessions.start(
            input_ids, attention_mask, rows=batch * settings.num_beams, max_len=max(settings.max_length - 1, 1)
        )
        encoder = EncoderTokens(input_ids, settings.num_beams, settings)
        candidates = self.candidates(step, settings, encoder)
        if settings.num_beams == 1:
            return greedy_search(step, batch, settings, encoder, candidates)
        return beam_search(step, batch, settings, encoder, candidates)

    def candidates(self, step, settings: SearchSettings, encoder: EncoderTokens):
        """On the decoder's device where the export has search_step.onnx, else on the host."""
        if self.sessions.search_step is None or (step.device == "cpu" and not self.search_step_on_cpu):
            return HostCandidates(settings, encoder)
        return DeviceCandidates(self.sessions.search_step, step, settings, encoder)


def open_engine(name: str, directory: Path, manifest: Manifest, provider: str, threads: int | None):
    if name == LOOP_ENGINE:
        return LoopEngine(EncoderDecoderSessions(directory, manifest, provider, threads))
    if name == BEAM_SEARCH_OP_ENGINE:
        if BEAM_SEARCH_OP_ENGINE not in manifest.engines:
            raise InvalidInputError(
                f"{directory} has no BeamSearch-op graph: export with `ortseq export SOURCE --out DIR --beam-search-op`"
            )
        return BeamSearchOpModel.load(directory, provider, threads)
    raise InvalidInputError(f"unknown engine {name!r}; choose one of {list(ENGINES)}")
