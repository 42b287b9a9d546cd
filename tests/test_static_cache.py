"""Decoder contract 0.3 (graphs/contract.py): a static cache written in place, beams reordered by
indirection, its two self-attention bodies, the driver's buffers, and exports made before it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import ortseq, padded_batch, torch_generate

from ortseq.exporter import onnx_export
from ortseq.exporter.families import family_for
from ortseq.exporter.pipeline import load_checked_model
from ortseq.graphs import contract
from ortseq.graphs.manifest import MANIFEST_FILE, sha256_of
from ortseq.runtime import Seq2SeqModel
from ortseq.runtime import sessions as sessions_module

DMMHA_OP = "DecoderMaskedMultiHeadAttention"
BEAMS, NEW_TOKENS = 4, 10
SEARCH = dict(num_beams=BEAMS, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)  # every step runs


def _ops(export_dir: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(export_dir / contract.DECODER_FILE)).graph.node]


def _batch(model: Seq2SeqModel) -> tuple[np.ndarray, np.ndarray]:
    return padded_batch(model.manifest, [13, 6, 1], seed=7)


def test_head_dim_32_decoder_uses_dmmha_and_other_head_sizes_the_plain_body(exported):
    dmmha, plain = exported("head32").export_dir, exported("base").export_dir
    assert Seq2SeqModel.load(dmmha).manifest.decoder_self_attention == contract.DMMHA_BODY
    assert _ops(dmmha).count(DMMHA_OP) == 2 and "ScatterND" not in _ops(dmmha)  # one per decoder layer
    assert Seq2SeqModel.load(plain).manifest.decoder_self_attention == contract.PLAIN_BODY
    assert _ops(plain).count("ScatterND") == 4 and DMMHA_OP not in _ops(plain)  # K and V of 2 layers


def test_plain_attention_export_generates_the_contrib_op_export_tokens(exported, tmp_path):
    model = exported("head32")
    result = ortseq("export", str(model.checkpoint), "--out", str(tmp_path / "plain"), "--plain-attention")
    assert result.returncode == 0, result.stderr
    plain, dmmha = Seq2SeqModel.load(tmp_path / "plain"), Seq2SeqModel.load(model.export_dir)
    assert plain.manifest.decoder_self_attention == contract.PLAIN_BODY and DMMHA_OP not in _ops(tmp_path / "plain")
    encoder_ops = {node.op_type for node in onnx.load(str(tmp_path / "plain" / contract.ENCODER_FILE)).graph.node}
    assert "MultiHeadAttention" not in encoder_ops and "If" not in encoder_ops and "Softmax" in encoder_ops
    ids, mask = _batch(dmmha)
    for settings in (dict(num_beams=1, max_new_tokens=12), dict(num_beams=8, max_new_tokens=12)):
        np.testing.assert_array_equal(plain.generate(ids, mask, **settings), dmmha.generate(ids, mask, **settings))


# ---------------------------------------------------------------- buffers: allocated once, written in place


class RecordingStep(sessions_module.DecoderStep):
    """DecoderStep that records, after every step, where each graph output was written."""

    instances: list[RecordingStep] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffers_before = self._buffer_addresses()
        self.caches_before = dict(self.cache_values)
        self.written: list[list[int]] = []
        RecordingStep.instances.append(self)

    def _buffer_addresses(self) -> set[int]:
        values = [*self.cache_values.values(), *self.indirection_values, self.logits_value]
        return {value.data_ptr() for value in values}

    def __call__(self, tokens, beam_idx):
        logits = super().__call__(tokens, beam_idx)
        self.written.append([value.data_ptr() for value in self._binding.get_outputs()])
        assert logits is self._host_logits  # on CPU the search reads the logits buffer itself
        return logits


@pytest.mark.parametrize("shape", ["head32", "base"])
def test_decoder_steps_write_only_into_buffers_allocated_before_the_first_step(exported, monkeypatch, shape):
    export_dir = exported(shape).export_dir  # exported (and verified, which runs the driver) first
    monkeypatch.setattr(sessions_module, "DecoderStep", RecordingStep)
    RecordingStep.instances.clear()
    model = Seq2SeqModel.load(export_dir)
    model.generate(*_batch(model), **SEARCH)
    (step,) = RecordingStep.instances
    assert len(step.written) == NEW_TOKENS
    layers = model.manifest.dims.decoder_layers
    for outputs in step.written:  # logits, indirection, 2 per layer: none allocated by onnxruntime
        assert len(outputs) == 2 + 2 * layers and set(outputs) <= step.buffers_before
    assert step._buffer_addresses() == step.buffers_before
    assert all(step.cache_values[name] is value for name, value in step.caches_before.items())
    # the driver ping-pongs the two indirection buffers: each step writes the one it did not read
    indirections = {value.data_ptr() for value in step.indirection_values}
    assert len(indirections) == 2
    assert [len(indirections & set(outputs)) for outputs in step.written] == [1] * NEW_TOKENS
    assert {(indirections & set(outputs)).pop() for outputs in step.written} == indirections


def _bytes_output_per_step(export_dir: Path, tmp_path: Path, monkeypatch) -> list[dict[str, tuple[str, int]]]:
    """Per decoder step, node name -> (op, bytes it output), from onnxruntime's profiler."""
    model = Seq2SeqModel.load(export_dir)
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "decoder")
    options.intra_op_num_threads = 1
    model.sessions.decoder = ort.InferenceSession(
        str(export_dir / contract.DECODER_FILE), options, providers=["CPUExecutionProvider"]
    )
    model.generate(*_batch(model), **SEARCH)
    events = json.loads(Path(model.sessions.decoder.end_profiling()).read_text())
    run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    steps: list[dict] = [{} for _ in run_ends]
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            run = next(i for i, end in enumerate(run_ends) if event["ts"] <= end)
            steps[run][event["name"]] = (event["args"]["op_name"], int(event["args"]["output_size"]))
    return steps


def test_dmmha_decoder_outputs_the_same_bytes_at_every_step(exported, tmp_path, monkeypatch):
    """No growing tensor: the cache is written in place and read where it lies (measured: 286,611 bytes per
    step on this fixture, the same at every step)."""
    steps = _bytes_output_per_step(exported("head32").export_dir, tmp_path, monkeypatch)
    assert len(steps) == NEW_TOKENS
    totals = [sum(size for _, size in step.values()) for step in steps]
    assert len(set(totals)) == 1, totals


def test_plain_decoder_grows_only_by_the_live_slot_reads(exported, tmp_path, monkeypatch):
    """The plain body's transient reads of the live slots grow by one slot per step (the Gather of the live
    slots, its slot-major copy, the Gather of the source rows, and their reshapes: 5 tensors of one slot's
    K or V per layer), plus the attention scores and the slot indices; the cache itself is never copied."""
    export_dir = exported("base").export_dir
    dims = Seq2SeqModel.load(export_dir).manifest.dims
    steps = _bytes_output_per_step(export_dir, tmp_path, monkeypatch)
    totals = [sum(size for _, size in step.values()) for step in steps]
    growth = set(np.diff(totals).tolist())
    assert len(growth) == 1, totals  # linear in the step: nothing is re-copied whole
    rows = 3 * BEAMS
    slot_bytes = rows * dims.decoder_heads * dims.head_dim * 4  # one slot of K or V, every row
    scores = dims.decoder_layers * 2 * rows * dims.decoder_heads * 4  # scores and softmax, one more column
    live_reads = dims.decoder_layers * 2 * 5 * slot_bytes
    assert live_reads + scores <= growth.pop() <= live_reads + scores + 1024  # + the slot indices
    scatter_sizes = {size for step in steps for op, size in step.values() if op == "ScatterND"}
    assert len(scatter_sizes) == 1  # the write into the bound cache: the same bytes every step


# ---------------------------------------------------------------- exports made before contract 0.3


def _concat_decoder_export(checkpoint: Path, export_dir: Path) -> None:
    """Replace export_dir's decoder with ortseq 0.2's (the concat contract, traced from the kept module),
    and its manifest with a schema-2 one that names no decoder contract, as 0.2 wrote it."""
    family = family_for(checkpoint)
    model = load_checked_model(family, checkpoint)
    dims = family.dims(model)
    layers, heads, dh = dims.decoder_layers, dims.decoder_heads, dims.head_dim
    past = [torch.randn(4, heads, 3, dh) for _ in range(2 * layers)]
    cross = [torch.randn(2, heads, 9, dh) for _ in range(2 * layers)]
    args = (torch.randint(3, dims.vocab_size, (4, 1)), torch.ones(2, 9, dtype=torch.int64), torch.tensor([1, 0, 3, 2]))
    onnx_export.export_graph(
        family.concat_decoder_export(model).eval(),
        (*args, *past, *cross),
        export_dir / contract.DECODER_FILE,
        contract.concat_decoder_inputs(layers),
        contract.concat_decoder_outputs(layers),
        contract.concat_decoder_dynamic_axes(layers),
    )
    raw = json.loads((export_dir / MANIFEST_FILE).read_text())
    del raw["decoder_contract"], raw["decoder_self_attention"]
    raw["schema_version"] = 2
    raw["files"][contract.DECODER_FILE] = sha256_of(export_dir / contract.DECODER_FILE)
    (export_dir / MANIFEST_FILE).write_text(json.dumps(raw))


@pytest.mark.parametrize("shape", ["head32", "base"])
def test_concat_export_made_before_contract_0_3_still_generates_the_same_tokens(exported, tmp_path, shape):
    model = exported(shape)
    old_dir = tmp_path / "concat"
    shutil.copytree(model.export_dir, old_dir)
    _concat_decoder_export(model.checkpoint, old_dir)
    old, new = Seq2SeqModel.load(old_dir), Seq2SeqModel.load(model.export_dir)
    assert not old.sessions.static_cache and "past_key_0" in {i.name for i in old.sessions.decoder.get_inputs()}
    ids, mask = _batch(new)
    for settings in (dict(num_beams=1, max_new_tokens=12), dict(num_beams=4, max_new_tokens=12)):
        tokens = old.generate(ids, mask, **settings)
        np.testing.assert_array_equal(tokens, new.generate(ids, mask, **settings))
        np.testing.assert_array_equal(tokens, torch_generate(model.torch_model, ids, mask, settings))


# ---------------------------------------------------------------- quantized exports of the DMMHA body


def test_dmmha_export_in_fp16_keeps_the_cache_and_the_attention_in_half_precision(exported, tmp_path):
    """onnxruntime 1.32's CPU DecoderMaskedMultiHeadAttention takes float16: the fp16 export's cache is
    float16 (half the bytes), bound in place as in fp32, and its logits stay close to the fp32 export's
    (measured on this fixture: mean |error| ~1e-3, the largest 0.34 of logits up to 8.2: fp16 rounding
    through strong random weights; a wrong cache read moves them by whole units)."""
    from ortseq.exporter.quantization.pipeline import quantize

    source = exported("head32").export_dir
    quantize(source, tmp_path / "fp16", "fp16", min_agreement=0.0)
    graph = onnx.load(str(tmp_path / "fp16" / contract.DECODER_FILE)).graph
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.input, *graph.output]}
    assert types["cache_key_0"] == types["present_key_0"] == onnx.TensorProto.FLOAT16
    assert [node.op_type for node in graph.node].count(DMMHA_OP) == 2
    fp16, fp32 = Seq2SeqModel.load(tmp_path / "fp16"), Seq2SeqModel.load(source)
    ids, mask = _batch(fp32)
    prefix = np.array([[0, 17, 23, 42]] * 3)
    want = fp32.sessions.teacher_forced_logits(ids, mask, prefix)
    got = fp16.sessions.teacher_forced_logits(ids, mask, prefix)
    assert np.mean(np.abs(got - want)) <= 0.005 * np.max(np.abs(want))


class CountingSession:
    """An onnxruntime session that counts its runs."""

    def __init__(self, session: ort.InferenceSession):
        self._session, self.runs = session, 0

    def run_with_iobinding(self, binding, *args):
        self.runs += 1
        return self._session.run_with_iobinding(binding, *args)

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_cpu_encoder_runs_are_bounded_in_positions_and_attention_and_hold_every_row_once():
    assert (sessions_module.ENCODE_TOKENS, sessions_module.ENCODE_SCORES_LENGTH) == (512, 256)
    chunks = sessions_module.encoder_chunks
    assert chunks(8, 64) == [slice(0, 8)]  # short inputs share one run
    assert chunks(8, 128) == [slice(0, 4), slice(4, 8)]  # 512 positions, one 256-token input's attention
    assert chunks(3, 200) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # 2 x 200^2 > 256^2
    assert chunks(2, 256) == [slice(0, 1), slice(1, 2)]  # a run per input from 256 tokens up
    assert chunks(2, 1024) == [slice(0, 1), slice(1, 2)]  # longer than the bounds: still one input a run
    assert chunks(4, 100) == [slice(0, 4)] and chunks(5, 100) == [slice(0, 4), slice(4, 5)]
    assert chunks(1, 1) == [slice(0, 1)] and chunks(3, 0) == [slice(0, 3)]


def test_cpu_encoder_encodes_a_few_inputs_per_run_into_the_batchs_buffers(exported, monkeypatch):
    # runs within encoder_chunks' bounds: the encoder's working memory is bounded whatever the batch
    # (the peak RSS of batch 8 x 512 tokens); the outputs are those of one run over the whole padded batch,
    # exactly for rows of a run with padding (the same masked attention), to fp32 rounding for the rows of
    # a run without: it has no padding, and its attention runs without the mask
    # (exporter/unpadded_attention.py)
    model = Seq2SeqModel.load(exported("head32").export_dir)
    ids, mask = padded_batch(model.manifest, [13, 13, 6, 1, 9], seed=7)
    monkeypatch.setattr(sessions_module, "ENCODE_TOKENS", 2 * ids.shape[1])  # two rows a run
    runs = sessions_module.encoder_chunks(*ids.shape)
    assert runs == [slice(0, 2), slice(2, 4), slice(4, 5)]
    whole = model.sessions.encode(ids, mask)
    counting = CountingSession(model.sessions.encoder)
    model.sessions.encoder = counting
    chunked = model.sessions.encode_on_device(ids, mask)
    assert counting.runs == len(runs)
    assert list(chunked) == list(whole)
    unpadded_run = np.zeros(len(ids), dtype=bool)
    for rows in runs:
        unpadded_run[rows] = mask[rows].all()
    assert unpadded_run.tolist() == [True, True, False, False, False]
    for name, value in chunked.items():
        got = value.numpy()
        np.testing.assert_array_equal(got[~unpadded_run], whole[name][~unpadded_run], err_msg=name)
        np.testing.assert_allclose(got[unpadded_run], whole[name][unpadded_run], rtol=1e-5, atol=1e-5, err_msg=name)


def test_only_a_tiny_decoder_runs_with_a_memory_pattern(exported):
    # a pattern's block comes on a shape's second run, on top of the first run's freed chunks
    # (runtime/sessions.py); it pays for itself only where a decoder step is tiny
    sessions = Seq2SeqModel.load(exported("base").export_dir).sessions
    assert sessions.encoder.get_session_options().enable_mem_pattern is False
    assert sessions.decoder.get_session_options().enable_mem_pattern is True  # tiny-pegasus
    mid_size = replace(sessions.manifest.dims, d_model=512, decoder_layers=6, vocab_size=96103)
    assert not sessions_module.decoder_memory_pattern(mid_size)
