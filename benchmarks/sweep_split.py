"""Where a sweep point's time goes in ortseq: encoder runs, decoder runs, and the rest (search and driver).

    python benchmarks/sweep_split.py [--points fp32:8,8,64,16 int8:8,1,256,16 ...] [--rounds 3]

A point is PRECISION:BATCH,BEAMS,INPUT_TOKENS,NEW_TOKENS on the sweep's mid-size model (benchmarks/sweep.py;
exactly that many new tokens, ids drawn from the whole vocabulary, 2 threads, as the sweep's worker). Each
precision loads once; every point gets a warm-up call and --rounds timed calls, the sessions' run calls
timed by bandwidth_floor.DecoderClock. The default points are the sweep's slowest against CTranslate2.
Writes benchmarks/results/sweep_split.{json,md}: the date, the machine, the load average and every sample.
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.bandwidth_floor import THREADS, DecoderClock, sweep_exports  # noqa: E402
from benchmarks.bench import input_ids, machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_POINTS = [
    "fp32:1,1,64,16", "fp32:1,1,256,64", "fp32:8,8,64,16", "fp32:8,8,256,32", "fp32:8,8,1024,32",
    "int8:8,1,256,16", "int8:1,8,256,16", "int8:8,8,256,32", "int8:8,8,1024,32",
]  # fmt: skip
PARTS = ("wall_s", "encoder_s", "decoder_s", "rest_s")


def parse_point(text: str) -> dict:
    precision, _, numbers = text.partition(":")
    batch, beams, length, new_tokens = (int(v) for v in numbers.split(","))
    return dict(precision=precision, batch=batch, beams=beams, length=length, new_tokens=new_tokens)


def split(model, point: dict, rounds: int) -> dict:
    sessions = model.engine.sessions
    encoder, decoder = DecoderClock(sessions.encoder), DecoderClock(sessions.decoder)
    sessions.encoder, sessions.decoder = encoder, decoder
    ids = input_ids(point["batch"], point["length"], model.manifest.dims.vocab_size)
    new = point["new_tokens"]

    def call():
        return model.generate(ids, num_beams=point["beams"], max_new_tokens=new, min_new_tokens=new)

    call()  # warm-up
    samples = []
    for _ in range(rounds):
        encoder.seconds = decoder.seconds = 0.0
        start = time.perf_counter()
        out = call()
        wall = time.perf_counter() - start
        assert out.shape == (point["batch"], 1 + new), out.shape
        samples.append(
            dict(wall_s=wall, encoder_s=encoder.seconds, decoder_s=decoder.seconds,
                 rest_s=wall - encoder.seconds - decoder.seconds, load_average=os.getloadavg()[0])
        )  # fmt: skip
    sessions.encoder, sessions.decoder = encoder._session, decoder._session
    median = {part: statistics.median(s[part] for s in samples) for part in PARTS}
    per_step = {f"{part[:-2]}_ms_per_step": 1000 * median[part] / new for part in ("decoder_s", "rest_s")}
    return dict(point, **median, **per_step, samples=samples)


def markdown(results: list[dict]) -> str:
    lines = [
        "| precision | batch | beams | in | out | call s | encoder s | decoder ms/step | search + driver ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['precision']} | {r['batch']} | {r['beams']} | {r['length']} | {r['new_tokens']} | {r['wall_s']:.2f} | "
            f"{r['encoder_s']:.2f} | {r['decoder_ms_per_step']:.1f} | {r['rest_ms_per_step']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "sweep_split")
    args = parser.parse_args()
    from ortseq.runtime.model import Seq2SeqModel

    points = [parse_point(p) for p in args.points]
    exports = dict(zip(("fp32", "int8"), sweep_exports()))
    results = []
    for precision in dict.fromkeys(p["precision"] for p in points):
        model = Seq2SeqModel.load(exports[precision], threads=THREADS, verify=False)
        for point in (p for p in points if p["precision"] == precision):
            results.append(split(model, point, args.rounds))
            r = results[-1]
            print(f"[split] {precision} {point}: {r['wall_s']:.2f} s, encoder {r['encoder_s']:.2f} s, "
                  f"decoder {r['decoder_ms_per_step']:.1f} ms/step, rest {r['rest_ms_per_step']:.1f} ms/step", flush=True)  # fmt: skip
        del model
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=machine(), threads=THREADS, rounds=args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".json.partial")
    partial.write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    partial.replace(args.out.with_suffix(".json"))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
