"""`ortseq batch`'s summarizing as it is against the in-flight running set, on one corpus: tokens/s.

    python benchmarks/batch_inflight.py [--model small|xsum] [--documents 96] [--batch-size 16]
        [--num-beams 4] [--max-new-tokens 32] [--max-rows 64] [--rounds 2]

The corpus: N documents of 24-400 tokens (random words), one generation setting for all of them, as a
corpus job has. The model: benchmarks/load_inflight.py's random-weight Pegasus with the real 96k vocabulary
(`small` or `xsum`, built and exported once with --inflight under .cache/bench).

- batched: what each `ortseq batch` worker does (runtime/ray_batch.py's Summarizer): the documents
  length-grouped (runtime/batch.py), --batch-size per generate() call, in this process (one worker, no Ray).
- inflight: the same documents in the same order through runtime/inflight.py's running set
  (--max-rows rows): a document is admitted as soon as rows are free, its rows go to the next one as it ends.

With random weights the summaries of one setting all run to about the same length (every one to
--max-new-tokens, or, with a raised end token, every one ends at once: tried), so this measures what the
running set does to padding and per-step cost, not what it gains where summaries of one batch end at
varied lengths (a trained model's; none of this shape can be had offline).

Each round times both over the whole corpus (alternating which goes first), after a warm-up pass on a
few documents. Reported: generated tokens/s of each, and the documents whose summaries differ between
the two (fp32: none expected). Writes benchmarks/results/batch_inflight_{model}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from load_inflight import MODELS, RESULTS, THREADS, prepare, random_text


def corpus(model, count: int, seed: int) -> list[str]:
    """count texts of random token lengths in INPUT_TOKENS."""
    rng = np.random.default_rng(seed)
    return [random_text(model, rng) for _ in range(count)]


def batched(summarizer, texts: list[str], batch_size: int) -> list[tuple[str, int]]:
    """(summary, generated tokens) of each text, as an `ortseq batch` worker makes them: its Summarizer
    called on the length-grouped documents, batch_size at a time."""
    from ortseq.runtime.batch import Document, length_grouped
    from ortseq.runtime.ray_batch import LENGTH_WINDOW_BATCHES

    documents = [Document(line, line, text) for line, text in enumerate(texts)]
    ordered = length_grouped(documents, batch_size * LENGTH_WINDOW_BATCHES)
    answers: list[tuple[str, int]] = [("", 0)] * len(texts)
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        block = summarizer({"key": np.asarray([d.id for d in chunk]), "text": np.asarray([d.text for d in chunk])})
        assert not any(block["error"]), block["error"]
        for key, summary, tokens in zip(block["key"], block["summary"], block["output_tokens"]):
            answers[key] = (summary, tokens)
    return answers


def run_to_completion(decoder, requests: list) -> None:
    """Every request through the running set, admitted in the given order as soon as rows are free."""
    for request in requests:
        decoder.check(request.settings)  # one the budget can never hold would wait forever
    waiting = list(requests)
    while waiting or decoder.running:
        while waiting and decoder.admit(waiting[0]):
            waiting.pop(0)
        decoder.step()


def inflight(model, decoder, texts: list[str], settings: dict) -> list[tuple[str, int]]:
    """(summary, generated tokens) of each text through the running set."""
    from ortseq.runtime.inflight import RowRequest
    from ortseq.runtime.serving.inference import summaries_of

    resolved = model.settings(**settings)
    rows = model.tokenizer.token_ids(texts, model.tokenizer.info.model_max_length)
    requests = [RowRequest(np.asarray([row]), np.ones((1, len(row)), np.int64), resolved) for row in rows]
    run_to_completion(decoder, requests)
    summaries = [summaries_of(model, [row], request.output)[0] for row, request in zip(rows, requests)]
    return [(summary.text, len(summary.output_ids)) for summary in summaries]


def timed(run, texts: list[str]) -> tuple[list[tuple[str, int]], float]:
    start = time.perf_counter()
    answers = run(texts)
    return answers, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--documents", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16, help="`ortseq batch --batch-size` (its default)")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--min-new-tokens", type=int, help="default: none (each summary ends where the model ends it)")
    parser.add_argument("--max-rows", type=int, default=64, help="the running set's rows")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=26)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not 1 <= args.documents <= 2000 or not 1 <= args.rounds <= 5:
        raise SystemExit("keep it bounded: 1-2000 documents, 1-5 rounds")
    from ortseq.graphs.manifest import LOOP_ENGINE
    from ortseq.runtime import Seq2SeqModel
    from ortseq.runtime.inflight import InflightDecoder, RowBudget, open_inflight_decoder
    from ortseq.runtime.ray_batch import Summarizer

    bench = MODELS[args.model]
    export_dir = prepare(bench)
    settings = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    if args.min_new_tokens is not None:
        settings["min_new_tokens"] = args.min_new_tokens
    model = Seq2SeqModel.load(export_dir, threads=THREADS)
    budget = RowBudget(args.max_rows, model.settings(**settings).max_length)
    decoder = InflightDecoder(model.sessions, open_inflight_decoder(model.sessions, export_dir, "cpu", THREADS), budget)
    summarizer = Summarizer(str(export_dir), "cpu", THREADS, LOOP_ENGINE, settings)  # one worker
    texts = corpus(model, args.documents, args.seed)
    paths = {
        "batched": lambda documents: batched(summarizer, documents, args.batch_size),
        "inflight": lambda documents: inflight(model, decoder, documents, settings),
    }
    for run in paths.values():  # the first runs of onnxruntime's shapes
        run(texts[: min(len(texts), args.batch_size)])
    runs, outputs = [], {}
    for round_ in range(args.rounds):
        for name in paths if round_ % 2 == 0 else list(paths)[::-1]:
            load_before = os.getloadavg()[0]
            answers, seconds = timed(paths[name], texts)
            tokens = sum(count for _, count in answers)
            runs.append({"round": round_ + 1, "path": name, "seconds": seconds, "tokens": tokens,
                         "tokens_per_s": tokens / seconds, "load_before": load_before,
                         "load_after": os.getloadavg()[0]})  # fmt: skip
            print(f"[batch] round {round_ + 1} {name}: {tokens} tokens in {seconds:.1f} s", flush=True)
            outputs[name] = answers
    differ = sum(a != b for a, b in zip(outputs["batched"], outputs["inflight"]))
    lengths = [count for _, count in outputs["batched"]]
    total = {name: sum(r["tokens"] for r in runs if r["path"] == name) for name in paths}
    seconds = {name: sum(r["seconds"] for r in runs if r["path"] == name) for name in paths}
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": vars(args)
        | {"out": str(args.out), "export": str(export_dir), "generate": settings, "bench_model": bench.name},
        "input_tokens": [len(row) for row in model.tokenizer.token_ids(texts)],
        "output_tokens": lengths,
        "documents_that_differ": int(differ),
        "runs": runs,
        "tokens_per_s": {name: total[name] / seconds[name] for name in paths},
    }
    report["inflight_over_batched"] = report["tokens_per_s"]["inflight"] / report["tokens_per_s"]["batched"]
    write(report, args.out)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    s = report["settings"]
    stem = f"batch_inflight_{s['model']}"
    tmp = out / f"{stem}.json.partial"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.rename(out / f"{stem}.json")
    lengths = report["output_tokens"]
    lines = [
        f"{report['date']}: {s['documents']} documents of {min(report['input_tokens'])}-"
        f"{max(report['input_tokens'])} tokens, {s['bench_model']}, generate {s['generate']}, "
        f"`ortseq batch` batches of {s['batch_size']} against {s['max_rows']} in-flight rows, {THREADS} "
        f"onnxruntime threads; summaries {min(lengths)}-{max(lengths)} tokens (median {np.median(lengths):.0f})",
        "",
        "| round | path | tokens | seconds | tokens/s | load avg before/after |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['round']} | {r['path']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{r['load_before']:.2f} / {r['load_after']:.2f} |"
        )
    lines += ["", f"in-flight / batched tokens/s over all rounds: **{report['inflight_over_batched']:.2f}x**; "
              f"documents whose summaries differ between the two: {report['documents_that_differ']}"]  # fmt: skip
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
