"""optimum's ORTModelForSeq2SeqLM: its own export (with past), and its dynamic int8 (ORTQuantizer).

optimum needs transformers < 4.58, so this module runs in .venv-optimum: `prepare` calls itself
there (`python -m benchmarks.systems.optimum_ort prepare ...`), and so does the worker.
fp32 is optimum's default export (separate decoder and decoder-with-past here); int8 quantizes an unmerged export (encoder,
decoder, decoder-with-past), because quantize_dynamic leaves the merged decoder's If branches alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.systems import OPTIMUM_PYTHON, ROOT

GRAPHS = ("encoder_model", "decoder_model", "decoder_with_past_model")


def prepare(model, variant: str) -> Path:
    out = model.cache / f"optimum-{variant}"
    if not (out / "config.json").is_file():
        print(f"[bench] exporting {model.name} with optimum ({variant}); slow for big models", flush=True)
        cmd = [str(OPTIMUM_PYTHON), "-m", "benchmarks.systems.optimum_ort", "prepare", str(model.checkpoint)]
        subprocess.run([*cmd, str(out), variant], check=True, cwd=ROOT, stdout=sys.stderr)
    return out


def _export(checkpoint: str, out: Path, variant: str) -> None:
    """Runs in .venv-optimum."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if variant == "fp32":
        ORTModelForSeq2SeqLM.from_pretrained(checkpoint, export=True).save_pretrained(staging)
    else:
        from optimum.exporters.onnx import main_export

        unmerged = out.with_name("optimum-unmerged")
        if not (unmerged / f"{GRAPHS[-1]}.onnx").is_file():
            main_export(checkpoint, output=unmerged, task="text2text-generation-with-past", no_post_process=True)
        # optimum's docs: dynamic quantization with the config of the CPU's instruction set
        flags = Path("/proc/cpuinfo").read_text()
        make_config = AutoQuantizationConfig.avx512_vnni if "avx512_vnni" in flags else AutoQuantizationConfig.avx2
        config = make_config(is_static=False, per_channel=False)
        for name in GRAPHS:
            quantizer = ORTQuantizer.from_pretrained(unmerged, file_name=f"{name}.onnx")
            quantizer.quantize(save_dir=staging, quantization_config=config, use_external_data_format=True)
        for item in unmerged.iterdir():  # configs and tokenizer files
            if not item.name.endswith((".onnx", ".onnx_data")) and not (staging / item.name).exists():
                shutil.copy(item, staging / item.name)
    staging.rename(out)


def load(model_dir: str, variant: str, threads: int):
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    torch.set_num_threads(threads)  # optimum's generate() loop runs in torch
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    names = {}
    if variant != "fp32":
        names = {f"{g.replace('_model', '')}_file_name": f"{g}_quantized.onnx" for g in GRAPHS}
    model = ORTModelForSeq2SeqLM.from_pretrained(model_dir, session_options=options, use_merged=False, **names)

    def generate(ids, num_beams: int, new_tokens: int):
        out = model.generate(
            torch.from_numpy(ids), num_beams=num_beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )
        return out.numpy()

    return generate


if __name__ == "__main__" and sys.argv[1] == "prepare":
    _export(sys.argv[2], Path(sys.argv[3]), sys.argv[4])
