"""In-flight batching (runtime/inflight.py, runtime/serving/scheduler.py): requests of any settings join
and leave one running decode loop at every step, and each gets exactly the tokens it gets alone."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import SHAPES, torch_generate, wait_until

from ortseq.exporter.pipeline import export
from ortseq.exporter.tiny.pegasus import build_tiny_pegasus
from ortseq.runtime import Seq2SeqModel
from ortseq.runtime.errors import InvalidInputError
from ortseq.runtime.inflight import InflightDecoder, RowBudget, RowRequest, open_inflight_decoder
from ortseq.runtime.serving.app import create_app
from ortseq.runtime.serving.batcher import BatchingConfig, QueueFullError
from ortseq.runtime.serving.inference import summarize_rows
from ortseq.runtime.serving.metrics import ServingMetrics
from ortseq.runtime.serving.scheduler import InflightScheduler, _Job


@pytest.fixture(scope="module")
def inflight_export(tmp_path_factory):
    """tiny-pegasus (base shape) exported with decoder_inflight.onnx; (export dir, torch model)."""
    from transformers import PegasusForConditionalGeneration

    root = tmp_path_factory.mktemp("inflight")
    checkpoint = build_tiny_pegasus(root / "checkpoint", SHAPES["base"], seed=1)
    export(str(checkpoint), root / "export", inflight=True)
    return root / "export", PegasusForConditionalGeneration.from_pretrained(str(checkpoint)).eval()


@pytest.fixture(scope="module")
def model(inflight_export):
    return Seq2SeqModel.load(inflight_export[0])


def running_set(model, max_rows: int, max_len: int = 40) -> InflightDecoder:
    inflight = open_inflight_decoder(model.sessions, model.directory, "cpu", None)
    return InflightDecoder(model.sessions, inflight, RowBudget(max_rows, max_len))


def random_settings(rng: np.random.Generator, vocab: int) -> dict:
    """A request's settings: any beam count, length and logits processor generate() takes."""
    beams = int(rng.choice([1, 1, 2, 3, 4, 8]))
    settings = dict(num_beams=beams, max_new_tokens=int(rng.integers(1, 26)))
    token = lambda: int(rng.integers(3, vocab))  # noqa: E731
    optional = {
        "min_new_tokens": lambda: int(rng.integers(1, settings["max_new_tokens"] + 1)),
        "no_repeat_ngram_size": lambda: int(rng.choice([2, 3])),
        "encoder_no_repeat_ngram_size": lambda: 2,
        "repetition_penalty": lambda: float(rng.choice([0.8, 1.3])),
        "encoder_repetition_penalty": lambda: 1.2,
        "length_penalty": lambda: float(rng.choice([-0.5, 0.6, 2.0])),
        "early_stopping": lambda: [True, False, "never"][int(rng.integers(3))],
        "bad_words_ids": lambda: [[token()], [token(), token()]],
        "suppress_tokens": lambda: [token()],
        "begin_suppress_tokens": lambda: [token()],
        "forced_bos_token_id": token,
        "forced_eos_token_id": lambda: 1,
        "remove_invalid_values": lambda: True,
        "num_return_sequences": lambda: int(rng.integers(1, beams + 1)),
    }
    for name, value in optional.items():
        if rng.random() < 0.15:
            settings[name] = value()
    return settings


class Run:
    """Requests arriving at given steps, admitted first come first served while the rows allow, stepped
    until all are done; what the cases saw, to check that they discriminate."""

    def __init__(self, model, decoder: InflightDecoder, arrivals: list[tuple[int, np.ndarray, dict]]):
        self.done: list[RowRequest] = []
        self.max_ages = self.max_beam_kinds = self.waits = 0
        pending, waiting, step = sorted(arrivals, key=lambda a: a[0]), [], 0
        while pending or waiting or decoder.running:
            while pending and pending[0][0] <= step:
                _, ids, settings = pending.pop(0)
                waiting.append(RowRequest(ids, np.ones_like(ids), model.settings(**settings), tag=settings))
            while waiting and decoder.admit(waiting[0]):
                waiting.pop(0)
            self.waits += bool(waiting)
            self.max_ages = max(self.max_ages, len({r.position for r in decoder.running}))
            self.max_beam_kinds = max(self.max_beam_kinds, len({r.rows for r in decoder.running}))
            self.done += decoder.step()
            step += 1


def random_arrivals(rng: np.random.Generator, vocab: int) -> list[tuple[int, np.ndarray, dict]]:
    """3-8 requests: arrival step, input ids of 1-69 tokens, random settings."""
    arrivals = []
    for _ in range(int(rng.integers(3, 9))):
        ids = rng.integers(3, vocab, size=(1, int(rng.integers(1, 70))))
        arrivals.append((int(rng.integers(0, 25)), ids, random_settings(rng, vocab)))
    return arrivals


def assert_mixes_match_solo(model, rng: np.random.Generator, cases: int) -> dict:
    """Seeded random cases (arrival steps, source lengths, settings, row budgets): each request's tokens
    must equal those of generate() on its input alone. Returns what the cases saw."""
    vocab = model.manifest.dims.vocab_size
    eos = model.manifest.special_tokens.eos_token_id
    seen = {"lengths": set(), "eos": 0, "max_length": 0, "ages": 0, "kinds": 0, "waits": 0, "requests": 0}
    for case in range(cases):
        arrivals = random_arrivals(rng, vocab)
        run = Run(model, running_set(model, max_rows=int(rng.integers(8, 20))), arrivals)
        assert len(run.done) == len(arrivals)
        for request in run.done:
            solo = model.generate(request.input_ids, **request.tag)
            assert solo.shape == request.output.shape and np.array_equal(solo, request.output), (
                f"case {case}: {request.tag}\nsolo {solo}\nin-flight {request.output}"
            )
            seen["lengths"].add(solo.shape[1])
            ended = (solo[:, 1:] == eos).any()
            seen["eos"] += bool(ended)
            seen["max_length"] += solo.shape[1] == request.settings.max_length
        seen["ages"] = max(seen["ages"], run.max_ages)
        seen["kinds"] = max(seen["kinds"], run.max_beam_kinds)
        seen["waits"] += run.waits
        seen["requests"] += len(run.done)
    return seen


def test_every_request_gets_its_solo_tokens_whatever_arrives_beside_it(model):
    seen = assert_mixes_match_solo(model, np.random.default_rng(26), cases=24)
    # the cases discriminate: lengths vary, searches end by EOS and by max_length, the running set mixes
    # requests of several ages and beam counts, and admissions wait for rows
    assert len(seen["lengths"]) >= 10, seen
    assert seen["eos"] >= 20 and seen["max_length"] >= 10, seen
    assert seen["ages"] >= 4 and seen["kinds"] >= 3 and seen["waits"] >= 10, seen


@pytest.fixture(scope="module")
def quantized_inflight(inflight_export, tmp_path_factory):
    """quantized(fmt) -> Seq2SeqModel of the in-flight export quantized to fmt (made once)."""
    from ortseq.exporter.quantization.pipeline import quantize
    from ortseq.exporter.quantization.quality import ReportSettings

    root, cache = tmp_path_factory.mktemp("inflight-quantized"), {}

    def get(fmt: str) -> Seq2SeqModel:
        if fmt not in cache:
            # the quality gate is not what these tests check (random weights): a short report, no threshold
            report = ReportSettings(num_beams=1, max_new_tokens=4, logit_steps=1)
            texts = ["The river bridge will open next year."]
            quantize(inflight_export[0], root / fmt, fmt, min_agreement=0.0, texts=texts, report_settings=report)
            cache[fmt] = Seq2SeqModel.load(root / fmt)
        return cache[fmt]

    return get


@pytest.mark.parametrize("fmt", ["int4", "fp16"])
def test_quantized_inflight_requests_get_their_solo_tokens_in_any_mix(quantized_inflight, fmt):
    """int4 (its activations quantized per row and block) and fp16 compute each row on its own, as fp32
    does: in any mix, a request gets the tokens the quantized generate() gives it alone."""
    model = quantized_inflight(fmt)
    assert model.manifest.precision == fmt and "decoder_inflight.onnx" in model.manifest.files
    seen = assert_mixes_match_solo(model, np.random.default_rng(27), cases=6)
    assert len(seen["lengths"]) >= 6 and seen["eos"] >= 3 and seen["max_length"] >= 3, seen
    assert seen["ages"] >= 3 and seen["kinds"] >= 3, seen


def test_int8_inflight_requests_alone_get_their_solo_tokens(quantized_inflight):
    """int8 quantizes each MatMul's activations with one scale over all the rows of the call, so a row's
    tokens depend on the rows beside it, in generate() (its batch) as in the running set: the in-flight
    graph is checked with each request of a seeded mix running alone, where the rows are generate()'s."""
    model = quantized_inflight("int8")
    assert model.manifest.precision == "int8" and "decoder_inflight.onnx" in model.manifest.files
    rng, vocab = np.random.default_rng(28), model.manifest.dims.vocab_size
    eos = model.manifest.special_tokens.eos_token_id
    lengths, beams, eos_ends, full = set(), set(), 0, 0
    for _ in range(4):
        for _, ids, settings in random_arrivals(rng, vocab):
            (request,) = Run(model, running_set(model, max_rows=8), [(0, ids, settings)]).done
            solo = model.generate(ids, **settings)
            assert solo.shape == request.output.shape and np.array_equal(solo, request.output), (
                f"{settings}\nsolo {solo}\nin-flight {request.output}"
            )
            lengths.add(solo.shape[1])
            beams.add(request.rows)
            eos_ends += bool((solo[:, 1:] == eos).any())
            full += solo.shape[1] == request.settings.max_length
    assert len(lengths) >= 6 and len(beams) >= 3 and eos_ends >= 3 and full >= 3, (lengths, beams, eos_ends, full)


def test_requests_side_by_side_match_transformers(model, inflight_export):
    """A sample against transformers' generate() on each input alone (the checkpoint's torch model)."""
    torch_model = inflight_export[1]
    rng = np.random.default_rng(7)
    vocab = model.manifest.dims.vocab_size
    settings = [
        dict(num_beams=4, max_new_tokens=14, length_penalty=0.6),
        dict(num_beams=1, max_new_tokens=20, no_repeat_ngram_size=2),
        dict(num_beams=2, max_new_tokens=10, min_new_tokens=7),
        dict(num_beams=8, max_new_tokens=12, early_stopping=True),
        dict(num_beams=4, max_new_tokens=16, repetition_penalty=1.3, bad_words_ids=[[5], [7, 9]]),
        dict(),  # the checkpoint's own defaults
    ]
    arrivals = [(step, rng.integers(3, vocab, size=(1, length)), s) for step, length, s in zip(
        [0, 0, 2, 3, 5, 9], [40, 5, 17, 1, 60, 23], settings
    )]  # fmt: skip
    run = Run(model, running_set(model, max_rows=16), arrivals)
    lengths = set()
    for request in run.done:
        ids = request.input_ids
        expected = torch_generate(torch_model, ids, np.ones_like(ids), request.tag)
        np.testing.assert_array_equal(request.output, expected, f"{request.tag}")
        lengths.add(expected.shape[1])
    assert len(lengths) >= 4 and run.max_ages >= 3, (lengths, run.max_ages)


def test_the_oldest_waiting_request_is_admitted_first(model):
    """A 4-beam request that does not fit waits, and a greedy one behind it does not overtake it."""
    config = BatchingConfig(scheduler="inflight", max_rows=4, max_decoder_tokens=40)
    scheduler = InflightScheduler(model, config, ServingMetrics())
    ids = np.asarray([[5, 6, 7]], dtype=np.int64)

    def request(**settings):
        row_request = RowRequest(ids, np.ones_like(ids), model.settings(**settings))
        row_request.tag = _Job(concurrent.futures.Future(), [[5, 6, 7]], [row_request])
        return row_request

    first = request(num_beams=2, max_new_tokens=10, min_new_tokens=10)
    assert scheduler.decoder.admit(first)
    wide, narrow = request(num_beams=4, max_new_tokens=3), request(num_beams=1, max_new_tokens=3)
    scheduler._waiting = [wide, narrow]
    assert scheduler._admit() == 0 and scheduler._waiting == [wide, narrow]
    scheduler.decoder.retire(first)
    assert scheduler._admit() == 1 and scheduler._waiting == [narrow]  # rows for the wide one only


def test_budget_and_missing_graph_are_refused_by_name(model, exported):
    decoder = running_set(model, max_rows=4, max_len=10)
    with pytest.raises(InvalidInputError, match="max-decoder-tokens"):
        decoder.check(model.settings(max_new_tokens=20))
    with pytest.raises(InvalidInputError, match="num_beams=8 exceeds the scheduler's 4 rows"):
        decoder.check(model.settings(num_beams=8))
    plain = Seq2SeqModel.load(exported("base").export_dir)
    with pytest.raises(InvalidInputError, match="--inflight"):
        open_inflight_decoder(plain.sessions, plain.directory, "cpu", None)


def test_queue_bound_and_withdrawn_requests_leave_at_the_next_step(model):
    """A request withdrawn mid-run leaves before the next decoder step: the step that follows its
    withdrawal retires it and runs nothing. Its decoder steps are held at HELD_AT until the withdrawal
    has happened, so no timing decides where in its 60 steps it is withdrawn."""
    held_at = 5

    async def scenario():
        metrics = ServingMetrics()
        config = BatchingConfig(scheduler="inflight", max_queue=1, max_rows=8, max_decoder_tokens=64)
        scheduler = InflightScheduler(model, config, metrics)
        scheduler._loop = asyncio.get_running_loop()  # not started: submissions stay queued
        long = model.settings(num_beams=4, max_new_tokens=60, min_new_tokens=60)
        future = scheduler.submit(long, {}, [[5, 6, 7]])
        with pytest.raises(QueueFullError):
            scheduler.submit(long, {}, [[5, 6, 7]])
        request = scheduler._inbox[0].requests[0]
        held, withdrawn = threading.Event(), threading.Event()
        decoder_step = scheduler.decoder.step

        def step_held_mid_run():  # the worker's decoder step; the warm-up's request passes freely
            finished = decoder_step()
            if request.position == held_at and request in scheduler.decoder.running:
                held.set()
                assert withdrawn.wait(60), "the test never withdrew the request"
            return finished

        scheduler.decoder.step = step_held_mid_run
        scheduler._thread.start()
        assert await asyncio.to_thread(held.wait, 60), "the request never ran"
        steps_then = metrics.steps._value.get()  # the held step is not counted yet
        future.cancel()
        withdrawn.set()
        await asyncio.to_thread(wait_until, lambda: not scheduler.decoder.running, "its rows are retired", 60)
        assert metrics.retired_abandoned._value.get() == 1
        assert metrics.steps._value.get() - steps_then == 1  # only the held step: no step ran after it
        assert request.position == held_at and request.output is None  # left mid-run, unfinished
        await scheduler.close()

    asyncio.run(scenario())


def test_server_answers_mixed_concurrent_requests_as_alone(model):
    """Over HTTP: concurrent requests of different settings, each answered as summarize_rows alone would."""
    texts = ["The council said the bridge will open next year.", "Water reached the station.", "Police said."]
    params = [
        {"num_beams": 4, "max_new_tokens": 12},
        {"num_beams": 1, "max_new_tokens": 20},
        {"num_beams": 2, "max_new_tokens": 6, "no_repeat_ngram_size": 2},
    ]
    config = BatchingConfig(scheduler="inflight", max_rows=8, max_decoder_tokens=40)
    with TestClient(create_app(model, batching=config)) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, "the server is ready", 120)
        answers: dict[int, dict] = {}

        def ask(index: int) -> None:
            body = {"inputs": texts[index : index + 2], "parameters": params[index]}
            answers[index] = client.post("/v1/summarize", json=body).json()

        threads = [threading.Thread(target=ask, args=(index,)) for index in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        metrics = client.get("/metrics").text
    for index in range(3):
        alone = [
            summarize_rows(model, params[index], [row]) for row in model.tokenizer.token_ids(texts[index : index + 2])
        ]
        assert answers[index]["summaries"] == [summary[0].text for summary in alone], answers[index]
        assert answers[index]["output_tokens"] == [len(summary[0].output_ids) for summary in alone]
    assert "ortseq_scheduler_steps_total" in metrics and "ortseq_queue_wait_seconds_count" in metrics
