"""The single-graph BeamSearch-op export returns what ortseq's own search loop returns."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import padded_batch

from ortseq.exporter.beam_search_op import export_beam_search_graph
from ortseq.graphs.contract import BEAM_SEARCH_FILE
from ortseq.runtime import Seq2SeqModel
from ortseq.runtime.beam_search_op import BeamSearchOpModel

# Settings whose semantics the op shares with transformers (and so with ortseq); forced EOS is done
# by our decoder subgraph. no_repeat_ngram_size and early_stopping are fixed in the graph (0, True).
SETTINGS = {
    "greedy_exact_64": dict(num_beams=1, max_new_tokens=64, min_new_tokens=64),
    "greedy_min_new_tokens": dict(num_beams=1, max_new_tokens=30, min_new_tokens=5),
    "beam8_exact_64": dict(num_beams=8, max_new_tokens=64, min_new_tokens=64, length_penalty=0.6),
    "beam4_lp1": dict(num_beams=4, max_new_tokens=40, length_penalty=1.0),
    "beam8_lp2": dict(num_beams=8, max_new_tokens=20, length_penalty=2.0),
    "beam4_return3": dict(num_beams=4, max_new_tokens=24, num_return_sequences=3, length_penalty=0.6),
}


@pytest.fixture(scope="module")
def both(exported, tmp_path_factory):
    model = exported("base")
    directory = tmp_path_factory.mktemp("beam_search_op")
    export_beam_search_graph(model.checkpoint, directory / BEAM_SEARCH_FILE)
    return BeamSearchOpModel.load(directory, threads=1), Seq2SeqModel.load(model.export_dir, threads=1)


@pytest.mark.parametrize("name", SETTINGS)
def test_beam_search_op_matches_ortseq_loop_on_padded_batch(both, name):
    op, loop = both
    ids, mask = padded_batch(loop.manifest, [40, 17, 29], seed=3)
    settings = {"length_penalty": 1.0, "min_new_tokens": 0} | SETTINGS[name]
    expected = loop.generate(ids, mask, early_stopping=True, **settings)
    got = op.generate(ids, mask, **settings)
    np.testing.assert_array_equal(got, expected)
    ended = (expected[:, 1:] == loop.manifest.special_tokens.eos_token_id).any(axis=1)
    assert name.endswith("64") or ended.any(), "the case should exercise finished hypotheses"
