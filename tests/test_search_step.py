"""search_step.onnx: candidates chosen next to the logits equal the host's, processors included, and
the settings that need the rows' tokens, and exports made before the graph, take the host path."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
from helpers import exact_log_softmax, padded_batch, torch_generate

from ortseq.exporter.search_step import search_step_model
from ortseq.graphs import contract
from ortseq.graphs.generation import PROMPT_LEN
from ortseq.runtime import Seq2SeqModel
from ortseq.runtime.search import (
    EncoderTokens,
    HostCandidates,
    SearchSettings,
    needs_scores,
    process_scores,
    row_bans,
    row_independent_state,
)
from ortseq.runtime.search_step import DeviceCandidates, processor_bias
from ortseq.runtime.sessions import DeviceLogits

VOCAB = 1003


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(search_step_model().SerializeToString(), providers=["CPUExecutionProvider"])


class ArrayStep:
    """A decoder step driver's view for the search step: its logits in an OrtValue over numpy memory."""

    device = "cpu"

    def __init__(self, logits: np.ndarray):
        self.logits = logits
        self.logits_value = ort.OrtValue.ortvalue_from_numpy(logits)


def tied_logits(rng, rows: int, vocab: int = VOCAB) -> np.ndarray:
    """Few distinct values (many exact ties, within rows and across them) and -inf entries, whole -inf columns too."""
    logits = rng.integers(-4, 3, size=(rows, vocab)).astype(np.float32) / np.float32(2)
    logits[rng.random((rows, vocab)) < 0.3] = -np.inf
    logits[:, 7] = -np.inf
    logits[:, 0] = 1.5  # every row's maximum is finite
    return logits


@pytest.mark.parametrize("batch, beams", [(1, 2), (3, 4), (2, 8)])
def test_device_beam_candidates_equal_the_hosts_on_ties_and_inf(session, batch, beams):
    rng = np.random.default_rng(batch * beams)
    settings = SearchSettings(num_beams=beams, max_length=10)
    sequences = np.zeros((batch * beams, 3), dtype=np.int64)
    for trial in range(5):
        logits = tied_logits(rng, batch * beams)
        running = rng.integers(-6, 0, size=(batch, beams)).astype(np.float32) / np.float32(4)  # ties across beams
        if trial == 0:
            running[:, 1:] = np.float32(-1.0e9)  # the first step: only the first beam is live
        device = DeviceCandidates(session, ArrayStep(logits.copy()), settings).beam(
            logits.copy(), sequences, running, 2 * beams
        )
        host = HostCandidates(settings).beam(logits.copy(), sequences, running, 2 * beams)
        np.testing.assert_array_equal(device[1], host[1], f"trial {trial}: candidate ids")
        # onnxruntime's log_softmax (torch's arithmetic, bit for bit more often) and numpy's may round a
        # row's log-sum-exp one ulp apart: the same candidates, scores an ulp or two apart
        np.testing.assert_array_max_ulp(device[0], host[0], maxulp=2)


def test_device_greedy_tokens_equal_the_hosts_on_ties_and_inf(session):
    rng = np.random.default_rng(5)
    settings = SearchSettings(num_beams=1, max_length=10)
    for trial in range(5):
        logits = tied_logits(rng, 6)
        logits[trial, 3] = np.float32(1.5)  # a tie with column 0 for the maximum: the lower id wins
        sequences = np.zeros((6, 2), dtype=np.int64)
        device = DeviceCandidates(session, ArrayStep(logits.copy()), settings).greedy(logits.copy(), sequences)
        np.testing.assert_array_equal(device, HostCandidates(settings).greedy(logits.copy(), sequences))
        assert device.dtype == np.int64 and device.shape == (6,)


@pytest.mark.parametrize(
    "fields",
    [
        dict(no_repeat_ngram_size=2),
        dict(no_repeat_ngram_size=3, bad_words_ids=((2, 3), (4,), (1, 2, 5))),
        dict(encoder_no_repeat_ngram_size=2),
    ],
    ids=["no_repeat_2", "no_repeat_3_and_bad_words", "encoder_ngram_2"],
)
@pytest.mark.parametrize("beams", [1, 3])
def test_device_candidates_equal_the_hosts_with_each_rows_bans(session, fields, beams):
    """The bans of a row's own tokens go to the device as indices: tokens over a 6-id alphabet repeat often."""
    rng = np.random.default_rng(beams)
    batch = 2
    settings = SearchSettings(num_beams=beams, max_length=20, **fields)
    encoder = EncoderTokens(rng.integers(0, 6, (batch, 9)), beams, settings)
    for cur_len in (2, 5, 9):
        sequences = rng.integers(0, 6, (batch * beams, cur_len))
        assert len(row_bans(settings, sequences, VOCAB, encoder)[0]) > 0
        logits = rng.standard_normal((batch * beams, VOCAB)).astype(np.float32)
        logits[:, :6] += 4  # the banned ids are among the best candidates
        device = DeviceCandidates(session, ArrayStep(logits.copy()), settings, encoder)
        host = HostCandidates(settings, encoder)
        if beams == 1:
            expected = host.greedy(logits.copy(), sequences)
            np.testing.assert_array_equal(device.greedy(logits, sequences), expected, f"cur_len {cur_len}")
            continue
        running = rng.standard_normal((batch, beams)).astype(np.float32)
        scores, ids = device.beam(logits, sequences, running, 2 * beams)
        expected_scores, expected_ids = host.beam(logits.copy(), sequences, running, 2 * beams)
        np.testing.assert_array_equal(ids, expected_ids, f"cur_len {cur_len}")
        # each against the exact scores (float64): onnxruntime's CPU LogSoftmax (here only a stand-in for a
        # GPU's; the CPU default is the host) rounds by its SIMD's exp, measured 6.1 ulp on AVX2 (2 on AVX-512)
        exact = exact_beam_scores(logits, running, expected_ids)
        assert ulps(expected_scores, exact) <= 3 and ulps(scores, exact) <= 8, (
            ulps(expected_scores, exact),
            ulps(scores, exact),
        )


def exact_beam_scores(logits: np.ndarray, running: np.ndarray, flat_ids: np.ndarray) -> np.ndarray:
    """log_softmax(logits) + running score of each chosen (beam * vocab + token), in float64."""
    batch, beams = running.shape
    totals = exact_log_softmax(logits).reshape(batch, beams, -1) + running[:, :, None]
    return np.take_along_axis(totals.reshape(batch, -1), flat_ids, axis=1)


def ulps(values: np.ndarray, exact: np.ndarray) -> float:
    return float((np.abs(values - exact) / np.spacing(np.abs(values).astype(np.float32))).max())


def test_device_candidates_stay_valid_after_the_next_step(session):
    """The search keeps a step's scores (the running scores) while the next step runs."""
    rng = np.random.default_rng(3)
    settings = SearchSettings(num_beams=2, max_length=10)
    logits = rng.standard_normal((2, VOCAB)).astype(np.float32)
    candidates = DeviceCandidates(session, ArrayStep(logits), settings)
    sequences, running = np.zeros((2, 2), dtype=np.int64), np.zeros((1, 2), dtype=np.float32)
    first_scores, first_ids = candidates.beam(logits, sequences, running, 4)
    kept = first_scores.copy(), first_ids.copy()
    logits[:] = rng.standard_normal((2, VOCAB))
    candidates.beam(logits, sequences, running, 4)
    np.testing.assert_array_equal(first_scores, kept[0])
    np.testing.assert_array_equal(first_ids, kept[1])


ROW_INDEPENDENT = {
    "min_length": dict(min_length=5),
    "forced_bos": dict(forced_bos_token_id=11),
    "forced_eos": dict(forced_eos_token_id=12, max_length=8),
    "suppress": dict(suppress_tokens=(4, 9, 1002)),
    "begin_suppress": dict(begin_suppress_tokens=(1, 13)),
    "begin_suppress_after_forced_bos": dict(begin_suppress_tokens=(1, 11), forced_bos_token_id=11),
    "single_token_bad_words": dict(bad_words_ids=((5,), (1,), (17,))),  # [EOS] alone stays allowed
    "all_at_once": dict(
        min_length=6, forced_bos_token_id=3, forced_eos_token_id=12, max_length=7,
        suppress_tokens=(4, 12), begin_suppress_tokens=(1, 3), bad_words_ids=((9,),),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ROW_INDEPENDENT))
def test_processor_bias_equals_process_scores_at_every_length(name):
    settings = SearchSettings(num_beams=2, **{"max_length": 10, **ROW_INDEPENDENT[name]})
    rng = np.random.default_rng(0)
    bias_by_state = {}
    for cur_len in range(PROMPT_LEN, settings.max_length):
        assert not needs_scores(settings)
        scores = rng.standard_normal((4, VOCAB)).astype(np.float32)
        scores[:, rng.integers(0, VOCAB, 50)] = -np.inf
        bias = processor_bias(settings, cur_len, VOCAB)
        sequences = rng.integers(0, VOCAB, (4, cur_len))
        expected = process_scores(settings, sequences, scores.copy())
        forced = (settings.forced_bos_token_id is not None and cur_len == 1) or (
            settings.forced_eos_token_id is not None and cur_len == settings.max_length - 1
        )
        if bias is None:  # the host chooses: a forced token sets every score, none comes from the logits
            other = process_scores(settings, sequences, rng.standard_normal((4, VOCAB)).astype(np.float32))
            assert forced and np.array_equal(other, expected), f"cur_len {cur_len}"
            continue
        ours = scores + bias
        ours[row_bans(settings, sequences, VOCAB)] = -np.inf
        np.testing.assert_array_equal(ours, expected, f"cur_len {cur_len}")
        # the device path keeps one bias per state: equal states must mean equal biases
        state = row_independent_state(settings, cur_len)
        if state in bias_by_state:
            np.testing.assert_array_equal(bias_by_state[state], bias, f"cur_len {cur_len}")
        bias_by_state[state] = bias


class CountingSession:
    """An onnxruntime session that counts its runs: which steps the search step graph served."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.runs = 0

    def io_binding(self):
        return self.session.io_binding()

    def run_with_iobinding(self, binding) -> None:
        self.runs += 1
        self.session.run_with_iobinding(binding)


@pytest.fixture
def counted(exported):
    """(exported model, Seq2SeqModel whose search step session counts its runs, the candidates of its calls)."""
    model = exported("base")
    ours = Seq2SeqModel.load(model.export_dir)
    ours.sessions.search_step = CountingSession(ours.sessions.search_step)
    made, real = [], ours.engine.candidates

    def recording(*args):
        made.append(real(*args))
        return made[-1]

    ours.engine.candidates = recording
    return model, ours, made


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=4, max_new_tokens=14, min_new_tokens=5, length_penalty=0.6),
        dict(num_beams=1, max_new_tokens=12, min_new_tokens=3, suppress_tokens=[5, 6]),
        dict(num_beams=3, max_new_tokens=9, forced_bos_token_id=8, forced_eos_token_id=2, begin_suppress_tokens=[1]),
        dict(num_beams=4, max_new_tokens=20, no_repeat_ngram_size=2),
        dict(num_beams=1, max_new_tokens=20, no_repeat_ngram_size=3),
        dict(num_beams=2, max_new_tokens=10, bad_words_ids=[[5, 6], [7]]),
        dict(num_beams=4, max_new_tokens=10, encoder_no_repeat_ngram_size=1),
        dict(num_beams=3, max_new_tokens=12, encoder_no_repeat_ngram_size=2, no_repeat_ngram_size=2),
    ],
    ids=[
        "beam4_min_new_tokens",
        "greedy_suppress",
        "beam3_forced_tokens",
        "beam4_no_repeat_2",
        "greedy_no_repeat_3",
        "bad_words",
        "encoder_ngram1",
        "encoder_ngram2_and_no_repeat_2",
    ],
)
def test_generate_through_the_device_step_matches_transformers(counted, settings):
    model, ours, made = counted
    ids, mask = padded_batch(ours.manifest, [17, 6, 1], seed=4)
    out = ours.generate(ids, mask, **settings)
    np.testing.assert_array_equal(out, torch_generate(model.torch_model, ids, mask, settings))
    (candidates,) = made
    assert ours.sessions.search_step.runs == candidates.device_steps > 0
    # every step chose on the device but those of a forced token: the first, and the last if reached
    resolved, steps = ours.settings(**settings), candidates.device_steps + candidates.host_steps
    reached_last = steps == resolved.max_length - PROMPT_LEN
    forced = (resolved.forced_bos_token_id is not None) + (resolved.forced_eos_token_id is not None and reached_last)
    assert candidates.host_steps == forced


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=4, max_new_tokens=10, repetition_penalty=1.3),
        dict(num_beams=1, max_new_tokens=10, encoder_repetition_penalty=1.2),
        dict(num_beams=1, max_new_tokens=10, remove_invalid_values=True),
    ],
    ids=["repetition_penalty", "encoder_repetition_penalty", "remove_invalid"],
)
def test_settings_that_read_the_scores_choose_on_the_host(counted, settings):
    model, ours, made = counted
    ids, mask = padded_batch(ours.manifest, [12, 5], seed=8)
    out = ours.generate(ids, mask, **settings)
    np.testing.assert_array_equal(out, torch_generate(model.torch_model, ids, mask, settings))
    assert ours.sessions.search_step.runs == 0 and made[0].host_steps > 0


@pytest.mark.host_search_on_cpu
def test_cpu_provider_chooses_on_the_host_by_default(counted):
    """numpy is faster than the graph where the logits are in host memory already (runtime/engines.py)."""
    model, ours, made = counted
    settings = dict(num_beams=4, max_new_tokens=10)
    ids, mask = padded_batch(ours.manifest, [12, 5], seed=8)
    np.testing.assert_array_equal(
        ours.generate(ids, mask, **settings), torch_generate(model.torch_model, ids, mask, settings)
    )
    assert isinstance(made[0], HostCandidates) and ours.sessions.search_step.runs == 0


def test_export_without_a_search_step_graph_chooses_on_the_host(exported, tmp_path):
    """Exports made before search_step.onnx keep running, with the same tokens."""
    model = exported("base")
    old = tmp_path / "old_export"
    shutil.copytree(model.export_dir, old)
    (old / contract.SEARCH_STEP_FILE).unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"][contract.SEARCH_STEP_FILE]
    (old / "manifest.json").write_text(json.dumps(manifest))
    ours = Seq2SeqModel.load(old)
    assert ours.sessions.search_step is None
    ids, mask = padded_batch(ours.manifest, [15, 3], seed=2)
    for settings in (dict(num_beams=4, max_new_tokens=12), dict(num_beams=1, max_new_tokens=12)):
        expected = torch_generate(model.torch_model, ids, mask, settings)
        np.testing.assert_array_equal(ours.generate(ids, mask, **settings), expected)


def test_every_export_lists_and_hashes_its_search_step_graph(exported):
    ours = Seq2SeqModel.load(exported("base").export_dir)
    assert contract.SEARCH_STEP_FILE in ours.manifest.files
    assert contract.SEARCH_STEP_FILE in ours.manifest.runtime_files()
    assert ours.sessions.search_step is not None


def test_needs_scores_only_for_processors_that_read_the_values():
    settings = SearchSettings(num_beams=2, max_length=10, no_repeat_ngram_size=3, bad_words_ids=((4, 5),))
    assert not needs_scores(settings)
    assert needs_scores(replace(settings, repetition_penalty=1.2))
    assert needs_scores(replace(settings, remove_invalid_values=True))


class CountedDeviceLogits(DeviceLogits):
    """DeviceLogits that count their copies to the host."""

    copies = 0

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        CountedDeviceLogits.copies += 1
        return super().__array__(dtype, copy)


class LogitsLeftOnDevice:
    """A CPU decoder step that hands the search its logits as a GPU driver does: a handle, not an array."""

    def __init__(self, step):
        self.step, self.device, self.logits_value = step, step.device, step.logits_value

    def __call__(self, tokens, beam_idx):
        self.step(tokens, beam_idx)
        return CountedDeviceLogits(self.logits_value)


@pytest.mark.parametrize(
    "settings, on_device",
    [
        (dict(num_beams=4, max_new_tokens=10, min_new_tokens=10, no_repeat_ngram_size=2), True),
        (dict(num_beams=1, max_new_tokens=10, min_new_tokens=10), True),
        (dict(num_beams=4, max_new_tokens=10, min_new_tokens=10, repetition_penalty=1.3), False),
    ],
    ids=["beam4", "greedy", "beam4_repetition_penalty"],
)
def test_logits_left_on_the_device_cross_to_the_host_only_for_a_host_choice(counted, monkeypatch, settings, on_device):
    """Only the steps chosen on the host copy the logits: those of a forced token (this model forces EOS
    last) and every step of a setting that reads the scores."""
    model, ours, made = counted
    start = ours.sessions.start
    monkeypatch.setattr(ours.sessions, "start", lambda *args, **kwargs: LogitsLeftOnDevice(start(*args, **kwargs)))
    CountedDeviceLogits.copies = 0
    ids, mask = padded_batch(ours.manifest, [12, 5], seed=8)
    out = ours.generate(ids, mask, **settings)
    np.testing.assert_array_equal(out, torch_generate(model.torch_model, ids, mask, settings))
    (candidates,) = made
    assert CountedDeviceLogits.copies == candidates.host_steps
    assert (candidates.device_steps >= 9) if on_device else (candidates.device_steps == 0)
