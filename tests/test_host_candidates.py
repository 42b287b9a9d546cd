"""The beam search's candidates on the host (runtime/search.py). top_k: torch.topk's values, and on
ties the lower id first (a whole-row stable sort's pick; torch leaves the order of ties to its
kernel), from strided column groups or, where ties make those many (a step that forces one token:
every other score -inf), from a few contiguous blocks of the row, not all of it. log_softmax_: the same values whatever the size of its scratch buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import exact_log_softmax

from ortseq.runtime import search
from ortseq.runtime.search import _best_block_members, log_softmax_, top_k

BEAMS, VOCAB = 8, 96103  # pegasus-xsum: 8 beams of a 96k vocabulary, flattened per input
KEEP = 2 * BEAMS


def check_top_k(scores: np.ndarray) -> None:
    values, ids = top_k(scores, KEEP)
    np.testing.assert_array_equal(values, torch.topk(torch.from_numpy(scores), KEEP, dim=1).values.numpy())
    stable_ids = np.argsort(-scores, axis=1, kind="stable")[:, :KEEP]
    np.testing.assert_array_equal(ids, stable_ids)


def forced_token_scores(batch: int, token: int) -> np.ndarray:
    """Log-probs plus running scores on a forced-token step (forced EOS at max_length - 1): each beam's
    `token` is finite, every other id -inf."""
    scores = np.full((batch, BEAMS, VOCAB), -np.inf, dtype=np.float32)
    scores[:, :, token] = -np.arange(1, BEAMS + 1, dtype=np.float32)
    return scores.reshape(batch, -1)


def test_top_k_picks_torchs_values_and_the_lowest_tied_ids_on_a_forced_token_step():
    check_top_k(forced_token_scores(batch=2, token=1))
    check_top_k(forced_token_scores(batch=2, token=VOCAB - 1))  # in the last, shorter block


def test_a_forced_token_step_reads_only_a_few_blocks_of_the_row():
    # all blocks but the beams' tie at -inf: before, every one of them became a candidate ([2, 769k]
    # int64 ids and their scores, ~100 MB at batch 8, the peak of a whole generate() call)
    scores = forced_token_scores(batch=2, token=1)
    block = int(np.sqrt(scores.shape[1] / KEEP))
    assert _best_block_members(scores, KEEP).shape[1] <= 2 * KEEP * block


@pytest.mark.parametrize("seed", range(4))
def test_top_k_picks_torchs_values_and_the_lowest_tied_ids_on_tied_and_infinite_scores(seed):
    rng = np.random.default_rng(seed)
    scores = (rng.integers(-6, 2, size=(3, BEAMS * 5003)) / 2).astype(np.float32)
    scores[rng.random(scores.shape) < 0.5] = -np.inf
    scores[1] = -np.inf  # a row with no finite score at all
    scores[1, 40000] = 0.0
    check_top_k(scores)


@pytest.mark.parametrize("seed", range(4))
def test_top_k_keeps_the_lowest_ids_of_a_tie_across_the_kth_place_from_the_strided_groups(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 4, size=(3, BEAMS * VOCAB)).astype(np.float32)
    best = scores.max() + 1
    for row in scores:
        places = rng.choice(row.size, 25, replace=False)
        row[places[:5]], row[places[5:]] = best + 1, best  # places 6 to 25 tie: the KEEP - 5 lowest ids win
    monkeypatch.setattr(search, "_best_block_members", lambda *_: pytest.fail("few ties take the strided groups"))
    check_top_k(scores)


@pytest.mark.parametrize("rows, scratch_rows", [(64, 8), (13, 8), (3, 8), (64, 64)])
def test_log_softmax_is_the_same_with_a_scratch_of_a_few_rows(rows, scratch_rows):
    logits = np.random.default_rng(rows).normal(0, 4, size=(rows, VOCAB)).astype(np.float32)
    whole = log_softmax_(logits.copy(), np.empty_like(logits))
    scratch = np.empty((min(rows, scratch_rows), VOCAB), dtype=np.float32)
    np.testing.assert_array_equal(log_softmax_(logits.copy(), scratch), whole)
    # Against the exact values (float64, rounded once), within 2 float32 ulps of the largest: torch's own
    # float32 kernel is no reference here, its error depends on the CPU's SIMD (on AVX2 it was 2.4e-5 of
    # values up to 40, a per-row offset of its sum of exps; numpy's 3.7e-6).
    exact = exact_log_softmax(logits).astype(np.float32)
    assert np.abs(whole - exact).max() <= 2 * np.spacing(np.abs(exact).max())
