"""Where the in-flight scheduler's host search time goes per step: cProfile over a few steps of a full
running set (benchmarks/load_inflight.py's model and request pool), by function.

    python benchmarks/profile_inflight_search.py [--model small|xsum] [--rows 48] [--steps 8]

Prints the decoder run and host search per step (ms, without the profiler: the decoder's own clocks) and
then the profile of the profiled steps, sorted by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import numpy as np
from load_inflight import MODELS, THREADS, prepare, request_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--rows", type=int, default=48, help="rows in the running set (greedy and 4-beam requests)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    from ortseq.runtime import Seq2SeqModel
    from ortseq.runtime.inflight import InflightDecoder, RowBudget, RowRequest, open_inflight_decoder

    export_dir = prepare(MODELS[args.model])
    model = Seq2SeqModel.load(export_dir, threads=THREADS)
    inflight = open_inflight_decoder(model.sessions, export_dir, "cpu", THREADS)
    decoder = InflightDecoder(model.sessions, inflight, RowBudget(max(64, args.rows), 2 * args.steps + 8))
    for entry in request_pool(model, 4 * args.rows, seed=26):
        parameters = entry["parameters"] | {"max_new_tokens": 2 * args.steps + 2, "min_new_tokens": 2 * args.steps + 2}
        if decoder.rows_in_use + parameters["num_beams"] <= args.rows:
            ids = np.asarray(model.tokenizer.token_ids([entry["text"]]), dtype=np.int64)
            decoder.admit(RowRequest(ids, np.ones_like(ids), model.settings(**parameters)))
    beams = sorted(request.rows for request in decoder.running)
    print(f"{decoder.rows_in_use} rows, {len(beams)} requests (beams {beams})")
    decoder.step()  # the first run of these shapes
    before = dict(decoder.seconds)
    for _ in range(args.steps):
        decoder.step()
    per_step = {phase: 1000 * (decoder.seconds[phase] - before[phase]) / args.steps for phase in ("decoder", "search")}
    print("ms per step: " + ", ".join(f"{phase} {ms:.1f}" for phase, ms in per_step.items()))
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        decoder.step()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
