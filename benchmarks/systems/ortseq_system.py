"""ortseq's own search loop over its export (fp32), or over `ortseq quantize`'s int8/int4 exports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks.systems import MAIN_PYTHON, baseline_tree

QUALITY_TEXTS = Path(__file__).with_name("quality_texts_random_weights.txt")


def prepare(model, variant: str) -> Path:
    """variant: fp32, int8 or int4; "int8@REF" runs the ortseq committed at REF (its own exports)."""
    variant, _, ref = variant.partition("@")
    if not ref and variant == "fp32":
        return model.export_dir
    env = os.environ | {"PYTHONPATH": str(baseline_tree(ref))} if ref else None
    fp32 = model.export_dir if not ref else model.cache / f"export-{ref}"
    if not (fp32 / "manifest.json").is_file():
        print(f"[bench] ortseq {ref} export {model.name}", flush=True)
        cmd = [str(MAIN_PYTHON), "-m", "ortseq.runtime.cli", "export", str(model.checkpoint), "--out", str(fp32)]
        subprocess.run(cmd, check=True, stdout=sys.stderr, env=env)
    if variant == "fp32":
        return fp32
    out = fp32.with_name(f"export-{variant}" + (f"-{ref}" if ref else ""))
    if not (out / "manifest.json").is_file():
        print(f"[bench] ortseq {ref} quantize {model.name} --to {variant}".replace("  ", " "), flush=True)
        cmd = [str(MAIN_PYTHON), "-m", "ortseq.runtime.cli", "quantize", str(fp32), "--to", variant]
        # Random weights: near-uniform outputs flip on any noise, so agreement says nothing here (the
        # gate is exercised on the trained fixture); two short texts keep the report cheap on xsum.
        quality = ["--min-agreement", "0", "--texts", str(QUALITY_TEXTS)]
        subprocess.run([*cmd, *quality, "--out", str(out)], check=True, stdout=sys.stderr, env=env)
    return out


def load(model_dir: str, variant: str, threads: int):
    from ortseq.runtime import Seq2SeqModel

    model = Seq2SeqModel.load(model_dir, threads=threads, verify=False)

    def generate(ids, num_beams: int, new_tokens: int):
        return model.generate(ids, num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    return generate
