"""`ortseq quantize`: quantized exports of a *trained* tiny Pegasus stay close to fp32, and say how close.

Quality is measured on tiny-pegasus-trained (exporter/trained_tiny.py: trained once per clone on a
synthetic lead-sentence task, cached under .cache/), because agreement on random weights means nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import inline_shared_tables, ortseq, readers_by_table, rows_through_the_mapping

from ortseq.exporter.pipeline import export
from ortseq.exporter.quantization import formats, vocab_tables
from ortseq.exporter.quantization.fp16 import Fp16Settings, convert_fp16
from ortseq.exporter.quantization.pipeline import QualityGateError, quantize
from ortseq.exporter.quantization.quality import lowest_agreement, sequence_agreement
from ortseq.exporter.shared_weights import SharedFile
from ortseq.exporter.tiny.pegasus import TinyPegasusShape, build_tiny_pegasus
from ortseq.exporter.tiny.trained import synthetic_documents
from ortseq.graphs import contract
from ortseq.graphs.manifest import MANIFEST_FILE, Manifest, sha256_of
from ortseq.runtime.model import Seq2SeqModel

QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QGemm"}


@pytest.fixture(scope="session")
def quantized(trained_export, tmp_path_factory):
    """quantized(fmt) -> (export dir, manifest) of the trained export in that format, made once."""
    cache: dict[str, tuple] = {}

    def get(fmt: str):
        if fmt not in cache:
            out = tmp_path_factory.mktemp(fmt) / fmt
            cache[fmt] = (out, quantize(trained_export, out, fmt, min_agreement=0.95))
        return cache[fmt]

    return get


def test_trained_fixture_summarizes_held_out_documents(trained_export):
    docs = synthetic_documents(60, seed=123_456)  # neither the training nor the held-out report's seed
    model = Seq2SeqModel.load(trained_export)
    summaries = model.summarize([doc for doc, _ in docs], num_beams=1)
    exact = np.mean([summary.strip() == lead for summary, (_, lead) in zip(summaries, docs)])
    assert exact >= 0.9, exact


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_quantized_export_passes_the_quality_gate_and_records_its_report(quantized, fmt):
    out, manifest = quantized(fmt)
    report = Manifest.read(out).quantization.quality
    assert report == json.loads(json.dumps(manifest.quantization.quality))
    for mode in ("greedy", "beam4"):
        assert report[mode]["token_agreement"] >= 0.95, (mode, report)
    assert 0 < report["logits"]["mean_abs_error"] <= report["logits"]["max_abs_error"]
    assert report["logits"]["max_abs_error"] < report["logits"]["fp32_logit_std"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_only_constant_weight_matmuls_are_quantized(trained_export, quantized, fmt):
    out, _ = quantized(fmt)
    activation_matmuls = 0
    for graph in (contract.ENCODER_FILE, contract.DECODER_FILE):
        before, after = onnx.load(str(trained_export / graph)), onnx.load(str(out / graph))
        constants = {init.name for init in after.graph.initializer}
        quantized_nodes = [node for node in after.graph.node if node.op_type in QUANTIZED_OPS]
        assert quantized_nodes, graph
        for node in quantized_nodes:
            weight = node.input[3 if node.op_type == "QGemm" else 1]  # QGemm: A, its scale and zero point, then B
            assert weight in constants, (graph, node.name)  # the weight is a constant
        # the attention MatMuls (Q·Kᵀ, P·V: both operands activations) are all still float MatMuls (the
        # decoder's cross-attention has them; the encoder's attention is one MultiHeadAttention node)
        assert _activation_matmuls(after) == _activation_matmuls(before), graph
        activation_matmuls += _activation_matmuls(after)
    assert activation_matmuls > 0


def _activation_matmuls(model: onnx.ModelProto) -> int:
    constants = {init.name for init in model.graph.initializer}
    return sum(node.op_type == "MatMul" and not set(node.input) & constants for node in model.graph.node)


def test_lm_head_and_embedding_choices_select_the_vocabulary_nodes(trained_export, tmp_path):
    model = onnx.load(str(trained_export / contract.DECODER_FILE))
    vocab = Manifest.read(trained_export).dims.vocab_size
    readers = vocab_tables.vocab_readers(formats.name_nodes(model), vocab)
    assert len(readers.lm_heads) == 1 and len(readers.gathers) == 1
    lm_head, lookup = readers.lm_heads[0].name, readers.gathers[0].name
    for settings in (formats.Int8Settings(), formats.Int8Settings(lm_head=False, embeddings=False)):
        target = tmp_path / f"decoder-{settings.lm_head}.onnx"
        shared = SharedFile(tmp_path / f"shared-{settings.lm_head}")
        shared.path.parent.mkdir()
        formats.quantize_int8(trained_export / contract.DECODER_FILE, target, settings, vocab, False, shared)
        graph = onnx.load(str(target), load_external_data=False).graph
        weight_types = {init.name: init.data_type for init in graph.initializer}
        nodes = {node.name: node for node in graph.node}
        assert nodes[lm_head].op_type == ("QGemm" if settings.lm_head else "Gemm")
        token_table = weight_types[nodes[f"{lookup}/rows" if settings.embeddings else lookup].input[0]]
        assert (token_table == onnx.TensorProto.INT8) == settings.embeddings
        # the position table and the past reordering by beam_idx are never quantized
        other_gathers = [node for node in graph.node if node.op_type == "Gather" and not node.name.startswith(lookup)]
        assert other_gathers
        assert all(
            weight_types.get(node.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for node in other_gathers
        )


def test_quantized_export_runs_through_the_cli(quantized):
    out, _ = quantized("int8")
    doc, lead = synthetic_documents(1, seed=77)[0]
    result = ortseq("generate", str(out), doc, "--num-beams", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == lead


def test_impossible_threshold_is_refused_and_nothing_is_written(trained_export, tmp_path):
    out = tmp_path / "int8"  # the CLI refuses --min-agreement outside [0, 1] (tests/test_errors.py): use the API
    with pytest.raises(QualityGateError, match="under the threshold 1.01"):
        quantize(trained_export, out, "int8", min_agreement=1.01)
    assert list(tmp_path.iterdir()) == []


def test_quantizing_a_quantized_export_is_refused(quantized, tmp_path):
    out, _ = quantized("int4")
    result = ortseq("quantize", str(out), "--to", "int8", "--out", str(tmp_path / "again"))
    assert result.returncode == 2 and "already int4" in result.stderr


def test_manifests_without_a_quantization_section_still_load(trained_export, tmp_path):
    raw = json.loads((trained_export / MANIFEST_FILE).read_text())
    raw.pop("quantization", None)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(raw))
    manifest = Manifest.read(tmp_path)
    assert manifest.quantization is None and manifest.precision == "fp32"


def test_fp16_keeps_an_overflowing_residual_stream_finite_where_a_naive_conversion_does_not(tmp_path):
    """A tiny Pegasus whose encoder residual stream reaches ~1e5 (fp16's maximum is 65504): each layer's
    FFN adds 3e4 to a few channels, as the outlier channels of trained transformers do."""
    torch.manual_seed(0)
    shape = TinyPegasusShape(encoder_layers=4, decoder_layers=1)
    checkpoint = build_tiny_pegasus(tmp_path / "checkpoint", shape)
    from transformers import PegasusForConditionalGeneration

    model = PegasusForConditionalGeneration.from_pretrained(str(checkpoint))
    with torch.no_grad():
        for layer in model.model.encoder.layers:
            layer.fc2.bias[:4] = 3.0e4
    model.save_pretrained(checkpoint)
    export(str(checkpoint), tmp_path / "fp32")

    encoder = onnx.load(str(tmp_path / "fp32" / contract.ENCODER_FILE))
    ids = np.array([[5, 9, 23, 47, 11, 1]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    reference = _run(encoder, feeds)
    assert np.abs(_residual_stream(encoder, feeds)).max() > 65504  # the fp32 stream really exceeds fp16

    naive = _run(_fp16_encoder(tmp_path, Fp16Settings(keep_residual_fp32=False)), feeds)
    ours = _run(_fp16_encoder(tmp_path, Fp16Settings()), feeds)
    assert not np.isfinite(naive).all()
    assert np.isfinite(ours).all()
    # After the final LayerNorm the 4 outlier channels sit near +3.87 and the other 60 near -0.26: what the
    # encoder says about the tokens is how each group varies around that, a std of about 6e-4 (measured).
    # A tolerance scaled by the output's maximum (2% of 3.87 = 0.077) would accept replacing the 60 channels
    # by one constant. So: within 2% of each group's own variation (~1e-5; ours measured 1e-6).
    for group in (slice(0, 4), slice(4, None)):
        tolerance = 2e-2 * reference[..., group].std()
        np.testing.assert_allclose(ours[..., group], reference[..., group], rtol=0, atol=tolerance, err_msg=group)


def _fp16_encoder(tmp_path, settings: Fp16Settings) -> onnx.ModelProto:
    target = tmp_path / f"encoder-{settings.keep_residual_fp32}.onnx"
    vocab = Manifest.read(tmp_path / "fp32").dims.vocab_size
    shared = SharedFile(tmp_path)  # the encoder's fp16 table goes to tmp_path/embeddings.data, beside it
    convert_fp16(tmp_path / "fp32" / contract.ENCODER_FILE, target, settings, vocab, False, shared)
    return onnx.load(str(target))


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["last_hidden_state"], feeds)[0].astype(np.float32)


def _residual_stream(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """The input of the encoder's final LayerNorm (the residual stream after the last layer)."""
    final_norm = [node for node in model.graph.node if node.op_type == "LayerNormalization"][-1]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(final_norm.input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([final_norm.input[0]], feeds)[0]


EOS = 1


def _rows(*outputs: list[int]) -> np.ndarray:
    """Generate()-style rows: the decoder start token 0 first, shorter rows padded with 0 after EOS."""
    width = 1 + max(len(tokens) for tokens in outputs)
    return np.array([[0, *tokens] + [0] * (width - 1 - len(tokens)) for tokens in outputs], dtype=np.int64)


@pytest.mark.parametrize(
    "actual, exact, agreement",
    [
        ([5, 6, 7, EOS], 1.0, 1.0),
        ([5, 6, 7, EOS, 9, 9], 1.0, 1.0),  # what follows EOS is padding, not output
        ([5, 6, EOS], 0.0, 2 / 4),  # stops early: loses the positions it no longer holds
        ([5, 6, 8, EOS], 0.0, 3 / 4),  # one token differs
        ([9, 5, 6, 7, EOS], 0.0, 0.0),  # shifted by one: every position differs
        ([5, 6, 7, 8, EOS], 0.0, 3 / 4),  # runs on: same prefix, but EOS is missing at position 4
    ],
)
def test_sequence_agreement_counts_positions_of_the_fp32_output(actual, exact, agreement):
    report = sequence_agreement(_rows([5, 6, 7, EOS]), _rows(actual), EOS)
    assert report == {"exact_match": exact, "token_agreement": agreement}


def test_sequence_agreement_weighs_inputs_by_their_fp32_length():
    expected = _rows([5, EOS], [5, 6, 7, 8, 9, 10, EOS])
    actual = _rows([5, EOS], [5, 6, 7, 9, 9, 9, EOS])  # second row: 5 of 7 positions (5, 6, 7, 9, EOS)
    assert sequence_agreement(expected, actual, EOS) == {"exact_match": 0.5, "token_agreement": (2 + 5) / 9}


def test_the_gate_judges_the_mode_that_agrees_least():
    report = {"greedy": {"token_agreement": 0.97}, "beam4": {"token_agreement": 0.62}, "logits": {}}
    assert lowest_agreement(report) == ("beam4", 0.62)


def test_a_damaged_quantized_export_scores_low_and_is_refused(trained_export, gate_calls, monkeypatch, tmp_path):
    """int8 whose decoder has its final LayerNorm scale replaced by noise: a broken export must not pass."""
    real_int8 = formats.quantize_int8

    def damaged_int8(source, target, *args):
        real_int8(source, target, *args)
        if target.name == contract.DECODER_FILE:
            model = onnx.load(str(target))
            final_norm = [node for node in model.graph.node if node.op_type == "LayerNormalization"][-1]
            scale = next(init for init in model.graph.initializer if init.name == final_norm.input[1])
            noise = np.random.default_rng(0).normal(size=onnx.numpy_helper.to_array(scale).shape)
            scale.CopyFrom(onnx.numpy_helper.from_array(noise.astype(np.float32), scale.name))
            onnx.save(model, str(target))

    monkeypatch.setattr(formats, "quantize_int8", damaged_int8)
    out = tmp_path / "int8"
    with pytest.raises(QualityGateError, match="under the threshold 0.9"):
        quantize(trained_export, out, "int8")
    [(report, (_, agreement))] = gate_calls
    assert agreement < 0.5, report  # the undamaged int8 export agrees 1.000 in both modes
    assert not out.exists() and list(tmp_path.iterdir()) == []


# bytes of each format's one stored table: int8 rows with an fp32 scale and an int8 zero point per row,
# int4 (block 32) with an fp32 scale per block, fp16
ONE_TABLE_BYTES = {
    "int8": lambda vocab, d: vocab * (d + 4 + 1),
    "int4": lambda vocab, d: vocab * (d // 2 + 4 * d // 32),
    "fp16": lambda vocab, d: vocab * d * 2,
}


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_a_quantized_export_stores_its_token_table_once_for_lookups_and_lm_head(quantized, fmt):
    out, manifest = quantized(fmt)
    vocab, d_model = manifest.dims.vocab_size, manifest.dims.d_model
    inline, places, vocab_places = [], set(), set()
    for graph in (contract.ENCODER_FILE, contract.DECODER_FILE):
        for tensor in onnx.load(str(out / graph), load_external_data=False).graph.initializer:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            if entries.get("location") != contract.SHARED_WEIGHTS_FILE:
                inline.append(tensor)
                continue
            place = (int(entries["offset"]), int(entries["length"]))  # int4: one place, two shapes
            places.add(place)
            if vocab in tensor.dims:
                vocab_places.add(place)
    assert [tensor.name for tensor in inline if vocab in tensor.dims] == []
    assert sum(length for _, length in vocab_places) == ONE_TABLE_BYTES[fmt](vocab, d_model)
    # each weight once: no tensor of one graph's own data is also in the other's (the positions are shared)
    copies = Counter(tensor.raw_data for tensor in inline if len(tensor.raw_data) > 4096)
    assert [count for count in copies.values() if count > 1] == []
    assert (out / contract.SHARED_WEIGHTS_FILE).stat().st_size <= sum(length for _, length in places) + 4096 * len(
        places
    )
    assert manifest.files[contract.SHARED_WEIGHTS_FILE] == sha256_of(out / contract.SHARED_WEIGHTS_FILE)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_every_initializer_of_a_quantized_graph_is_read_by_a_node(quantized, fmt):
    # an unread one is bytes on disk and, where onnxruntime meets it, a warning at every load
    out, _ = quantized(fmt)
    for graph in (contract.ENCODER_FILE, contract.DECODER_FILE):
        model = onnx.load(str(out / graph), load_external_data=False).graph
        read = {name for node in model.node for name in node.input} | {output.name for output in model.output}
        assert [tensor.name for tensor in model.initializer if tensor.name not in read] == [], graph


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_both_sessions_of_a_quantized_export_read_one_copy_of_each_table(quantized, fmt):
    """The LM head reads the file's mapping; the lookups of both graphs one buffer of the rows read."""
    out, manifest = quantized(fmt)
    shared = Seq2SeqModel.load(out).sessions.shared_weights
    encoder = dict(shared.initializers(out / contract.ENCODER_FILE))
    decoder = dict(shared.initializers(out / contract.DECODER_FILE))
    assert encoder and {v.data_ptr() for v in encoder.values()} <= {v.data_ptr() for v in decoder.values()}
    mapped = _mapped_ranges(out / contract.SHARED_WEIGHTS_FILE)
    for name, value in {**encoder, **decoder}.items():
        in_mapping = any(start <= value.data_ptr() < end for start, end in mapped)
        assert in_mapping == (name not in manifest.lookup_tables), name


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """The address ranges this process maps `path` at (/proc/self/maps; Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path.resolve()):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_a_quantized_export_with_its_tables_inside_each_graph_still_runs(quantized, tmp_path):
    """int8/int4/fp16 exports made before the shared file kept a table copy in each graph."""
    out, _ = quantized("int8")
    old = inline_shared_tables(out, tmp_path / "old-export")
    docs = [doc for doc, _ in synthetic_documents(3, seed=5)]
    expected = Seq2SeqModel.load(out).summarize(docs, num_beams=2)
    assert Seq2SeqModel.load(old).summarize(docs, num_beams=2) == expected


def test_int4_of_a_d_model_the_blocks_do_not_divide_keeps_float_lookups_and_runs(exported, tmp_path):
    """odd_heads has d_model 60: GatherBlockQuantized cannot read MatMulNBits' padded last block of 32."""
    source = exported("odd_heads").export_dir
    out = tmp_path / "int4"
    quantize(source, out, "int4", min_agreement=0.0, texts=["The river bridge will open next year."])
    decoder = onnx.load(str(out / contract.DECODER_FILE), load_external_data=False)
    ops = {node.op_type for node in decoder.graph.node}
    assert "MatMulNBits" in ops and "GatherBlockQuantized" not in ops
    ids = np.array([[5, 9, 23, 47, 11, 1]], dtype=np.int64)
    assert Seq2SeqModel.load(out).generate(ids, max_new_tokens=4).shape[1] > 1


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_a_quantized_export_keeps_the_search_step_graph_and_chooses_on_the_device_with_it(quantized, fmt):
    """search_step.onnx reads the decoder's float32 logits, which every format keeps: it is carried over."""
    out, manifest = quantized(fmt)
    assert contract.SEARCH_STEP_FILE in manifest.files
    model = Seq2SeqModel.load(out)
    assert model.sessions.search_step is not None
    model.engine.search_step_on_cpu = True  # the CPU's default chooses in numpy (runtime/engines.py)
    ids, mask = model.tokenizer.encode([doc for doc, _ in synthetic_documents(2, seed=7)])
    on_device = model.generate(ids, mask, num_beams=4, max_new_tokens=12)
    model.engine.search_step_on_cpu = False
    assert np.array_equal(on_device, model.generate(ids, mask, num_beams=4, max_new_tokens=12))


LOOKUPS = {("Gather", 0, "input_ids")} | {("GatherBlockQuantized", i, "input_ids") for i in (0, 2, 3)}


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_each_format_lists_tables_only_lookups_read_and_rows_read_as_needed_change_no_token(quantized, fmt, tmp_path):
    """The runtime holds only the rows a call looks up of the manifest's lookup_tables
    (runtime/shared_weights.py): no other node may read them, and the tokens must not change."""
    export_dir, manifest = quantized(fmt)
    readers = readers_by_table(export_dir)
    assert manifest.lookup_tables
    assert set(manifest.lookup_tables) == {table for table, nodes in readers.items() if nodes & LOOKUPS}
    for table in manifest.lookup_tables:
        assert readers[table] <= LOOKUPS, (table, readers[table])

    whole = rows_through_the_mapping(export_dir, tmp_path / "whole")
    ids = np.array([[5, 9, 23, 47, 11, 1], [7, 30, 12, 1, 0, 0]], dtype=np.int64)
    for settings in (dict(num_beams=1, max_new_tokens=8), dict(num_beams=4, max_new_tokens=8)):
        expected = Seq2SeqModel.load(whole).generate(ids, **settings)
        np.testing.assert_array_equal(Seq2SeqModel.load(export_dir).generate(ids, **settings), expected)


def test_int8_lm_head_reads_the_table_in_chunks_of_rows_stored_once_with_the_same_logits(
    trained_export, quantized, tmp_path, monkeypatch
):
    """The int8 LM head is one QGemm per run of the table's rows (vocab_tables.LM_HEAD_CHUNK_BYTES: a
    QGemm's prepack transposes its whole B into a scratch copy, the peak of loading). The tiny table is one
    chunk at the real size; a smaller chunk size makes several."""
    whole, _ = quantized("int8")
    monkeypatch.setattr(vocab_tables, "LM_HEAD_CHUNK_BYTES", 1500)
    chunked = tmp_path / "chunked"
    manifest = quantize(trained_export, chunked, "int8", min_agreement=0.95)
    vocab, d_model = manifest.dims.vocab_size, manifest.dims.d_model
    chunks = vocab_tables.row_chunks(vocab, d_model)
    assert len(chunks) > 2

    decoder = onnx.load(str(chunked / contract.DECODER_FILE), load_external_data=False)
    heads = [node for node in decoder.graph.node if node.op_type == "QGemm"]
    assert len(heads) == len(chunks) and len(_qgemms(whole)) == 1
    # each chunk's B is its rows of the lookups' table, in place in the shared file: one copy
    places = {tensor.name: _external_place(tensor) for tensor in decoder.graph.initializer}
    (table,) = [name for name in manifest.lookup_tables if name.startswith("decoder") and name.endswith(".int8")]
    table_offset, table_length = places[table]
    assert table_length == vocab * d_model
    for head, (start, end) in zip(heads, chunks):
        assert places[head.input[3]] == (table_offset + start * d_model, (end - start) * d_model), head.name
    shared = contract.SHARED_WEIGHTS_FILE
    assert (chunked / shared).stat().st_size <= (whole / shared).stat().st_size

    ids = np.array([[5, 9, 23, 47, 11, 1], [7, 30, 12, 1, 0, 0]], dtype=np.int64)
    mask = (np.arange(ids.shape[1]) < np.array([[6], [4]])).astype(np.int64)
    decoder_ids = np.array([[0, 17, 4, 250, 3], [0, 8, 8, 91, 2]], dtype=np.int64)
    logits = [Seq2SeqModel.load(d).sessions.teacher_forced_logits(ids, mask, decoder_ids) for d in (whole, chunked)]
    np.testing.assert_array_equal(*logits)  # the same integer dot products, scaled the same way


def _qgemms(export_dir: Path) -> list[onnx.NodeProto]:
    decoder = onnx.load(str(export_dir / contract.DECODER_FILE), load_external_data=False)
    return [node for node in decoder.graph.node if node.op_type == "QGemm"]


def _external_place(tensor: onnx.TensorProto) -> tuple[int, int] | None:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    if entries.get("location") != contract.SHARED_WEIGHTS_FILE:
        return None
    return int(entries["offset"]), int(entries["length"])
