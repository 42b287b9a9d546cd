"""`ortseq quantize` works for every family in every format: the quantized export loads, generates, and
carries a quality report the gate was applied to.

The models are tiny *random* checkpoints (the tiny-* aliases): their token agreement says little about
a real model (tests/test_quantize.py measures quality on a trained one), so the gate's threshold is 0
here and the test checks that the gate read this report. What a random model does show is how far the
quantized logits are from the fp32 ones, against the spread of the fp32 logits: LOGIT_ERROR_BOUND.

Every registered family (graphs/families.py) is covered through its tiny models (helpers.tiny_model_params):
each family's first in the default run, its others `slow` (`make test-full`). The fp32 exports are
conftest's session exports (`tiny_export`), shared with tests/test_family_conformance.py.
"""

from __future__ import annotations

import onnx
import pytest
from helpers import tiny_model_params

from ortseq.exporter.quantization import pipeline
from ortseq.exporter.quantization.quality import ReportSettings, default_texts
from ortseq.graphs import contract
from ortseq.graphs.manifest import Manifest
from ortseq.runtime.model import Seq2SeqModel

REPORT = ReportSettings(num_beams=2, max_new_tokens=8, logit_steps=4)
# mean |logit - fp32 logit| / std of the fp32 logits, at most. Measured on these models: fp16 0.006 to
# 0.021, int8 0.19 (Pegasus) to 0.55 (BertGeneration), int4 0.53 to 0.84 (the same two). The logits of
# another model of the same shape (weights lost or misread) are off by about 1.1 std (E|X - Y| for two
# independent spreads).
LOGIT_ERROR_BOUND = {"fp16": 0.05, "int8": 0.65, "int4": 0.95}


@pytest.mark.parametrize("fmt", pipeline.FORMATS)
@pytest.mark.parametrize(("family", "kind"), tiny_model_params())
def test_every_family_quantizes_to_every_format_and_generates(tiny_export, gate_calls, tmp_path, family, kind, fmt):
    source = tiny_export(kind).export_dir
    out = tmp_path / fmt
    pipeline.quantize(source, out, fmt, min_agreement=0.0, texts=default_texts()[:4], report_settings=REPORT)

    manifest = Manifest.read(out)
    assert manifest.family == Manifest.read(source).family == family and manifest.precision == fmt
    report = manifest.quantization.quality
    assert report["inputs"] == 4 and {"greedy", "beam2", "logits"} <= set(report)
    logits = report["logits"]
    assert logits["mean_abs_error"] <= LOGIT_ERROR_BOUND[fmt] * logits["fp32_logit_std"], logits
    [(gated_report, (mode, agreement))] = gate_calls  # the gate ran once, on the report that was written
    assert gated_report == report and agreement == min(report[m]["token_agreement"] for m in ("greedy", "beam2"))

    if fmt in ("int8", "int4"):  # LSG's linear layers, exported as 1x1 Convs (exporter/conv_linear.py), too
        encoder = onnx.load(str(out / contract.ENCODER_FILE), load_external_data=False)
        assert not [node.name for node in encoder.graph.node if node.op_type == "Conv"]

    model = Seq2SeqModel.load(out)
    ids, mask = model.tokenizer.encode(["The river bridge will open next year. " * 20, "The museum was closed."])
    tokens = model.generate(ids, mask, num_beams=2, max_new_tokens=6)
    assert tokens.shape[0] == 2 and tokens.shape[1] > 1
