"""Loopback load test: `serve --scheduler inflight` against the dynamic batcher, same clients, interleaved.

    python benchmarks/load_inflight.py [--model small|xsum] [--seconds 60] [--rounds 2] [--clients 12]
        [--baseline-src DIR]

The model (--model): a random-weight Pegasus with the real 96k vocabulary, `small` (d_model 256, 3 + 3
layers) or `xsum` (google/pegasus-xsum's shape, benchmarks/bench.py's XSUM_SHAPE: d_model 1024, 16 + 16
layers), built and exported once, with --inflight, under .cache/bench. N closed-loop clients on 127.0.0.1, each with
its own keep-alive connection, send one-input requests back to back, drawn from a fixed pool: input
lengths 24-400 tokens, exactly 8-48 new tokens (min_new_tokens = max_new_tokens: the same work whatever
the random weights pick), greedy and 4 beams mixed. Each round runs every configuration for T seconds,
in alternating order. Every answer is compared with the pool entry's solo answer (summarize_rows alone,
in this process), and the in-flight running set is also checked token by token against solo generate()
on the pool. --baseline-src runs the dynamic batcher from another checkout (e.g. the commit before the
scheduler, extracted with `git archive`: a folder holding `ortseq/`). Writes benchmarks/results/
load_inflight.{json,md,png} (small) or load_inflight_xsum.{json,md,png} (xsum): the date, the load average
around every run, and every sample.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from bench import CACHE, XSUM_SHAPE
from load_test import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
THREADS = 2
SMALL_SHAPE = XSUM_SHAPE | dict(
    d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=1024, decoder_ffn_dim=1024,
)  # fmt: skip


@dataclass(frozen=True)
class BenchModel:
    name: str  # its folder under .cache/bench
    shape: dict
    described: str
    results: str  # the result files' stem under --out
    # the default --max-rows: at the xsum shape the full 64-row budget is 2.1 GB of self-attention cache
    # (docs/serving-scheduler.md), and a 64-row step is compute-bound long before
    max_rows: int


MODELS = {
    "small": BenchModel("pegasus-small-shaped", SMALL_SHAPE, "d_model 256, 3 + 3 layers", "load_inflight", 64),
    "xsum": BenchModel("pegasus-xsum-shaped-inflight", XSUM_SHAPE, "d_model 1024, 16 + 16 layers",
                       "load_inflight_xsum", 32),
}  # fmt: skip
INPUT_TOKENS, NEW_TOKENS, BEAMS = (24, 400), (8, 48), (1, 4)
WORDS = "the city council said new river bridge will open next year after election police museum closed".split()


def prepare(bench: BenchModel) -> Path:
    """The random-weight Pegasus checkpoint and its export with decoder_inflight.onnx (built once)."""
    checkpoint, export_dir = CACHE / bench.name / "checkpoint", CACHE / bench.name / "export"
    if not (checkpoint / "config.json").is_file():
        _build(checkpoint, bench)
    if not (export_dir / "manifest.json").is_file():
        from ortseq.exporter.pipeline import export

        print(f"[load] exporting {bench.name} with --inflight", flush=True)
        export(str(checkpoint), export_dir, inflight=True)
    return export_dir


def _build(checkpoint: Path, bench: BenchModel) -> None:
    """As benchmarks/bench.py builds its random models, with a tokenizer that takes 512-token inputs."""
    import torch
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    from ortseq.exporter.tiny.pegasus import TinyPegasusShape, build_tiny_pegasus

    print(f"[load] building {bench.name} (random weights)", flush=True)
    build_tiny_pegasus(checkpoint, TinyPegasusShape(max_position_embeddings=512))  # its tokenizer files
    torch.manual_seed(0)
    model = PegasusForConditionalGeneration(PegasusConfig(**bench.shape)).eval()
    model.generation_config.update(num_beams=4, length_penalty=0.6, max_length=64)
    model.save_pretrained(checkpoint)


def random_text(model, rng) -> str:
    """Words of WORDS making at most a random token length in INPUT_TOKENS (the model's tokenizer)."""
    target = int(rng.integers(INPUT_TOKENS[0], INPUT_TOKENS[1] + 1))
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=target)]
    while len(model.tokenizer.token_ids([" ".join(words)])[0]) > target:
        words.pop()
    return " ".join(words)


def request_pool(model, size: int, seed: int) -> list[dict]:
    """size requests: a text of a random token length in INPUT_TOKENS and its parameters."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        text = random_text(model, rng)
        new = int(rng.integers(NEW_TOKENS[0], NEW_TOKENS[1] + 1))
        parameters = {"num_beams": int(rng.choice(BEAMS)), "max_new_tokens": new, "min_new_tokens": new}
        pool.append({"text": text, "parameters": parameters})
    return pool


def solo_answers(model, pool: list[dict]) -> list[dict]:
    from ortseq.runtime.serving.inference import summarize_rows

    answers = []
    for entry in pool:
        (summary,) = summarize_rows(model, entry["parameters"], model.tokenizer.token_ids([entry["text"]]))
        answers.append({"summary": summary.text, "output_tokens": len(summary.output_ids), "ids": summary.output_ids})
    return answers


def running_set_mismatches(model, pool: list[dict], answers: list[dict]) -> int:
    """The pool through runtime/inflight.py's running set, arriving a few steps apart: inputs whose
    generated ids differ from their solo ones."""
    from ortseq.runtime.inflight import InflightDecoder, RowBudget, RowRequest, open_inflight_decoder

    decoder = InflightDecoder(
        model.sessions, open_inflight_decoder(model.sessions, model.directory, "cpu", THREADS), RowBudget(48, 64)
    )
    waiting, done, step = [], [], 0
    for index, entry in enumerate(pool):
        ids = np.asarray(model.tokenizer.token_ids([entry["text"]]), dtype=np.int64)
        request = RowRequest(ids, np.ones_like(ids), model.settings(**entry["parameters"]), tag=index)
        waiting.append(request)
    while waiting or decoder.running:
        while waiting and step % 3 == 0 and decoder.admit(waiting[0]):
            waiting.pop(0)
        done += decoder.step()
        step += 1
    eos = model.manifest.special_tokens.eos_token_id
    from ortseq.runtime.serving.inference import generated_ids

    return sum(generated_ids(r.output[0], eos) != answers[r.tag]["ids"] for r in done)


def step_profile(model, pool: list[dict]) -> dict:
    """Where a step's time goes at several row counts (decoder run, host search per step), with the
    pool's sources (padded to the longest) and with every source cut to 24 tokens (what packing the cross
    K/V could save at most), and the encoder's time for a 400-token input (an admission's stall)."""
    from ortseq.runtime.inflight import InflightDecoder, RowBudget, RowRequest, open_inflight_decoder

    inflight = open_inflight_decoder(model.sessions, model.directory, "cpu", THREADS)
    profile = {}
    for sources in ("pool", "short"):
        for target in (4, 12, 24, 48):
            decoder = InflightDecoder(model.sessions, inflight, RowBudget(64, 64))
            for entry in pool:
                ids = np.asarray(model.tokenizer.token_ids([entry["text"]]), dtype=np.int64)
                ids = ids[:, : INPUT_TOKENS[0]] if sources == "short" else ids
                parameters = entry["parameters"] | {"max_new_tokens": 48, "min_new_tokens": 48}
                if decoder.rows_in_use + parameters["num_beams"] <= target:
                    decoder.admit(RowRequest(ids, np.ones_like(ids), model.settings(**parameters)))
            decoder.step()  # the first run of these shapes
            before = dict(decoder.seconds)
            steps = 8
            for _ in range(steps):
                decoder.step()
            per_step = {k: 1000 * (decoder.seconds[k] - before[k]) / steps for k in ("decoder", "search")}
            profile[f"{sources} sources, {decoder.rows_in_use} rows"] = per_step | {"mem": decoder._mem}
    ids = np.asarray(model.tokenizer.token_ids([" ".join(WORDS * 40)], INPUT_TOKENS[1]), dtype=np.int64)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model.sessions.encode(ids, np.ones_like(ids))
        times.append(time.perf_counter() - start)
    profile["encoder_ms_400_tokens"] = 1000 * float(np.median(times))
    return profile


def client(port: int, deadline: float, pool: list[dict], seed: int, samples: list[dict]) -> None:
    rng = np.random.default_rng(seed)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    while time.monotonic() < deadline:
        index = int(rng.integers(len(pool)))
        body = json.dumps({"inputs": [pool[index]["text"]], "parameters": pool[index]["parameters"]})
        start = time.monotonic()
        sample = {"client": seed, "index": index, "start": start}
        try:
            connection.request("POST", "/v1/summarize", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            sample["status"] = response.status
        except (OSError, http.client.HTTPException) as exc:
            sample["status"] = type(exc).__name__
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        sample["latency_s"] = time.monotonic() - start
        if sample["status"] == 200:
            answer = json.loads(payload)
            sample["summary"], sample["output_tokens"] = answer["summaries"][0], answer["output_tokens"][0]
        samples.append(sample)
    connection.close()


def run_config(export_dir: Path, config: dict, pool: list[dict], args) -> dict:
    port = free_port()
    env = dict(os.environ)
    if config.get("src"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(config["src"]), env.get("PYTHONPATH")]))
    server = subprocess.Popen(
        [sys.executable, "-m", "ortseq.runtime.cli", "serve", str(export_dir), "--port", str(port),
         "--threads", str(THREADS), "--max-inputs", "1", "--max-input-tokens", str(INPUT_TOKENS[1]),
         "--max-queue", str(4 * args.clients), *config["flags"]],
        cwd="/", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_ready(port, 300)
        samples: list[dict] = []
        load_before = os.getloadavg()
        start = time.monotonic()
        deadline = start + args.seconds
        threads = [
            threading.Thread(target=client, args=(port, deadline, pool, seed, samples)) for seed in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start  # includes the last requests, which finish after the deadline
        metrics = scrape(port)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    for sample in samples:
        sample["start"] -= start
    return {"config": config["name"], "seconds": elapsed, "load_before": load_before, "load_after": os.getloadavg(),
            "samples": samples, "metrics": metrics}  # fmt: skip


def scrape(port: int) -> dict[str, float]:
    """The scheduler's and batcher's sums and counts from /metrics."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/metrics")
    lines = connection.getresponse().read().decode().splitlines()
    wanted = ("ortseq_step_seconds_", "ortseq_step_rows_", "ortseq_batch_size_", "ortseq_batch_seconds_",
              "ortseq_scheduler_seconds_total", "ortseq_queue_wait_seconds_", "ortseq_admit_seconds_")  # fmt: skip
    found = {}
    for line in lines:
        if line.startswith(wanted) and not line.startswith("#") and "_bucket" not in line:
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def summarize(run: dict, answers: list[dict]) -> dict:
    ok = [s for s in run["samples"] if s["status"] == 200]
    latencies = np.array([s["latency_s"] for s in ok]) if ok else np.array([np.nan])
    wrong = sum(
        (s["summary"], s["output_tokens"]) != (answers[s["index"]]["summary"], answers[s["index"]]["output_tokens"])
        for s in ok
    )
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {
        "config": run["config"],
        "requests": len(ok),
        "errors": len(run["samples"]) - len(ok),
        "wrong_answers": int(wrong),
        "tokens_per_s": sum(s["output_tokens"] for s in ok) / run["seconds"],
        "p50_ms": 1000 * p50,
        "p95_ms": 1000 * p95,
        "p99_ms": 1000 * p99,
        "load_before": run["load_before"][0],
        "load_after": run["load_after"][0],
    }


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    s = report["settings"]
    bench = MODELS[s["model"]]
    tmp = out / f"{bench.results}.json.partial"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.rename(out / f"{bench.results}.json")
    lines = [
        f"{report['date']}: {s['clients']} closed-loop clients, {s['seconds']} s per run, {s['rounds']} rounds "
        f"interleaved, {bench.name} (96k vocabulary, {bench.described}, random weights), inputs "
        f"{INPUT_TOKENS[0]}-{INPUT_TOKENS[1]} tokens, {NEW_TOKENS[0]}-{NEW_TOKENS[1]} new tokens, greedy and 4 beams "
        f"mixed, {THREADS} onnxruntime threads",
        "",
        "| run | requests | errors | wrong answers | tokens/s | p50 (ms) | p95 (ms) | p99 (ms) | load avg before/after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["summaries"]:
        lines.append(
            f"| {r['config']} | {r['requests']} | {r['errors']} | {r['wrong_answers']} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['load_before']:.2f} / {r['load_after']:.2f} |"
        )
    lines += ["", f"in-flight / dynamic, summed over rounds: tokens/s **{report['tokens_ratio']:.2f}x**, "
              f"p95 {report['p95_ratio']:.2f}x; running-set token mismatches against solo generate(): "
              f"{report['running_set_mismatches']} of {s['pool']}"]  # fmt: skip
    lines += [
        "",
        "Per step (ms) where the time goes, measured in-process before the runs:",
        "",
        "| running set | decoder run | host search | cross K/V positions |",
        "|---|---|---|---|",
    ]
    for name, row in report["step_profile_ms"].items():
        if isinstance(row, dict):
            lines.append(f"| {name} | {row['decoder']:.1f} | {row['search']:.1f} | {row['mem']} |")
    lines += ["", f"Encoder, one 400-token input: {report['step_profile_ms']['encoder_ms_400_tokens']:.0f} ms"]
    (out / f"{bench.results}.md").write_text("\n".join(lines) + "\n")
    plot(report, out / f"{bench.results}.png")
    print("\n".join(lines))


def plot(report: dict, path: Path) -> None:
    """Tokens/s and p95 latency of every run, in run order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summaries"]
    labels = [f"{r['config']}\nround {r['round']}" for r in rows]
    colors = ["tab:gray" if r["config"] == "dynamic" else "tab:blue" for r in rows]
    figure, (tokens, p95) = plt.subplots(1, 2, figsize=(10, 4))
    tokens.bar(labels, [r["tokens_per_s"] for r in rows], color=colors)
    tokens.set_title("generated tokens / s (higher is better)")
    p95.bar(labels, [r["p95_ms"] / 1000 for r in rows], color=colors)
    p95.set_title("p95 latency, s (lower is better)")
    figure.suptitle(
        f"{MODELS[report['settings']['model']].name}, {report['settings']['clients']} clients, {report['date']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pool", type=int, default=48, help="distinct requests the clients draw from")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--max-rows", type=int, help="the server's --max-rows (default: 64 small, 32 xsum)")
    parser.add_argument("--baseline-src", type=Path, help="run the dynamic batcher from this checkout's ortseq/")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 600 or not 1 <= args.rounds <= 5:
        raise SystemExit("keep it bounded: 1-64 clients, at most 600 s per run, 1-5 rounds")
    from ortseq.runtime import Seq2SeqModel

    bench = MODELS[args.model]
    args.max_rows = args.max_rows or bench.max_rows
    export_dir = prepare(bench)
    model = Seq2SeqModel.load(export_dir, threads=THREADS)
    pool = request_pool(model, args.pool, seed=26)
    print(f"[load] solo answers of the {len(pool)} pool requests", flush=True)
    answers = solo_answers(model, pool)
    mismatches = running_set_mismatches(model, pool, answers)
    profile = step_profile(model, pool)
    print(json.dumps(profile, indent=1), flush=True)
    del model
    configs = [
        {"name": "dynamic", "flags": ["--scheduler", "dynamic"] if not args.baseline_src else [],
         "src": args.baseline_src},
        {"name": "inflight", "flags": ["--scheduler", "inflight", "--max-rows", str(args.max_rows),
                                       "--max-decoder-tokens", str(NEW_TOKENS[1] + 1)]},
    ]  # fmt: skip
    runs = []
    for round_ in range(args.rounds):
        for config in configs if round_ % 2 == 0 else configs[::-1]:
            print(
                f"[load] round {round_ + 1}: {config['name']}, {args.clients} clients for {args.seconds} s", flush=True
            )
            runs.append(run_config(export_dir, config, pool, args) | {"round": round_ + 1})
    summaries = [summarize(run, answers) | {"round": run["round"]} for run in runs]
    total = {name: [r for r in summaries if r["config"] == name] for name in ("dynamic", "inflight")}
    tokens = {name: sum(r["tokens_per_s"] for r in rows) for name, rows in total.items()}
    p95 = {name: np.mean([r["p95_ms"] for r in rows]) for name, rows in total.items()}
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": vars(args)
        | {"baseline_src": str(args.baseline_src), "out": str(args.out), "export": str(export_dir)},
        "pool": pool,
        "solo_answers": answers,
        "running_set_mismatches": int(mismatches),
        "step_profile_ms": profile,
        "summaries": summaries,
        "tokens_ratio": tokens["inflight"] / tokens["dynamic"] if tokens["dynamic"] else float("nan"),
        "p95_ratio": p95["inflight"] / p95["dynamic"] if p95["dynamic"] else float("nan"),
        "runs": runs,
    }
    write(report, args.out)


if __name__ == "__main__":
    main()
