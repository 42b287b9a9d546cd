"""`ortseq serve`: dynamic batching, the HTTP API and its errors, overload, disconnects, SIGTERM."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import metric_value, wait_until

from ortseq.runtime import Seq2SeqModel
from ortseq.runtime.serving.app import create_app
from ortseq.runtime.serving.batcher import BatchingConfig, DynamicBatcher, QueueFullError
from ortseq.runtime.serving.inference import summarize_rows
from ortseq.runtime.serving.metrics import ServingMetrics
from ortseq.runtime.serving.schema import RequestLimits

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "The city council said the new river bridge will open next year after the election.",
    "Police said the museum was closed on Sunday.",
    "Water reached the station.",
    "The minister reported that the bridge, the museum and the station will all reopen in spring, "
    "after the river has gone back down and engineers have checked every building near it.",
]
# A request for exactly HELD_TOKENS new tokens keeps the worker inside generate() until the test releases it
# (HeldModel in-process, HELD_SERVE for a server process): no test depends on how long a generate call takes.
HELD_TOKENS = 7
HELD_REQUEST = {"inputs": TEXTS * 2, "parameters": {"max_new_tokens": HELD_TOKENS, "min_new_tokens": HELD_TOKENS}}
RELEASE_TIMEOUT_S = 120  # only against a hang: a test that forgets to release fails instead of blocking forever


class HeldModel:
    """The model, except that generate() for HELD_TOKENS new tokens waits in the worker thread for release()."""

    def __init__(self, model: Seq2SeqModel):
        self._model = model
        self.entered = threading.Event()
        self._released = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def generate(self, *args, **kwargs):
        if kwargs.get("max_new_tokens") == HELD_TOKENS:
            self.entered.set()
            assert self._released.wait(RELEASE_TIMEOUT_S), "the test never released generate()"
        return self._model.generate(*args, **kwargs)

    def release(self) -> None:
        self._released.set()


@pytest.fixture(scope="module")
def model(exported) -> Seq2SeqModel:
    return Seq2SeqModel.load(exported("base").export_dir)


def sample(metrics: ServingMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def random_rows(model: Seq2SeqModel, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    eos = model.manifest.special_tokens.eos_token_id
    return [[*map(int, rng.integers(3, model.manifest.dims.vocab_size, size=n - 1)), eos] for n in lengths]


async def run_jobs(model, config: BatchingConfig, jobs: list[tuple[dict, list[list[int]]]], cancel: set[int] = ()):
    """Submit every job before the batcher starts (so they are all queued together), cancel some, run."""
    metrics = ServingMetrics()
    batcher = DynamicBatcher(lambda kwargs, rows: summarize_rows(model, kwargs, rows), config, metrics)
    futures = [batcher.submit(model.settings(**kwargs), kwargs, rows) for kwargs, rows in jobs]
    for index in cancel:
        futures[index].cancel()
    batcher.start()
    results = await asyncio.gather(*(f for i, f in enumerate(futures) if i not in cancel))
    await batcher.close()
    return results, metrics


@pytest.mark.parametrize("kwargs", [{"num_beams": 1, "max_new_tokens": 24}, {"num_beams": 4, "max_new_tokens": 24}])
def test_batched_requests_get_exactly_the_tokens_they_get_alone(model, kwargs):
    positions = model.manifest.dims.max_position_embeddings
    lengths = [[1, positions], [7], [positions // 2, 3, 30], [12]]  # requests of 2, 1, 3 and 1 rows
    jobs = [(kwargs, random_rows(model, request, seed=i)) for i, request in enumerate(lengths)]
    results, metrics = asyncio.run(run_jobs(model, BatchingConfig(max_batch_size=16, max_wait_ms=0), jobs))
    assert sample(metrics, "ortseq_batch_size_count") == 1  # all seven rows ran in one generate call
    assert sample(metrics, "ortseq_batch_size_sum") == 7
    for (_, rows), summaries in zip(jobs, results):
        assert len(summaries) == len(rows)
        for row, summary in zip(rows, summaries):
            alone = summarize_rows(model, kwargs, [row])[0]
            assert summary.output_ids == alone.output_ids and summary.text == alone.text
            assert summary.input_tokens == len(row)


def test_only_requests_with_equal_settings_are_merged_and_batches_stay_bounded(model):
    greedy, beams = {"num_beams": 1, "max_new_tokens": 8}, {"num_beams": 2, "max_new_tokens": 8}
    jobs = [(greedy, random_rows(model, [5], seed=i)) for i in range(5)] + [(beams, random_rows(model, [6, 9]))]
    results, metrics = asyncio.run(run_jobs(model, BatchingConfig(max_batch_size=2, max_wait_ms=0), jobs))
    assert sample(metrics, "ortseq_batch_size_count") == 4  # greedy 2 + 2 + 1 rows, beams 2 rows
    assert sample(metrics, "ortseq_batch_size_bucket", le="2.0") == 4
    for (kwargs, rows), summaries in zip(jobs, results):
        assert [s.output_ids for s in summaries] == [s.output_ids for s in summarize_rows(model, kwargs, rows)]


def test_a_withdrawn_request_is_dropped_before_it_runs(model):
    kwargs = {"num_beams": 1, "max_new_tokens": 8}
    jobs = [(kwargs, random_rows(model, [5], seed=i)) for i in range(3)]
    _, metrics = asyncio.run(run_jobs(model, BatchingConfig(max_wait_ms=0), jobs, cancel={1}))
    assert sample(metrics, "ortseq_batch_size_sum") == 2


def test_a_full_queue_refuses_work_instead_of_growing(model):
    async def fill() -> None:
        batcher = DynamicBatcher(lambda kwargs, rows: [], BatchingConfig(max_queue=2), ServingMetrics())
        for _ in range(2):
            batcher.submit(model.settings(), {}, [[5, 1]])
        with pytest.raises(QueueFullError):
            batcher.submit(model.settings(), {}, [[5, 1]])

    asyncio.run(fill())


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, RequestLimits(max_inputs=4, max_input_tokens=40))) as client:
        wait_until_ready(lambda: client.get("/readyz").status_code)
        yield client


def wait_until_ready(readyz_status) -> None:
    wait_until(lambda: readyz_status() == 200, "the server is ready")


def test_summarize_returns_the_python_api_summaries_and_token_counts(client, model):
    parameters = {"num_beams": 3, "max_new_tokens": 12, "no_repeat_ngram_size": 2, "length_penalty": 0.6}
    response = client.post("/v1/summarize", json={"inputs": TEXTS[:3], "parameters": parameters})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["summaries"] == model.summarize(TEXTS[:3], batch_size=1, **parameters)
    assert body["input_tokens"] == [len(ids) for ids in model.tokenizer.token_ids(TEXTS[:3])]
    assert all(1 <= n <= 12 for n in body["output_tokens"])


@pytest.mark.parametrize(
    "body, status, says",
    [
        ('{"inputs": ["a"', 400, "not valid JSON"),
        ('["a text"]', 422, "valid dictionary"),
        ('{"texts": ["a"]}', 422, "texts: unknown field; allowed: inputs, parameters"),
        ('{"inputs": "a text"}', 422, "inputs: Input should be a valid list"),
        ('{"inputs": [1]}', 422, "input 1: Input should be a valid string"),
        ('{"inputs": []}', 422, "inputs: List should have at least 1 item"),
        ('{"inputs": ["a", "b", "c", "d", "e"]}', 422, "5 inputs in one request; this server takes at most 4"),
        ('{"inputs": ["   "]}', 422, "input 1 is empty or only whitespace"),
        ('{"inputs": ["ok", "caf\\udce9"]}', 422, "input 2 is not UTF-8 text (character 4"),
        ('{"inputs": ["ok", "' + "word " * 60 + '"]}', 422, "limit of 40 tokens (input 2 has "),
        ('{"inputs": ["a"], "parameters": {"beams": 2}}', 422, "parameters.beams: unknown field; allowed: num_beams"),
        ('{"inputs": ["a"], "parameters": {"num_beams": "2"}}', 422, "parameters.num_beams: Input should be a valid integer"),
        ('{"inputs": ["a"], "parameters": {"num_beams": 0}}', 422, "num_beams must be an integer of at least 1, got 0"),
        ('{"inputs": ["a"], "parameters": {"num_beams": 9}}', 422, "num_beams is 9; this server allows at most 8"),
        ('{"inputs": ["a"], "parameters": {"max_new_tokens": 100000}}', 422, "decoder positions allow"),
        ('{"inputs": ["a"], "parameters": {"max_new_tokens": 2, "min_new_tokens": 5}}', 422, "min_new_tokens (5)"),
        ('{"inputs": ["a"], "parameters": {"early_stopping": "soon"}}', 422, "parameters.early_stopping"),
    ],
)  # fmt: skip
def test_bad_requests_get_4xx_with_a_json_error_that_says_what_to_fix(client, body, status, says):
    response = client.post("/v1/summarize", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"], response.json()


def test_more_than_one_summary_per_input_is_refused_so_each_input_gets_its_own(client, model):
    """The batcher hands each request one output row per input: num_return_sequences 2 would give the
    first input both of its own beams and the second input the first input's second beam."""
    parameters = {"num_beams": 2, "max_new_tokens": 10}
    body = {"inputs": TEXTS[:2], "parameters": parameters | {"num_return_sequences": 2}}
    response = client.post("/v1/summarize", json=body)
    assert response.status_code == 422, response.text
    assert "num_return_sequences must be 1" in response.json()["error"]["message"]
    response = client.post("/v1/summarize", json={"inputs": TEXTS[:2], "parameters": parameters})
    alone = [model.summarize([text], **parameters)[0] for text in TEXTS[:2]]
    assert response.json()["summaries"] == alone and alone[0] != alone[1]


def test_num_beams_equal_to_the_servers_maximum_is_served(model):
    """`--max-num-beams 3`: 3 beams are served (the tokens of generate with 3 beams), 4 are refused."""
    texts = TEXTS[:2]
    with TestClient(create_app(model, RequestLimits(max_num_beams=3))) as client:
        wait_until_ready(lambda: client.get("/readyz").status_code)
        response = client.post("/v1/summarize", json={"inputs": texts, "parameters": {"num_beams": 3}})
        assert response.status_code == 200, response.text
        assert response.json()["summaries"] == model.summarize(texts, num_beams=3)
        response = client.post("/v1/summarize", json={"inputs": texts, "parameters": {"num_beams": 4}})
        assert response.status_code == 422 and "allows at most 3" in response.json()["error"]["message"]


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain; charset=utf-8"])
def test_a_body_not_sent_as_json_gets_a_415_that_names_the_header(client, content_type):
    """curl -d sends application/x-www-form-urlencoded unless told otherwise."""
    response = client.post("/v1/summarize", content='{"inputs": ["a text"]}', headers={"content-type": content_type})
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["type"] == "unsupported_media_type" and "Content-Type: application/json" in error["message"]
    assert content_type.split(";")[0] in error["message"]


def test_json_content_types_with_parameters_or_a_suffix_are_read_as_json(client):
    for content_type in ("application/json; charset=utf-8", "application/merged-patch+json"):
        response = client.post("/v1/summarize", content='{"inputs": ["   "]}', headers={"content-type": content_type})
        assert response.status_code == 422 and "input 1 is empty" in response.json()["error"]["message"]


def test_a_wrong_method_is_a_405_typed_method_not_allowed_with_its_allow_header(client):
    response = client.get("/v1/summarize")
    assert response.status_code == 405, response.text
    assert response.json()["error"]["type"] == "method_not_allowed" and response.headers["allow"] == "POST"
    assert client.get("/v2/nothing").json()["error"]["type"] == "not_found"


def test_bodies_over_the_size_limit_are_refused_unread(client):
    response = client.post("/v1/summarize", json={"inputs": ["x" * (1 << 20)]})
    assert response.status_code == 413 and response.json()["error"]["type"] == "too_large"


def test_openapi_schema_lists_the_endpoints_and_forbids_unknown_parameters(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/summarize", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    components = schema["components"]["schemas"]
    request_ref = schema["paths"]["/v1/summarize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert request_ref["$ref"].endswith("/SummarizeRequest")
    assert set(components["SummarizeRequest"]["properties"]) == {"inputs", "parameters"}
    assert components["SummarizeRequest"]["additionalProperties"] is False
    parameters = components["GenerationParameters"]
    assert parameters["additionalProperties"] is False
    assert {"num_beams", "max_new_tokens", "min_new_tokens", "length_penalty"} <= set(parameters["properties"])
    assert set(components["SummarizeResponse"]["properties"]) == {"summaries", "input_tokens", "output_tokens"}


def test_metrics_count_requests_errors_batches_and_tokens(client):
    before = client.get("/metrics").text
    client.post("/v1/summarize", json={"inputs": ["a text", "another"], "parameters": {"max_new_tokens": 5}})
    client.post("/v1/summarize", json={"inputs": []})
    after = client.get("/metrics").text

    def value(text: str, series: str) -> float:
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)

    assert value(after, 'ortseq_requests_total{code="200",path="/v1/summarize"}') == (
        value(before, 'ortseq_requests_total{code="200",path="/v1/summarize"}') + 1
    )
    assert value(after, 'ortseq_errors_total{kind="invalid_request"}') == (
        value(before, 'ortseq_errors_total{kind="invalid_request"}') + 1
    )
    assert value(after, "ortseq_batch_size_sum") == value(before, "ortseq_batch_size_sum") + 2
    assert value(after, "ortseq_generated_tokens_total") > value(before, "ortseq_generated_tokens_total")
    assert "ortseq_queue_depth 0.0" in after and "ortseq_request_latency_seconds_bucket" in after


def test_concurrent_http_requests_are_merged_and_answered_to_the_right_caller(model):
    held = HeldModel(model)
    app = create_app(held, batching=BatchingConfig(max_wait_ms=0))
    parameters = {"num_beams": 2, "max_new_tokens": 10}
    with TestClient(app) as client:
        wait_until_ready(lambda: client.get("/readyz").status_code)
        results: dict[int, dict] = {}

        def ask(index: int) -> None:
            response = client.post("/v1/summarize", json={"inputs": [TEXTS[index]], "parameters": parameters})
            results[index] = response.json()

        threads = [threading.Thread(target=client.post, args=("/v1/summarize",), kwargs={"json": HELD_REQUEST})]
        threads += [threading.Thread(target=ask, args=(i,)) for i in range(len(TEXTS))]
        try:
            threads[0].start()
            wait_until(held.entered.is_set, "the held request occupies the worker")
            for thread in threads[1:]:
                thread.start()
            wait_until(lambda: sample(app.state.metrics, "ortseq_queue_depth") == len(TEXTS), "all are queued")
        finally:
            held.release()
        for thread in threads:
            thread.join(RELEASE_TIMEOUT_S)
        batches = sample(app.state.metrics, "ortseq_batch_size_count")
    assert batches == 2  # the held request, then the four queued ones in one generate call
    for index, text in enumerate(TEXTS):
        assert results[index]["summaries"] == model.summarize([text], **parameters)


def test_a_full_queue_gets_503_with_retry_after(model):
    held = HeldModel(model)
    app = create_app(held, batching=BatchingConfig(max_queue=1, max_wait_ms=0))
    with TestClient(app) as client:
        wait_until_ready(lambda: client.get("/readyz").status_code)
        running = threading.Thread(target=client.post, args=("/v1/summarize",), kwargs={"json": HELD_REQUEST})
        waiting = threading.Thread(target=client.post, args=("/v1/summarize",), kwargs={"json": {"inputs": ["a"]}})
        try:
            running.start()
            wait_until(held.entered.is_set, "the held request occupies the worker")
            waiting.start()  # queued behind it: the queue (max_queue=1) is now full
            wait_until(lambda: sample(app.state.metrics, "ortseq_queue_depth") == 1, "it is queued")
            response = client.post("/v1/summarize", json={"inputs": ["b"], "parameters": {"num_beams": 2}})
        finally:
            held.release()
        running.join(RELEASE_TIMEOUT_S)
        waiting.join(RELEASE_TIMEOUT_S)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "queue_full"


# --- a real `ortseq serve` process ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# `ortseq serve` whose generate() for HELD_TOKENS new tokens waits until a line arrives on stdin (release()).
HELD_SERVE = f"""
import sys, threading
from ortseq.runtime.model import Seq2SeqModel
released = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), released.set()), daemon=True).start()
real_generate = Seq2SeqModel.generate
def held_generate(self, *args, **kwargs):
    if kwargs.get("max_new_tokens") == {HELD_TOKENS}:
        assert released.wait({RELEASE_TIMEOUT_S}), "the test never released generate()"
    return real_generate(self, *args, **kwargs)
Seq2SeqModel.generate = held_generate
from ortseq.runtime.cli import main
sys.exit(main(["serve", *sys.argv[1:]]))
"""


def start_held_server(export_dir: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", HELD_SERVE, str(export_dir), "--port", str(port), *flags],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_until_ready(lambda: get(port, "/readyz")[0])
    return process, port


def release(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.stdin.write("release\n")
        process.stdin.flush()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    except ConnectionError:
        return 0, ""


def post(port: int, body: dict, timeout: float = 120) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("POST", "/v1/summarize", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def metric(port: int, series: str) -> float:
    return metric_value(get(port, "/metrics")[1], series)


def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(exported):
    process, port = start_held_server(exported("base").export_dir)
    try:
        answer: dict = {}
        held = threading.Thread(target=lambda: answer.update(zip(("status", "body"), post(port, HELD_REQUEST))))
        held.start()
        wait_until(lambda: metric(port, "ortseq_running_batch_rows") > 0, "the held request runs")
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: get(port, "/healthz")[0] == 0, "the server stops listening")  # draining, request held
        assert process.poll() is None and not answer  # it waits for the request in flight
        release(process)
        held.join(RELEASE_TIMEOUT_S)
        assert process.wait(timeout=60) == 0, process.stdout.read()
    finally:
        process.kill()
    assert answer["status"] == 200 and len(answer["body"]["summaries"]) == len(HELD_REQUEST["inputs"])
    assert answer["body"]["output_tokens"] == [HELD_TOKENS] * len(HELD_REQUEST["inputs"])


def test_a_client_that_disconnects_while_queued_costs_no_generate_call(exported):
    process, port = start_held_server(exported("base").export_dir, "--max-wait-ms", "0")
    try:
        slow = threading.Thread(target=post, args=(port, HELD_REQUEST))
        slow.start()
        wait_until(lambda: metric(port, "ortseq_running_batch_rows") > 0, "the held request runs")
        body = json.dumps({"inputs": ["a text that nobody will read"]}).encode()
        with socket.create_connection(("127.0.0.1", port)) as leaving:
            leaving.sendall(
                b"POST /v1/summarize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_until(lambda: metric(port, "ortseq_queue_depth") == 1, "it is queued behind the held request")
        wait_until(lambda: metric(port, 'ortseq_errors_total{kind="client_disconnected"}') == 1, "it is withdrawn")
        assert metric(port, "ortseq_queue_depth") == 0  # withdrawn at once, not when the worker gets to it
        assert metric(port, "ortseq_running_batch_rows") == len(HELD_REQUEST["inputs"])  # still the held one
        release(process)
        slow.join(RELEASE_TIMEOUT_S)
        assert metric(port, "ortseq_batch_size_count") == 1  # only the held request ever ran
    finally:
        release(process)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


BLOCK_FASTAPI = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "fastapi":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from ortseq.runtime.cli import main
sys.exit(main(["serve", sys.argv[1]]))
"""


def test_serve_without_the_extra_says_how_to_install_it(exported):
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_FASTAPI, str(exported("base").export_dir)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "needs the serving dependencies (fastapi is missing)" in result.stderr and "[serve]" in result.stderr
    assert "Traceback" not in result.stderr


def test_load_test_script_runs_both_configurations(exported, tmp_path):
    """The load-test script end to end on a given export, one second per configuration."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "load_test.py"
    cmd = [sys.executable, str(script), "--export-dir", str(exported("base").export_dir)]
    cmd += ["--clients", "2", "--seconds", "1", "--max-new-tokens", "4", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "load_test.json").read_text())
    assert [row["errors"] for row in report["results"]] == [{}, {}]  # error kind -> count
    assert all(row["requests"] > 0 for row in report["results"])
