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

from ..graphs.generation import DEFAULT_NEW_TOKENS, PROMPT_LEN, GenerationSettings

NEG_LARGE = np.float32(-1.0e9)  # transformers' "very large negative" for beams that must not be picked


class StepFn(Protocol):
    def __call__(self, tokens: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
        """tokens [rows] int64 (the newest token of every row), beam_idx [rows] int64 (the row of the
        previous step each row continues) -> logits [rows, vocab] float32. The search owns the
        returned array until the next call and overwrites it (no 24 MB copies per step). A driver whose
        logits stay on a device returns anything np.asarray() turns into that array (a copy made only
        when the host chooses the step's candidates) with their `shape`."""


@dataclass(frozen=True)
class SearchSettings(GenerationSettings):
    """Resolved settings of one generate() call (graphs/generation.py's `resolve_settings`), with
    transformers' meanings, plus the model's special tokens. max_length is the total decoder length
    (start token included) and min_length the total length before EOS is allowed; max_new_tokens and
    min_new_tokens are folded into them."""

    max_length: int = PROMPT_LEN + DEFAULT_NEW_TOKENS
    eos_token_id: int = 1
    pad_token_id: int = 0
    decoder_start_token_id: int = 0


class EncoderTokens:
    """What the processors that look at the input need: the encoder input ids of every search row
    (the beams of an input share its ids, pads included, as transformers passes them)."""

    def __init__(self, input_ids: np.ndarray, beams: int, settings: SearchSettings):
        self.ids = np.repeat(np.asarray(input_ids, dtype=np.int64), beams, axis=0)  # [rows, src]
        n = settings.encoder_no_repeat_ngram_size
        # every n-gram of the input [rows, windows, n]: a row whose last n - 1 tokens start one bans its last token
        self.ngrams = (
            np.lib.stride_tricks.sliding_window_view(self.ids, n, axis=1) if 0 < n <= self.ids.shape[1] else None
        )


def process_scores(
    settings: SearchSettings, sequences: np.ndarray, scores: np.ndarray, encoder: EncoderTokens | None = None
) -> np.ndarray:
    """Apply the logits processors generate() builds for these settings, in transformers 5.x's order
    (`_get_logits_processor`), with its float32 arithmetic. In place; returns scores.

    sequences [rows, cur_len] (the decoder start included), scores [rows, vocab]: raw logits in greedy
    search, log-probabilities in beam search, as transformers applies them.
    """
    cur_len = sequences.shape[1]
    if settings.encoder_repetition_penalty != 1.0 and encoder is not None:
        # transformers stores 1 / penalty and then applies it like repetition_penalty
        _penalize(scores, encoder.ids, np.float32(1.0 / settings.encoder_repetition_penalty))
    if settings.repetition_penalty != 1.0:
        _penalize(scores, sequences, np.float32(settings.repetition_penalty))
    rows, banned = row_bans(settings, sequences, scores.shape[1], encoder)
    scores[rows, banned] = -np.inf
    if cur_len < settings.min_length:  # min_new_tokens is folded into min_length (resolve_settings)
        scores[:, settings.eos_token_id] = -np.inf
    if settings.forced_bos_token_id is not None and cur_len == 1:
        scores[:] = -np.inf
        scores[:, settings.forced_bos_token_id] = 0.0
    if settings.forced_eos_token_id is not None and cur_len == settings.max_length - 1:
        scores[:] = -np.inf
        scores[:, settings.forced_eos_token_id] = 0.0
    if settings.remove_invalid_values:
        _remove_invalid_values(scores)
    if settings.suppress_tokens is not None:
        scores[:, list(settings.suppress_tokens)] = -np.inf
    # the first generated position; with a one-token prompt and a forced first token, the one after it
    begin_index = PROMPT_LEN + (settings.forced_bos_token_id is not None)
    if settings.begin_suppress_tokens is not None and cur_len == begin_index:
        scores[:, list(settings.begin_suppress_tokens)] = -np.inf
    return scores


def needs_scores(settings: SearchSettings, encoder: EncoderTokens | None = None) -> bool:
    """Whether process_scores applies a processor that reads the scores' values (repetition penalties,
    remove_invalid_values): one that neither a shared bias nor a row's list of banned ids expresses."""
    return (
        settings.repetition_penalty != 1.0
        or (settings.encoder_repetition_penalty != 1.0 and encoder is not None)
        or settings.remove_invalid_values
    )


def row_bans(
    settings: SearchSettings, sequences: np.ndarray, vocab: int, encoder: EncoderTokens | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ids) int64 that process_scores bans at this length because of a row's own tokens: the
    no-repeat n-gram ban, the input n-gram ban and bad words (all set -inf, so their order is free)."""
    cur_len = sequences.shape[1]
    found = [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))]
    n = settings.no_repeat_ngram_size
    if n > 0 and cur_len >= n:
        windows = np.lib.stride_tricks.sliding_window_view(sequences, n, axis=1)  # [rows, cur_len - n + 1, n]
        found.append(_completions(windows, sequences))
    if encoder is not None and encoder.ngrams is not None and cur_len >= settings.encoder_no_repeat_ngram_size - 1:
        found.append(_completions(encoder.ngrams, sequences))
    if settings.bad_words_ids is not None:
        found.append(_bad_word_bans(settings, sequences))
    rows, ids = (np.concatenate(parts).astype(np.int64) for parts in zip(*found))
    keep = ids < vocab  # ids past the scores' vocabulary are skipped, as transformers does
    return rows[keep], ids[keep]


def row_independent_state(settings: SearchSettings, cur_len: int) -> tuple[bool, ...]:
    """Which of process_scores' length-dependent, row-independent processors apply at this length (the
    others, suppress_tokens and single-token bad words, apply at every length): equal states, equal masks."""
    return (
        cur_len < settings.min_length,
        settings.forced_bos_token_id is not None and cur_len == 1,
        settings.forced_eos_token_id is not None and cur_len == settings.max_length - 1,
        cur_len == PROMPT_LEN + (settings.forced_bos_token_id is not None),  # begin_suppress_tokens
    )


def _penalize(scores: np.ndarray, tokens: np.ndarray, penalty: np.float32) -> None:
    """transformers' repetition penalty on every token of a row's `tokens`: negative scores are
    multiplied by the penalty, the others divided by it (ids past the scores' vocab are skipped)."""
    vocab = scores.shape[1]
    seen = np.zeros((scores.shape[0], vocab + 1), dtype=bool)
    seen[np.arange(scores.shape[0])[:, None], np.minimum(tokens, vocab)] = True
    seen = seen[:, :vocab]
    picked = scores[seen]
    scores[seen] = np.where(picked < 0, picked * penalty, picked / penalty)


def _completions(ngrams: np.ndarray, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ids): every token that would complete one of a row's n-grams (ngrams [rows, windows, n])
    after the row's last n - 1 tokens."""
    n = ngrams.shape[2]
    prefix = sequences[:, sequences.shape[1] + 1 - n :] if n > 1 else sequences[:, :0]
    matches = np.all(ngrams[:, :, :-1] == prefix[:, None, :], axis=-1)
    rows, starts = np.nonzero(matches)
    return rows, ngrams[rows, starts, -1]


def _bad_word_bans(settings: SearchSettings, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' NoBadWordsLogitsProcessor: a sequence's last token is banned where the row ends
    with the rest of it; the single-token sequence [EOS] is dropped (EOS stays allowed)."""
    cur_len = sequences.shape[1]
    rows, ids = [], []
    for words in settings.bad_words_ids:
        prefix = np.asarray(words[:-1], dtype=np.int64)
        if words == (settings.eos_token_id,) or len(prefix) > cur_len:
            continue
        ending = np.all(sequences[:, cur_len - len(prefix) :] == prefix, axis=1)
        rows.append(np.nonzero(ending)[0])
        ids.append(np.full(len(rows[-1]), words[-1], dtype=np.int64))
    return (np.concatenate(rows), np.concatenate(ids)) if rows else (np.zeros(0, np.int64), np.zeros(0, np.int64))


def _remove_invalid_values(scores: np.ndarray) -> None:
    """transformers' InfNanRemoveLogitsProcessor: nan -> 0, +-inf -> the largest finite float32."""
    finfo = np.finfo(scores.dtype)
    np.nan_to_num(scores, copy=False, nan=0.0, posinf=finfo.max, neginf=finfo.min)


def log_softmax_(logits: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Log-probabilities in place of the float32 logits (as torch.log_softmax computes them).

    In place, with a scratch buffer of log_softmax_rows() rows reused across steps: fresh
    8 x 8 x 96k temporaries per step cost more in page faults than the arithmetic itself, and a
    scratch as large as the logits would add their size to the peak memory of a call. Each row's
    arithmetic is the same whatever the rows around it.
    """
    for start in range(0, len(logits), len(scratch)):
        rows = logits[start : start + len(scratch)]
        rows -= rows.max(axis=-1, keepdims=True)
        exp = np.exp(rows, out=scratch[: len(rows)])
        rows -= np.log(exp.sum(axis=-1, keepdims=True))
    return logits


# The log-softmax scratch's size: one row of a 96k vocabulary (a few numpy calls per row cost nothing
# next to its 96k exps), all rows of a tiny one (where the calls per row would cost more than the work).
LOG_SOFTMAX_SCRATCH_BYTES = 512 * 1024


def log_softmax_rows(rows: int, vocab: int) -> int:
    """The scratch's rows for `rows` rows of `vocab` float32 logits."""
    return max(1, min(rows, LOG_SOFTMAX_SCRATCH_BYTES // (4 * vocab)))


def top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest k per row, best first (ties: lower index first), like torch.topk."""
    width = values.shape[1]
    if width <= _SORT_WHOLE_ROW:
        indices = np.argsort(-values, axis=1, kind="stable")[:, :k]
        return _rows(values, indices), indices
    candidates = _candidates(values, k)  # a block's overhang past the row has indices >= width
    picked = np.where(candidates < width, _rows(values, np.minimum(candidates, width - 1)), -np.inf)
    best, ids = _best_first(picked, candidates, k)
    return best.astype(values.dtype), ids


_SORT_WHOLE_ROW = 512


def _best_first(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (scores, ids) per row of candidates in any order: best first, ties by the lower id.

    Only the candidates at least as good as a row's k-th best score are sorted (those of a row that has
    fewer, with some worse ones: they come after its k)."""
    n = scores.shape[1]
    kth_best = np.partition(scores, n - k, axis=1)[:, n - k, None]
    contenders = scores >= kth_best
    width = int(contenders.sum(axis=1).max())
    if k <= width < n:  # fewer: a NaN compares false, every candidate is sorted
        chosen = np.argpartition(~contenders, width - 1, axis=1)[:, :width]
        scores, ids = _rows(scores, chosen), _rows(ids, chosen)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return _rows(scores, order), _rows(ids, order)


# Groups of columns at most above or tied with the k-th best group maximum, per wanted element, before
# _candidates takes the contiguous blocks instead (a step that forces one token ties every group at -inf).
_TIED_GROUPS_PER_WANTED = 4


def _candidates(values: np.ndarray, k: int) -> np.ndarray:
    members = _strided_candidates(values, k)
    return _best_block_members(values, k) if members is None else members


def _strided_candidates(values: np.ndarray, k: int) -> np.ndarray | None:
    """Indices, per row, of a set of elements that holds the row's k largest with torch's ties (lower
    index first): every element at least as large as the k-th best maximum of strided column groups.

    Group j holds the columns j, j + groups, j + 2 * groups, ...: their maxima are an elementwise
    maximum over rows of the [block, groups] view, several times cheaper than maxima of contiguous
    blocks. k groups hold an element >= their k-th best maximum t, so the row's k-th largest is >= t
    and every element of the top k (ties at t included) lies in a group whose maximum is >= t. When
    ties at t make those groups many, returns None (the contiguous blocks keep the candidates few).
    """
    rows, width = values.shape
    block = max(1, int(np.sqrt(width / k)))
    groups = width // block
    maxima = values[:, : groups * block].reshape(rows, block, groups).max(axis=1)
    if groups * block < width:  # the columns past the last full stride: one group of their own
        maxima = np.concatenate([maxima, values[:, groups * block :].max(axis=1, keepdims=True)], axis=1)
    kth_best = np.partition(maxima, maxima.shape[1] - k, axis=1)[:, maxima.shape[1] - k, None]
    wanted = maxima >= kth_best
    needed = int(wanted.sum(axis=1).max())
    if not k <= needed <= _TIED_GROUPS_PER_WANTED * k:  # fewer: a NaN maximum compares false
        return None
    # the wanted groups of every row (and, where a row wants fewer, other groups: more candidates are exact too)
    chosen = np.argpartition(~wanted, needed - 1, axis=1)[:, :needed]
    strided = chosen[:, None, :] + groups * np.arange(block)[:, None]  # [rows, block, needed]
    tail = groups * block + np.arange(block)[:, None]  # the last group, its overhang past the row included
    return np.where(chosen[:, None, :] < groups, strided, tail).reshape(rows, -1)


def _best_block_members(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of every element in the blocks whose maximum ranks in a row's top k (ties included).

    Each of a row's k largest elements lies in such a block (a block holding one has a maximum at
    least as large), so an exact top-k over these candidates equals one over the whole row. With
    blocks of sqrt(width / k) columns both steps handle ~sqrt(width * k) values: for 8 beams x 96k
    tokens that took ~10 ms per step where np.argpartition over the rows took ~100 ms.
    """
    rows, width = values.shape
    block = max(1, int(np.sqrt(width / k)))
    whole = width // block
    maxima = values[:, : whole * block].reshape(rows, whole, block).max(axis=2)
    if whole * block < width:
        maxima = np.concatenate([maxima, values[:, whole * block :].max(axis=1, keepdims=True)], axis=1)
    blocks = maxima.shape[1]
    kth_best = np.partition(maxima, blocks - k, axis=1)[:, blocks - k, None]
    # Every block above the k-th best maximum, and of the blocks tied with it the first k: each holds
    # an element equal to it, so the lowest-index ties (torch's pick) lie in them. Not every tied block:
    # a step that forces one token leaves -inf everywhere else, and all its blocks tie.
    above = (maxima > kth_best).sum(axis=1)
    tied = (maxima == kth_best).sum(axis=1)
    needed = int((above + np.minimum(tied, k)).max())
    # best maximum first, ties in block order
    chosen = np.argsort(-maxima, axis=1, kind="stable")[:, :needed]
    members = chosen[:, :, None] * block + np.arange(block)
    return np.broadcast_to(members.reshape(chosen.shape[0], -1), (rows, needed * block))


class Candidates(Protocol):
    """The tensor part of a search step: the next tokens (greedy) or the best candidates (beams) from
    the decoder step's logits. `HostCandidates` computes them in numpy; runtime/search_step.py runs
    them on the decoder's device and falls back to the host where a processor needs the rows.
    Both return what transformers would choose, bit for bit where the arithmetic allows."""

    def greedy(self, logits: np.ndarray, sequences: np.ndarray) -> np.ndarray:
        """logits [rows, vocab] (the step's), sequences [rows, cur_len] -> next token of every row [rows]
        int64: the argmax of the processed raw logits, the lower id on ties."""

    def beam(
        self, logits: np.ndarray, sequences: np.ndarray, running_scores: np.ndarray, keep: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """running_scores [batch, beams] -> the `keep` best of each input's processed log-probabilities plus
        running scores, best first: scores [batch, keep] float32, flat ids (beam * vocab + token) int64."""


class HostCandidates:
    """Candidates in numpy, every processor applied on the host: transformers' order and arithmetic."""

    def __init__(self, settings: SearchSettings, encoder: EncoderTokens | None = None):
        self.settings = settings
        self.encoder = encoder
        self._scratch: np.ndarray | None = None

    def greedy(self, logits: np.ndarray, sequences: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits)  # a device driver's logits come to the host here, and only here
        scores = process_scores(self.settings, sequences, logits, self.encoder)
        return np.argmax(scores, axis=-1).astype(np.int64)

    def beam(
        self, logits: np.ndarray, sequences: np.ndarray, running_scores: np.ndarray, keep: int
    ) -> tuple[np.ndarray, np.ndarray]:
        logits = np.asarray(logits)  # a device driver's logits come to the host here, and only here
        scratch_shape = (log_softmax_rows(*logits.shape), logits.shape[1])
        if self._scratch is None or self._scratch.shape != scratch_shape:
            self._scratch = np.empty(scratch_shape, dtype=logits.dtype)
        log_probs = log_softmax_(logits, self._scratch)
        log_probs = process_scores(self.settings, sequences, log_probs, self.encoder)
        batch, beams = running_scores.shape
        log_probs = log_probs.reshape(batch, beams, -1)
        log_probs += running_scores[:, :, None]
        return top_k(log_probs.reshape(batch, -1), keep)


def greedy_search(
    step: StepFn,
    batch: int,
    settings: SearchSettings,
    encoder: EncoderTokens | None = None,
    candidates: Candidates | None = None,
) -> np.ndarray:
    """transformers' `_sample` with do_sample=False: returns [batch, length] int64. encoder: the
    input ids, for the processors that read them (none when None). candidates: who picks each step's
    tokens (HostCandidates when None)."""
    return run_search(step, GreedySearch(batch, settings, encoder, candidates))


def beam_search(
    step: StepFn,
    batch: int,
    settings: SearchSettings,
    encoder: EncoderTokens | None = None,
    candidates: Candidates | None = None,
) -> np.ndarray:
    """transformers' `_beam_search`: returns [batch * num_return_sequences, length] int64. encoder: the
    input ids repeated per beam, for the processors that read them (none when None). candidates: who
    picks each step's best continuations (HostCandidates when None)."""
    return run_search(step, BeamSearch(batch, settings, encoder, candidates))


class Search(Protocol):
    """One search over its own rows, advanced one decoder step at a time by whoever runs the decoder:
    run_search for a generate() call, the in-flight scheduler (runtime/inflight.py) for a request
    whose rows share each step with other requests' rows. Row r of the search is its r-th row."""

    rows: int

    def next_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, beam_idx) [rows] int64 of the next decoder step: every row's newest token and the
        row of the previous step it continues."""

    def advance(self, logits: np.ndarray) -> bool:
        """Choose this step's tokens from the decoder step's logits [rows, vocab]; True when done."""

    def result(self) -> np.ndarray:
        """The generated sequences, laid out as transformers' generate() returns them."""


def run_search(step: StepFn, search: Search) -> np.ndarray:
    """A whole search over a decoder StepFn of its own."""
    while not search.advance(step(*search.next_inputs())):
        pass
    return search.result()


def new_search(
    batch: int, settings: SearchSettings, encoder: EncoderTokens | None = None, candidates: Candidates | None = None
) -> Search:
    """The search these settings ask for: greedy with one beam, else beam search."""
    kind = GreedySearch if settings.num_beams == 1 else BeamSearch
    return kind(batch, settings, encoder, candidates)


class GreedySearch:
    """transformers' `_sample` with do_sample=False, one step per advance()."""

    def __init__(
        self,
        batch: int,
        settings: SearchSettings,
        encoder: EncoderTokens | None = None,
        candidates: Candidates | None = None,
    ):
        self.rows = batch
        self.settings = settings
        self.candidates = candidates or HostCandidates(settings, encoder)
        self.sequences = np.full((batch, 1), settings.decoder_start_token_id, dtype=np.int64)
        self.unfinished = np.ones(batch, dtype=bool)
        self._row_idx = np.arange(batch, dtype=np.int64)

    def next_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        return self.sequences[:, -1], self._row_idx

    def advance(self, logits: np.ndarray) -> bool:
        settings = self.settings
        next_tokens = self.candidates.greedy(logits, self.sequences)
        next_tokens = np.where(self.unfinished, next_tokens, settings.pad_token_id)
        self.sequences = np.concatenate([self.sequences, next_tokens[:, None]], axis=1)
        self.unfinished &= ~((next_tokens == settings.eos_token_id) | (self.sequences.shape[1] >= settings.max_length))
        return not self.unfinished.any()

    def result(self) -> np.ndarray:
        return self.sequences


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


class BeamSearch:
    """transformers' `_beam_search`, one step per advance()."""

    def __init__(
        self,
        batch: int,
        settings: SearchSettings,
        encoder: EncoderTokens | None = None,
        candidates: Candidates | None = None,
    ):
        self.settings = settings
        self.candidates = candidates or HostCandidates(settings, encoder)
        beams, max_length = settings.num_beams, settings.max_length
        self.rows = batch * beams
        self.keep = 2 * beams  # candidates kept per step: enough live ones even if `beams` of them end with EOS
        # transformers fills unused positions with `pad_token_id or eos_token_id`: EOS when pad is 0
        fill = settings.pad_token_id or settings.eos_token_id
        running = np.full((batch, beams, max_length), fill, dtype=np.int64)
        running[:, :, 0] = settings.decoder_start_token_id
        running_scores = np.zeros((batch, beams), dtype=np.float32)
        running_scores[:, 1:] = NEG_LARGE  # only the first beam is live at the start: no duplicate hypotheses
        indices = np.full((batch, beams, max_length - PROMPT_LEN), -1, dtype=np.int64)
        self.state = _BeamState(
            running=running,
            running_scores=running_scores,
            running_beam_indices=indices,
            sequences=running.copy(),
            scores=np.full((batch, beams), NEG_LARGE, dtype=np.float32),
            beam_indices=indices.copy(),
            finished=np.zeros((batch, beams), dtype=bool),
            improvable=np.ones((batch, 1), dtype=bool),
        )
        self._top_beams = np.arange(self.keep) < beams
        self._batch_offset = (np.arange(batch, dtype=np.int64) * beams)[:, None]
        self.beam_idx = np.arange(batch * beams, dtype=np.int64)
        self.cur_len = PROMPT_LEN

    def next_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        return self.state.running[:, :, self.cur_len - 1].reshape(-1), self.beam_idx

    def advance(self, logits: np.ndarray) -> bool:
        state, settings, cur_len, beams = self.state, self.settings, self.cur_len, self.settings.num_beams
        batch = state.running.shape[0]
        vocab = logits.shape[-1]
        sequences = state.running[:, :, :cur_len].reshape(batch * beams, cur_len)
        # top-k continuations over all beams of an input
        topk_scores, topk_flat = self.candidates.beam(logits, sequences, state.running_scores, self.keep)
        from_beam = topk_flat // vocab
        topk_running = _rows(state.running, from_beam)
        topk_running[:, :, cur_len] = topk_flat % vocab
        topk_indices = _rows(state.running_beam_indices, from_beam)
        topk_indices[:, :, cur_len - PROMPT_LEN] = from_beam + self._batch_offset
        ends = (topk_running[:, :, cur_len] == settings.eos_token_id) | (cur_len + 1 >= settings.max_length)

        # live beams for the next step: the best candidates that did not end
        if ends.any():
            live_scores = topk_scores + ends.astype(np.float32) * NEG_LARGE
            _, pick = top_k(live_scores, beams)
            state.running = _rows(topk_running, pick)
            state.running_scores = _rows(live_scores, pick)
            state.running_beam_indices = _rows(topk_indices, pick)
        else:  # the same picks, cheaper: candidates come best first, so the best `beams` are the first ones
            state.running = topk_running[:, :beams]
            state.running_scores = topk_scores[:, :beams]
            state.running_beam_indices = topk_indices[:, :beams]

        _update_finished(state, settings, topk_running, topk_scores, topk_indices, ends & self._top_beams, cur_len)

        self.beam_idx = state.running_beam_indices[:, :, cur_len - PROMPT_LEN].reshape(-1)
        self.cur_len += 1
        _update_improvable(state, settings, self.cur_len)
        all_done = bool(np.all(state.finished)) and settings.early_stopping is True
        return not state.improvable.any() or all_done or bool(np.all(ends))

    def result(self) -> np.ndarray:
        return _final_sequences(self.state, self.settings)


def _update_finished(state, settings, topk_running, topk_scores, topk_indices, just_finished, cur_len) -> None:
    penalty = np.float32((cur_len + 1 - PROMPT_LEN) ** settings.length_penalty)
    with np.errstate(over="ignore"):  # a large length penalty overflows to -inf, in float32 torch alike
        scores = topk_scores / penalty
    batch_full = np.all(state.finished, axis=-1, keepdims=True) & (settings.early_stopping is True)
    scores = scores + batch_full.astype(np.float32) * NEG_LARGE
    scores = scores + (~state.improvable).astype(np.float32) * NEG_LARGE
    scores = scores + (~just_finished).astype(np.float32) * NEG_LARGE
    if scores.max() <= state.scores.min():
        # nothing can enter: the kept hypotheses (best first) would win every comparison and every
        # tie (they come first), so the merge below would return them unchanged. The common case.
        return

    merged_scores = np.concatenate([state.scores, scores], axis=1)
    _, pick = top_k(merged_scores, settings.num_beams)
    state.scores = _rows(merged_scores, pick)
    merged = np.concatenate([state.sequences, topk_running], axis=1)
    state.sequences = _rows(merged, pick)
    merged_indices = np.concatenate([state.beam_indices, topk_indices], axis=1)
    state.beam_indices = _rows(merged_indices, pick)
    state.finished = _rows(np.concatenate([state.finished, just_finished], axis=1), pick)


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


def _rows(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """array[b, index[b, j], ...] for every input b: picks beams (or candidates) per input.

    Plain fancy indexing: the same as np.take_along_axis on axis 1, several times cheaper per call,
    which matters in a loop that runs once per generated token.
    """
    return array[np.arange(array.shape[0])[:, None], index]
