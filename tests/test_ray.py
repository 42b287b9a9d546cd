"""`ortseq batch` on Ray Data and `ortseq serve` on Ray Serve, on a local Ray bound to 127.0.0.1 (2 CPUs).

Marked slow (and ray): `make test-full` or `make test-ray` run them, `make test` does not.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' (make setup does)")
psutil = pytest.importorskip("psutil", reason="psutil is not installed: pip install -e '.[bench]'")

from helpers import metric_value, wait_until  # noqa: E402

from ortseq.runtime import Seq2SeqModel  # noqa: E402
from ortseq.runtime.ray_batch import BatchJob, run_batch, start_local_ray  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"max_new_tokens": 12, "min_new_tokens": 3}  # the tiny model would often stop at once otherwise
WORDS = "the city council river bridge police museum station minister water reported closed open election".split()


def corpus(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"doc-{i}", "text": " ".join(rng.choices(WORDS, k=rng.randint(2, 30)))} for i in range(count)]


def write_corpus(path: Path, documents: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(document) + "\n" for document in documents) + "".join(extra_lines))
    return path


def read_output(path: Path) -> dict[str, dict]:
    """id -> record, asserting every line is whole and no id appears twice."""
    data = path.read_text(encoding="utf-8")
    assert data.endswith("\n")
    records = [json.loads(line) for line in data.splitlines()]
    ids = [record["id"] for record in records]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {record["id"]: record for record in records}


@pytest.fixture(scope="module")
def export_dir(exported) -> Path:
    return exported("base").export_dir


@pytest.fixture(scope="module")
def expected(export_dir) -> dict[str, str]:
    """What `ortseq generate` (Seq2SeqModel.summarize) returns for each document, in batches of its own."""
    documents = corpus(300)
    summaries = Seq2SeqModel.load(export_dir, threads=1).summarize(
        [d["text"] for d in documents], batch_size=32, **SETTINGS
    )
    return {document["id"]: summary for document, summary in zip(documents, summaries)}


@pytest.fixture(scope="module")
def local_ray():
    temp_dir = tempfile.mkdtemp(prefix="ortseq-ray-")  # short: Ray's socket paths must fit in 107 bytes
    start_local_ray(ray, num_cpus=2, _temp_dir=temp_dir)
    yield ray
    ray.shutdown()


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_a_local_ray_listens_on_the_loopback_address_only(local_ray, export_dir, tmp_path):
    """ray.init(_node_ip_address="127.0.0.1") alone gives the outward address and every interface."""
    documents = write_corpus(tmp_path / "docs.jsonl", corpus(20))
    run_batch(job(export_dir, tmp_path, documents))  # its workers and Ray Data's services started too
    listening = set()
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:  # a worker that has just ended
            continue
        listening |= {(process.name(), c.laddr.ip) for c in connections if c.status == psutil.CONN_LISTEN}
    assert len(listening) >= 3  # the GCS, the raylet, this driver at least
    assert {address for _, address in listening} <= LOOPBACK, sorted(listening)


def job(export_dir: Path, tmp_path: Path, documents: Path, **overrides) -> BatchJob:
    settings = {
        "export_dir": export_dir,
        "input": documents,
        "output": tmp_path / "out.jsonl",
        "errors": tmp_path / "errors.jsonl",
        "workers": 2,
        "batch_size": 8,
        "generate_kwargs": SETTINGS,
    }
    return BatchJob(**{**settings, **overrides})


def test_batch_on_two_workers_equals_generate_id_by_id_and_lists_refused_inputs(
    local_ray, export_dir, expected, tmp_path
):
    bad = (
        "not json\n",
        json.dumps({"id": "doc-5", "text": "again"}) + "\n",
        json.dumps({"id": "e", "text": ""}) + "\n",
    )
    documents = write_corpus(tmp_path / "docs.jsonl", corpus(300), bad)
    report = run_batch(job(export_dir, tmp_path, documents))
    output = read_output(tmp_path / "out.jsonl")
    assert {doc_id: record["summary"] for doc_id, record in output.items()} == expected
    assert all(record["input_tokens"] > 0 and 3 <= record["output_tokens"] <= 12 for record in output.values())
    assert (report.summarized, report.already_done, report.rejected) == (300, 0, 3)
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["id"]) for e in errors] == [(301, None), (302, "doc-5"), (303, "e")]
    assert "duplicate id (first on line 6)" in errors[1]["reason"] and "empty text" in errors[2]["reason"]


def summarizer_processes() -> list[psutil.Process]:
    """Ray Data's actors of this test session (descendants of this process only)."""
    return [
        process
        for process in psutil.Process().children(recursive=True)
        if "MapBatches(Summarizer)" in " ".join(_cmdline(process))
    ]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return [process.name(), *process.cmdline()]
    except psutil.Error:
        return []


def test_a_killed_worker_is_replaced_and_every_id_is_summarized_once(local_ray, export_dir, expected, tmp_path):
    documents = write_corpus(tmp_path / "docs.jsonl", corpus(300))
    out = tmp_path / "out.jsonl"
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(report=run_batch(job(export_dir, tmp_path, documents, batch_size=4)))
    )
    worker.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = out.read_text().count("\n") if out.exists() else 0
        victims = summarizer_processes()
        if lines >= 8 and victims:  # some blocks are written: kill a worker mid-run
            killed, lines_at_kill = victims[0].pid, lines
            os.kill(killed, signal.SIGKILL)
    worker.join(timeout=300)
    assert killed is not None and lines_at_kill < 300, "the job finished before a worker could be killed"
    assert not worker.is_alive() and result["report"].summarized == 300
    output = read_output(out)
    assert {doc_id: record["summary"] for doc_id, record in output.items()} == expected


def test_a_killed_job_rerun_resumes_without_duplicates(export_dir, expected, tmp_path):
    documents = write_corpus(tmp_path / "docs.jsonl", corpus(300))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "ortseq.runtime.cli", "batch", str(export_dir), "--input", str(documents)]
    command += ["--output", str(out), "--workers", "2", "--batch-size", "4", "--max-new-tokens", "12"]
    command += ["--min-new-tokens", "3"]
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}  # a local Ray of its own
    job_process = subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and job_process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 12:
            break
        time.sleep(0.05)
    assert job_process.poll() is None, "the job ended before it could be killed"
    started = psutil.Process(job_process.pid).children(recursive=True)  # its local Ray: dies with it
    job_process.kill()
    job_process.wait()
    for process in started:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    partial = read_output(out)
    assert 12 <= len(partial) < 300
    rerun = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{300 - len(partial)} summarized, {len(partial)} already in" in rerun.stderr
    # Ray's own notices (token authentication, actor restarts, progress bars, the raylet's) only with -v
    assert all(line.startswith("ortseq: ") for line in rerun.stderr.splitlines()), rerun.stderr[-2000:]
    output = read_output(out)
    assert {doc_id: record["summary"] for doc_id, record in output.items()} == expected


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ray_serve_with_two_replicas_answers_as_ortseq_serve(local_ray, export_dir):
    import httpx
    from fastapi.testclient import TestClient
    from ray import serve

    from ortseq.runtime.serving.app import create_app
    from ortseq.runtime.serving.ray_serve import APP_NAME, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(export_dir, replicas=2), name=APP_NAME, route_prefix="/")
        deployments = serve.status().applications[APP_NAME].deployments
        assert sum(d.replica_states.get("RUNNING", 0) for d in deployments.values()) == 2
        requests = [
            {
                "inputs": [d["text"] for d in corpus(5, seed=1)],
                "parameters": {"max_new_tokens": 10, "min_new_tokens": 2},
            },
            {"inputs": ["The river bridge will open.", "Police closed the museum."], "parameters": {"num_beams": 3}},
            {"inputs": ["x"], "parameters": {"num_beams": 99}},  # refused the same way
            {"inputs": [], "parameters": {}},
        ]
        with TestClient(create_app(Seq2SeqModel.load(export_dir, threads=1))) as single:
            _wait_ready(single)  # the app warms its model up first and answers 503 until then
            wanted = [single.post("/v1/summarize", json=body) for body in requests]
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            _wait_ready(client)
            for body, alone in zip(requests, wanted):
                for _ in range(2):  # twice: both replicas are likely to answer
                    answer = client.post("/v1/summarize", json=body)
                    assert (answer.status_code, answer.json()) == (alone.status_code, alone.json())
            assert client.get("/healthz").json() == {"status": "alive"}
            assert b"ortseq_requests" in client.get("/metrics").content
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def inflight_export_dir(tmp_path_factory) -> Path:
    """The tiny base-shape Pegasus exported with decoder_inflight.onnx."""
    from helpers import SHAPES

    from ortseq.exporter.pipeline import export
    from ortseq.exporter.tiny.pegasus import build_tiny_pegasus

    root = tmp_path_factory.mktemp("ray-inflight")
    export(str(build_tiny_pegasus(root / "checkpoint", SHAPES["base"], seed=1)), root / "export", inflight=True)
    return root / "export"


def test_ray_serve_replicas_each_run_an_inflight_scheduler_and_answer_as_alone(local_ray, inflight_export_dir):
    """`serve --replicas 2 --scheduler inflight`: concurrent requests of mixed settings, spread over both
    replicas' schedulers, each answered as summarize_rows gives each of its inputs alone. /metrics is the
    answering replica's (Ray Serve's proxy picks one): it shows an in-flight scheduler that ran."""
    import httpx
    from ray import serve

    from ortseq.runtime.serving.batcher import BatchingConfig
    from ortseq.runtime.serving.inference import summarize_rows
    from ortseq.runtime.serving.ray_serve import APP_NAME, build_app

    texts = [d["text"] for d in corpus(8, seed=3)]
    settings = [
        {"num_beams": 4, "max_new_tokens": 12, "min_new_tokens": 4},
        {"num_beams": 1, "max_new_tokens": 20, "min_new_tokens": 2},
        {"num_beams": 2, "max_new_tokens": 8, "no_repeat_ngram_size": 2},
        {"num_beams": 3, "max_new_tokens": 16, "length_penalty": 2.0, "min_new_tokens": 6},
    ]
    bodies = [{"inputs": texts[i : i + 2], "parameters": settings[i % len(settings)]} for i in range(8)]
    model = Seq2SeqModel.load(inflight_export_dir, threads=1)
    alone = [
        [summarize_rows(model, body["parameters"], [row])[0] for row in model.tokenizer.token_ids(body["inputs"])]
        for body in bodies
    ]
    lengths = {len(summary.output_ids) for summaries in alone for summary in summaries}
    assert len(lengths) >= 4, lengths  # the settings discriminate: the answers' lengths differ
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        batching = BatchingConfig(scheduler="inflight", max_rows=8, max_decoder_tokens=40)
        serve.run(build_app(inflight_export_dir, replicas=2, batching=batching), name=APP_NAME, route_prefix="/")
        deployments = serve.status().applications[APP_NAME].deployments
        assert sum(d.replica_states.get("RUNNING", 0) for d in deployments.values()) == 2
        answers: dict[int, httpx.Response] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            _wait_ready(client, 120)

            def ask(index: int) -> None:
                answers[index] = client.post("/v1/summarize", json=bodies[index])

            threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(bodies))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(180)
            # each scrape is one replica's page: a few, so that a replica that ran steps answers one
            steps = [metric_value(client.get("/metrics").text, "ortseq_scheduler_steps_total") for _ in range(6)]
        assert sorted(answers) == list(range(len(bodies))), "a request got no answer in time"
        for index, summaries in enumerate(alone):
            assert answers[index].status_code == 200, answers[index].text
            got = answers[index].json()
            assert got["summaries"] == [summary.text for summary in summaries], (bodies[index], got)
            assert got["output_tokens"] == [len(summary.output_ids) for summary in summaries]
        assert max(steps) > 0, steps
    finally:
        serve.shutdown()


def _wait_ready(client, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the Ray Serve deployment never became ready"
        time.sleep(0.2)


def test_sigterm_lets_the_replicas_answer_what_they_hold_then_exits_0(export_dir):
    """`ortseq serve --replicas`: SIGTERM drains. The request in flight is answered through Ray Serve's
    proxy before Serve shuts down (it used to be cut: the proxy went down with Serve)."""
    port = free_port()
    command = [sys.executable, "-m", "ortseq.runtime.cli", "serve", str(export_dir), "--replicas", "1"]
    command += ["--port", str(port), "--graceful-timeout", "60"]
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}  # a local Ray of its own
    server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = []
    try:
        import httpx

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            wait_until(lambda: _status(client, "/readyz") == 200, "the deployment is ready", 180)
            started = psutil.Process(server.pid).children(recursive=True)
            # long enough to be running when the signal comes: 16 inputs, 8 beams, 40 tokens each
            body = {"inputs": [d["text"] for d in corpus(16, seed=2)],
                    "parameters": {"num_beams": 8, "max_new_tokens": 40, "min_new_tokens": 40}}  # fmt: skip
            answer: dict = {}

            def post() -> None:
                try:
                    answer["response"] = client.post("/v1/summarize", json=body)
                finally:
                    answer["at"] = time.monotonic()

            request = threading.Thread(target=post)
            request.start()
            wait_until(lambda: metric_value(client.get("/metrics").text, "ortseq_running_batch_rows") > 0, "it runs")
            server.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            request.join(timeout=120)
        assert answer["at"] > signalled, "the request was answered before SIGTERM: it tested nothing"
        assert "response" in answer, "the request in flight got no answer"
        assert answer["response"].status_code == 200, answer["response"].text
        assert len(answer["response"].json()["summaries"]) == 16
        assert server.wait(timeout=120) == 0
        output = server.stdout.read()
        assert "drained; exiting" in output
        assert all(line.startswith("ortseq: ") for line in output.splitlines()), output  # Ray's only with -v
    finally:
        server.kill()
        for process in started:  # its local Ray, were it left behind
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def _status(client, path: str) -> int:
    try:
        return client.get(path).status_code
    except Exception:  # not listening yet
        return 0
