"""Loopback load test of `ortseq serve`: dynamic batching against batch size 1, same clients, same time.

    python benchmarks/load_test.py [--export-dir DIR] [--clients 16] [--seconds 20] [--max-batch-size 16]

For each configuration a fresh `ortseq serve` process listens on 127.0.0.1 (2 onnxruntime threads);
N client threads, each with its own keep-alive connection, send one-input requests back to back for
T seconds (texts of varied length, the same parameters for all). Reports throughput, latency
percentiles, errors, the mean merged batch (from /metrics) and the gain of batching; writes
benchmarks/results/load_test.{json,md}. Without --export-dir it uses the tiny-pegasus export that
`make bench` builds (.cache/bench/tiny-pegasus/export).
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
THREADS = 2

SENTENCES = [
    "The city council said the new river bridge will open next year after the election.",
    "Police said the museum was closed on Sunday when water from the river reached the station.",
    "The minister reported that schools near the river will reopen once engineers have checked them.",
    "Residents were told to stay away from the old town until the water has gone down.",
]


@dataclass
class ClientLog:
    latencies: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def texts() -> list[str]:
    """Inputs from one to five sentences long (at most 256 tiny-pegasus tokens), so batches mix lengths (and padding) as real traffic does."""
    return [" ".join(SENTENCES[j % len(SENTENCES)] for j in range(i, i + n)) for i in range(4) for n in (1, 2, 3, 5)]


def client(port: int, deadline: float, parameters: dict, seed: int, log: ClientLog) -> None:
    rng = np.random.default_rng(seed)
    pool = texts()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while time.monotonic() < deadline:
        body = json.dumps({"inputs": [pool[rng.integers(len(pool))]], "parameters": parameters})
        start = time.monotonic()
        try:
            connection.request("POST", "/v1/summarize", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            log.errors[type(exc).__name__] = log.errors.get(type(exc).__name__, 0) + 1
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            continue
        if response.status == 200:
            log.latencies.append(time.monotonic() - start)
            log.output_tokens += sum(json.loads(payload)["output_tokens"])
        else:
            log.errors[str(response.status)] = log.errors.get(str(response.status), 0) + 1
    connection.close()


def run_config(export_dir: Path, name: str, max_batch_size: int, args: argparse.Namespace) -> dict:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "ortseq.runtime.cli", "serve", str(export_dir), "--port", str(port), "--threads", str(THREADS),
         "--max-batch-size", str(max_batch_size), "--max-inputs", "1", "--max-wait-ms", str(args.max_wait_ms),
         "--max-queue", str(4 * args.clients)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_ready(port)
        parameters = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
        logs = [ClientLog() for _ in range(args.clients)]
        start = time.monotonic()
        deadline = start + args.seconds
        threads = [
            threading.Thread(target=client, args=(port, deadline, parameters, seed, log))
            for seed, log in enumerate(logs)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start  # includes the last requests, which finish after the deadline
        batches = batch_metrics(port)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    latencies = np.array([t for log in logs for t in log.latencies])
    errors: dict[str, int] = {}
    for log in logs:
        for kind, count in log.errors.items():
            errors[kind] = errors.get(kind, 0) + count
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if len(latencies) else (float("nan"),) * 3
    return {
        "config": name,
        "max_batch_size": max_batch_size,
        "requests": int(len(latencies)),
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "tokens_per_s": sum(log.output_tokens for log in logs) / elapsed,
        "p50_ms": 1000 * p50,
        "p95_ms": 1000 * p95,
        "p99_ms": 1000 * p99,
        "mean_batch": batches["sum"] / batches["count"] if batches["count"] else 0.0,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(port: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not become ready")


def batch_metrics(port: int) -> dict[str, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/metrics")
    lines = connection.getresponse().read().decode().splitlines()
    return {
        key: next(float(line.split()[-1]) for line in lines if line.startswith(f"ortseq_batch_size_{key} "))
        for key in ("sum", "count")
    }


def write(rows: list[dict], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    gain = rows[0]["requests_per_s"] / rows[1]["requests_per_s"] if rows[1]["requests_per_s"] else float("nan")
    settings = {k: getattr(args, k) for k in ("clients", "seconds", "num_beams", "max_new_tokens", "max_wait_ms")}
    report = {"settings": {**settings, "export_dir": str(args.export_dir)}, "results": rows, "batching_gain": gain}
    (args.out / "load_test.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"{args.clients} clients, {args.seconds} s per configuration, one input per request, "
        f"num_beams {args.num_beams}, max_new_tokens {args.max_new_tokens}, max wait {args.max_wait_ms} ms, "
        f"{THREADS} onnxruntime threads",
        "",
        "| configuration | requests | errors | requests/s | tokens/s | p50 (ms) | p95 (ms) | p99 (ms) | mean batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['requests']} | {sum(r['errors'].values())} | {r['requests_per_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} |"
        )
    lines += ["", f"Throughput gain of dynamic batching over batch size 1: **{gain:.2f}x**"]
    (args.out / "load_test.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, help="default: the tiny-pegasus export of `make bench`")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for load_test.{json,md}")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 600:
        raise SystemExit("keep it bounded: 1-256 clients, at most 600 s per configuration")
    if args.export_dir is None:
        from bench import prepare_model  # benchmarks/bench.py: builds and exports tiny-pegasus once (needs torch)

        args.export_dir = prepare_model("tiny-pegasus").export_dir
    rows = []
    for name, batch in ((f"dynamic batching (max {args.max_batch_size})", args.max_batch_size), ("batch size 1", 1)):
        print(f"[load test] {name}: {args.clients} clients for {args.seconds} s", flush=True)
        rows.append(run_config(args.export_dir, name, batch, args))
    write(rows, args)


if __name__ == "__main__":
    main()
