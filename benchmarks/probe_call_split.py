"""Where one generate call's time goes, by session: encoder runs, decoder runs, and the rest (the Python
search around them), for this ortseq and for an earlier one on its own export, interleaved.

    python benchmarks/probe_call_split.py --export EXPORT --before-export EXPORT_AT_REF [--ref aa7d9f3]
        [--beams 1 8] [--rounds 2] [--calls 2] [--out benchmarks/results/call_split.json]

Each (version, beams) runs in a fresh process (the earlier ortseq from `git archive` of --ref, as `make
bench`'s ortseq-before systems): load with 2 threads, a warm-up call, then --calls timed calls of 512 input
ids drawn from the whole vocabulary and exactly 64 new tokens. onnxruntime's run() and
run_with_iobinding() are timed per graph file. Used for the benchmark log's "not slower than before" (benchmarks/results/history/log.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NEW_TOKENS, LENGTH, THREADS = 64, 512, 2


def worker(export: str, beams: int, calls: int) -> list[dict]:
    import numpy as np
    import onnxruntime as ort

    spent: dict[str, float] = {}

    def timed(method):
        def run(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                graph = Path(self._model_path).name
                spent[graph] = spent.get(graph, 0.0) + time.perf_counter() - start

        return run

    for name in ("run", "run_with_iobinding"):
        setattr(ort.InferenceSession, name, timed(getattr(ort.InferenceSession, name)))
    from ortseq.runtime import Seq2SeqModel

    model = Seq2SeqModel.load(export, threads=THREADS, verify=False)
    vocab = model.manifest.dims.vocab_size
    ids = np.random.default_rng(0).integers(3, vocab, size=(1, LENGTH)).astype(np.int64)
    settings = dict(num_beams=beams, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    model.generate(ids, **settings)  # warm-up
    samples = []
    for _ in range(calls):
        spent.clear()
        start = time.perf_counter()
        model.generate(ids, **settings)
        total = time.perf_counter() - start
        samples.append(dict(total_s=total, **{f"{graph}_s": s for graph, s in spent.items()}))
        samples[-1]["other_s"] = total - sum(spent.values())
    return samples


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True)
    parser.add_argument("--before-export", required=True)
    parser.add_argument("--ref", default="aa7d9f3")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "call_split.json"))
    args = parser.parse_args()
    from benchmarks.systems import baseline_tree

    versions = {"now": (args.export, None), "before": (args.before_export, str(baseline_tree(args.ref)))}
    runs = []
    for beams in args.beams:
        for round_ in range(args.rounds):
            for version, (export, tree) in versions.items():  # interleaved
                env = os.environ | ({"PYTHONPATH": tree} if tree else {})
                cmd = [sys.executable, __file__, "worker", export, str(beams), str(args.calls)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                samples = json.loads(done.stdout.strip().splitlines()[-1])
                runs.append(dict(version=version, beams=beams, round=round_ + 1, samples=samples,
                                 load_average=os.getloadavg()[0], at=time.strftime("%Y-%m-%dT%H:%M:%S")))  # fmt: skip
                totals = " ".join(f"{s['total_s']:.2f}" for s in samples)
                print(f"[split] beams {beams} round {round_ + 1} {version}: {totals} s", flush=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), ref=args.ref, export=args.export, before_export=args.before_export,
                threads=THREADS, input_tokens=LENGTH, new_tokens=NEW_TOKENS, calls=args.calls)  # fmt: skip
    Path(args.out).write_text(json.dumps(dict(meta=meta, runs=runs), indent=2) + "\n")


if __name__ == "__main__":
    main()
