"""ortseq's own search loop over its export (fp32), or over `ortseq quantize`'s int8/int4 exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.systems import MAIN_PYTHON

QUALITY_TEXTS = Path(__file__).with_name("quality_texts_random_weights.txt")


def prepare(model, variant: str) -> Path:
    if variant == "fp32":
        return model.export_dir
    out = model.cache / f"export-{variant}"
    if not (out / "manifest.json").is_file():
        print(f"[bench] ortseq quantize {model.name} --to {variant}", flush=True)
        cmd = [str(MAIN_PYTHON), "-m", "ortseq.runtime.cli", "quantize", str(model.export_dir), "--to", variant]
        # Random weights: near-uniform outputs flip on any noise, so agreement says nothing here (the
        # gate is exercised on the trained fixture); two short texts keep the report cheap on xsum.
        quality = ["--min-agreement", "0", "--texts", str(QUALITY_TEXTS)]
        subprocess.run([*cmd, *quality, "--out", str(out)], check=True, stdout=sys.stderr)
    return out


def load(model_dir: str, variant: str, threads: int):
    from ortseq.runtime import Seq2SeqModel

    model = Seq2SeqModel.load(model_dir, threads=threads, verify=False)

    def generate(ids, num_beams: int, new_tokens: int):
        return model.generate(ids, num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    return generate
