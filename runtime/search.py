"""Greedy and beam search in pure numpy, driven by a decoder step function.

This module knows nothing about ONNX Runtime: a `StepFn` maps the newest token of every row (and
which previous row each row continues) to next-token logits. The same core therefore drives the
CPU session driver and any other one (CUDA with IO binding, a fake in tests).

It reproduces transformers' generate() (5.x: `_sample` without sampling, and the vectorised
`_beam_search`) operation by operation, in float32, including its quirks: finished beam rows are
filled with the EOS id when the pad id is 0, and early stopping follows the same heuristic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

NEG_LARGE = np.float32(-1.0e9)  # transformers' "very large negative" for beams that must not be picked


class StepFn(Protocol):
    def __call__(self, tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
        """tokens [rows] int64 (the newest token of every row), beam_idx [rows] int64 (the row of the
        previous step each row continues) -> logits [rows, vocab] float32."""


@dataclass(frozen=True)
class SearchSettings:
    """Resolved settings of one generate() call, with transformers' meanings."""

    num_beams: int
    max_length: int  # total decoder length, the start token included
    min_length: int = 0  # total decoder length before EOS is allowed
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_id: int = 1
    pad_token_id: int = 0
    decoder_start_token_id: int = 0
    forced_eos_token_id: int | None = None


PROMPT_LEN = 1  # the decoder starts from one token: decoder_start_token_id


def process_scores(settings: SearchSettings, sequences: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Apply the logits processors generate() builds for these settings, in its order (in place)."""
    cur_len = sequences.shape[1]
    n = settings.no_repeat_ngram_size
    if n > 0 and cur_len >= n:
        _ban_repeated_ngrams(sequences, scores, n)
    eos = settings.eos_token_id
    if cur_len < settings.min_length or cur_len - PROMPT_LEN < settings.min_new_tokens:
        scores[:, eos] = -np.inf
    if settings.forced_eos_token_id is not None and cur_len == settings.max_length - 1:
        scores[:] = -np.inf
        scores[:, settings.forced_eos_token_id] = 0.0
    return scores


def _ban_repeated_ngrams(sequences: np.ndarray, scores: np.ndarray, n: int) -> None:
    """Ban every token that would complete an n-gram already present in the row."""
    cur_len = sequences.shape[1]
    windows = np.lib.stride_tricks.sliding_window_view(sequences, n, axis=1)  # [rows, cur_len - n + 1, n]
    prefix = sequences[:, cur_len + 1 - n :]  # the last n - 1 tokens
    matches = np.all(windows[:, :, :-1] == prefix[:, None, :], axis=-1)
    rows, starts = np.nonzero(matches)
    banned = windows[rows, starts, -1]
    keep = banned < scores.shape[1]
    scores[rows[keep], banned[keep]] = -np.inf


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest k per row, best first (ties: lower index first), like torch.topk."""
    if k < values.shape[1]:
        candidates = np.argpartition(-values, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(values.shape[1]), values.shape)
    picked = np.take_along_axis(values, candidates, axis=1)
    order = np.lexsort((candidates, -picked), axis=1)
    indices = np.take_along_axis(candidates, order, axis=1)
    return np.take_along_axis(values, indices, axis=1), indices


def greedy_search(step: StepFn, batch: int, settings: SearchSettings) -> np.ndarray:
    """transformers' `_sample` with do_sample=False: returns [batch, length] int64."""
    sequences = np.full((batch, 1), settings.decoder_start_token_id, dtype=np.int64)
    unfinished = np.ones(batch, dtype=bool)
    rows = np.arange(batch, dtype=np.int64)
    while True:
        logits = step(sequences[:, -1], rows)
        scores = process_scores(settings, sequences, np.array(logits, dtype=np.float32))
        next_tokens = np.argmax(scores, axis=-1).astype(np.int64)
        next_tokens = np.where(unfinished, next_tokens, settings.pad_token_id)
        sequences = np.concatenate([sequences, next_tokens[:, None]], axis=1)
        unfinished &= ~((next_tokens == settings.eos_token_id) | (sequences.shape[1] >= settings.max_length))
        if not unfinished.any():
            return sequences


@dataclass
class _BeamState:
    """transformers' beam-search tensors, [batch, beams, ...]; see `_beam_search` there."""

    running: np.ndarray  # sequences of live beams [batch, beams, max_length]
    running_scores: np.ndarray  # their summed log-probs [batch, beams]
    running_beam_indices: np.ndarray  # global row each step came from [batch, beams, max_length - 1]
    sequences: np.ndarray  # best finished hypotheses
    scores: np.ndarray  # their length-penalised scores
    beam_indices: np.ndarray
    finished: np.ndarray  # which finished slots hold a real hypothesis [batch, beams]
    improvable: np.ndarray  # whether a live beam can still beat the finished ones [batch, 1]


def beam_search(step: StepFn, batch: int, settings: SearchSettings) -> np.ndarray:
    """transformers' `_beam_search`: returns [batch * num_return_sequences, length] int64."""
    beams, max_length = settings.num_beams, settings.max_length
    keep = 2 * beams  # candidates kept per step: enough live ones even if `beams` of them end with EOS
    # transformers fills unused positions with `pad_token_id or eos_token_id`: EOS when pad is 0
    fill = settings.pad_token_id or settings.eos_token_id
    running = np.full((batch, beams, max_length), fill, dtype=np.int64)
    running[:, :, 0] = settings.decoder_start_token_id
    running_scores = np.zeros((batch, beams), dtype=np.float32)
    running_scores[:, 1:] = NEG_LARGE  # only the first beam is live at the start: no duplicate hypotheses
    indices = np.full((batch, beams, max_length - PROMPT_LEN), -1, dtype=np.int64)
    state = _BeamState(
        running=running,
        running_scores=running_scores,
        running_beam_indices=indices,
        sequences=running.copy(),
        scores=np.full((batch, beams), NEG_LARGE, dtype=np.float32),
        beam_indices=indices.copy(),
        finished=np.zeros((batch, beams), dtype=bool),
        improvable=np.ones((batch, 1), dtype=bool),
    )
    top_beams = np.arange(keep) < beams
    batch_offset = (np.arange(batch, dtype=np.int64) * beams)[:, None]
    beam_idx = np.arange(batch * beams, dtype=np.int64)
    cur_len = PROMPT_LEN
    while True:
        logits = step(state.running[:, :, cur_len - 1].reshape(-1), beam_idx)
        log_probs = log_softmax(np.asarray(logits, dtype=np.float32))
        log_probs = process_scores(settings, state.running[:, :, :cur_len].reshape(batch * beams, cur_len), log_probs)
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.reshape(batch, beams, vocab) + state.running_scores[:, :, None]).reshape(batch, -1)

        # top-k continuations over all beams of an input
        topk_scores, topk_flat = top_k(log_probs, keep)
        from_beam = topk_flat // vocab
        topk_running = np.take_along_axis(state.running, from_beam[:, :, None], axis=1)
        topk_running[:, :, cur_len] = topk_flat % vocab
        topk_indices = np.take_along_axis(state.running_beam_indices, from_beam[:, :, None], axis=1)
        topk_indices[:, :, cur_len - PROMPT_LEN] = from_beam + batch_offset
        ends = (topk_running[:, :, cur_len] == settings.eos_token_id) | (cur_len + 1 >= max_length)

        # live beams for the next step: the best candidates that did not end
        live_scores = topk_scores + ends.astype(np.float32) * NEG_LARGE
        _, pick = top_k(live_scores, beams)
        state.running = np.take_along_axis(topk_running, pick[:, :, None], axis=1)
        state.running_scores = np.take_along_axis(live_scores, pick, axis=1)
        state.running_beam_indices = np.take_along_axis(topk_indices, pick[:, :, None], axis=1)

        _update_finished(state, settings, topk_running, topk_scores, topk_indices, ends & top_beams, cur_len)

        beam_idx = state.running_beam_indices[:, :, cur_len - PROMPT_LEN].reshape(-1)
        cur_len += 1
        _update_improvable(state, settings, cur_len)
        all_done = bool(np.all(state.finished)) and settings.early_stopping is True
        if not state.improvable.any() or all_done or bool(np.all(ends)):
            break
    return _final_sequences(state, settings)


def _update_finished(state, settings, topk_running, topk_scores, topk_indices, just_finished, cur_len) -> None:
    penalty = np.float32((cur_len + 1 - PROMPT_LEN) ** settings.length_penalty)
    scores = topk_scores / penalty
    batch_full = np.all(state.finished, axis=-1, keepdims=True) & (settings.early_stopping is True)
    scores = scores + batch_full.astype(np.float32) * NEG_LARGE
    scores = scores + (~state.improvable).astype(np.float32) * NEG_LARGE
    scores = scores + (~just_finished).astype(np.float32) * NEG_LARGE

    merged_scores = np.concatenate([state.scores, scores], axis=1)
    _, pick = top_k(merged_scores, settings.num_beams)
    state.scores = np.take_along_axis(merged_scores, pick, axis=1)
    merged = np.concatenate([state.sequences, topk_running], axis=1)
    state.sequences = np.take_along_axis(merged, pick[:, :, None], axis=1)
    merged_indices = np.concatenate([state.beam_indices, topk_indices], axis=1)
    state.beam_indices = np.take_along_axis(merged_indices, pick[:, :, None], axis=1)
    state.finished = np.take_along_axis(np.concatenate([state.finished, just_finished], axis=1), pick, axis=1)


def _update_improvable(state: _BeamState, settings: SearchSettings, cur_len: int) -> None:
    """transformers' early-stop heuristic: can the best live beam still beat the worst finished one?"""
    if settings.early_stopping == "never" and settings.length_penalty > 0.0:
        best_length = settings.max_length - PROMPT_LEN
    else:
        best_length = cur_len - PROMPT_LEN
    best_running = state.running_scores[:, :1] / np.float32(best_length**settings.length_penalty)
    worst_finished = np.where(state.finished, state.scores.min(axis=1, keepdims=True), NEG_LARGE)
    state.improvable &= np.any(best_running > worst_finished, axis=-1, keepdims=True)


def _final_sequences(state: _BeamState, settings: SearchSettings) -> np.ndarray:
    returned = settings.num_return_sequences
    sequences = state.sequences[:, :returned].reshape(-1, settings.max_length)
    indices = state.beam_indices[:, :returned].reshape(-1, settings.max_length - PROMPT_LEN)
    generated = int((indices != -1).sum(axis=1).max())
    return sequences[:, : PROMPT_LEN + generated]
