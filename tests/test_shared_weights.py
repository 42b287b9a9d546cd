"""Each weight stored once: the token embeddings live in embeddings.data, read by both graphs, loaded once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import inline_shared_tables, readers_by_table, rows_through_the_mapping

from ortseq.graphs import contract
from ortseq.graphs.manifest import MANIFEST_FILE, ManifestError, sha256_of
from ortseq.runtime.model import Seq2SeqModel

GRAPHS = (contract.ENCODER_FILE, contract.DECODER_FILE)
INPUT_IDS = np.array([[5, 17, 30, 8, 1], [9, 8, 7, 1, 0]])


def _vocab_tensors(export_dir: Path, vocab: int) -> list[onnx.TensorProto]:
    """Every initializer of both graphs with the vocabulary as an axis (token embeddings, LM head)."""
    tensors = []
    for graph in GRAPHS:
        model = onnx.load(str(export_dir / graph), load_external_data=False)
        tensors += [tensor for tensor in model.graph.initializer if vocab in tensor.dims]
    return tensors


def _where(tensor: onnx.TensorProto) -> tuple:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    return entries.get("location"), entries.get("offset"), entries.get("length")


def test_a_tied_export_stores_its_token_embedding_once_for_encoder_decoder_and_lm_head(exported):
    export_dir = exported("deep_decoder").export_dir  # a tied model: one table for all three
    manifest = json.loads((export_dir / MANIFEST_FILE).read_text())
    vocab, d_model = manifest["dims"]["vocab_size"], manifest["dims"]["d_model"]
    tensors = _vocab_tensors(export_dir, vocab)
    # the encoder's table and the decoder's, as its Gather reads it and as its LM head does
    assert sorted(tensor.name for tensor in tensors) == sorted(
        [*manifest["lookup_tables"], manifest["lookup_tables"][0] + contract.WHOLE_TABLE_SUFFIX]
    )
    assert {_where(tensor) for tensor in tensors} == {(contract.SHARED_WEIGHTS_FILE, "0", str(vocab * d_model * 4))}
    assert (export_dir / contract.SHARED_WEIGHTS_FILE).stat().st_size == vocab * d_model * 4
    assert manifest["files"][contract.SHARED_WEIGHTS_FILE] == sha256_of(export_dir / contract.SHARED_WEIGHTS_FILE)


def test_an_untied_export_stores_each_of_its_tables_once(exported):
    export_dir = exported("base").export_dir  # untied: encoder, decoder and LM-head tables all differ
    vocab = json.loads((export_dir / MANIFEST_FILE).read_text())["dims"]["vocab_size"]
    places = [_where(tensor) for tensor in _vocab_tensors(export_dir, vocab)]
    assert len(places) == len(set(places)) == 3
    assert {location for location, _, _ in places} == {contract.SHARED_WEIGHTS_FILE}


def test_the_encoder_and_decoder_sessions_read_one_buffer_of_the_shared_table(exported):
    """Both graphs' lookups read one buffer (the rows read so far), the LM head the file's mapping."""
    export_dir = exported("deep_decoder").export_dir
    model = Seq2SeqModel.load(export_dir)
    shared = model.sessions.shared_weights
    encoder = dict(shared.initializers(export_dir / contract.ENCODER_FILE))
    decoder = dict(shared.initializers(export_dir / contract.DECODER_FILE))
    (lm_head,) = [name for name in decoder if name.endswith(contract.WHOLE_TABLE_SUFFIX)]
    lookups = [*encoder.values(), *(value for name, value in decoder.items() if name != lm_head)]
    assert len(encoder) == 1 and len(decoder) == 2
    assert len({value.data_ptr() for value in lookups}) == 1
    assert decoder[lm_head].data_ptr() not in {value.data_ptr() for value in lookups}


def test_the_lookup_tables_are_read_by_token_lookups_only_and_every_lookup_reads_one(exported):
    """What the runtime may hold only some rows of (the manifest's lookup_tables) no other node reads."""
    for name in ("deep_decoder", "base"):  # tied, untied
        export_dir = exported(name).export_dir
        lookup_tables = set(json.loads((export_dir / MANIFEST_FILE).read_text())["lookup_tables"])
        readers = readers_by_table(export_dir)
        lookups = {table for table, nodes in readers.items() if ("Gather", 0, "input_ids") in nodes}
        assert lookup_tables == lookups
        for table in lookup_tables:
            assert readers[table] == {("Gather", 0, "input_ids")}


def test_a_call_reads_the_rows_it_looks_up_and_no_others(exported):
    export_dir = exported("deep_decoder").export_dir
    model = Seq2SeqModel.load(export_dir)
    sequences = model.generate(INPUT_IDS, num_beams=1, max_new_tokens=6)
    # the encoder looks up the inputs; the decoder every token it is fed: all but each row's last
    looked_up = set(INPUT_IDS.ravel()) | set(sequences[:, :-1].ravel())
    table = np.fromfile(export_dir / contract.SHARED_WEIGHTS_FILE, dtype=np.float32)
    vocab = json.loads((export_dir / MANIFEST_FILE).read_text())["dims"]["vocab_size"]
    table = table.reshape(vocab, -1)
    (value,) = [value for _, value in model.sessions.shared_weights.initializers(export_dir / contract.ENCODER_FILE)]
    held = value.numpy()
    read = {row for row in range(vocab) if held[row].any()}
    assert read == {row for row in looked_up if table[row].any()}  # the pad row is zeros in the file too
    np.testing.assert_array_equal(held[sorted(read)], table[sorted(read)])


def test_rows_read_as_needed_give_the_tokens_of_the_whole_table(exported, tmp_path):
    export_dir = exported("base").export_dir
    whole = rows_through_the_mapping(export_dir, tmp_path / "whole")
    for settings in (dict(num_beams=1, max_new_tokens=8), dict(num_beams=3, max_new_tokens=8)):
        expected = Seq2SeqModel.load(whole).generate(INPUT_IDS, **settings)
        np.testing.assert_array_equal(Seq2SeqModel.load(export_dir).generate(INPUT_IDS, **settings), expected)


def test_an_export_with_a_copy_of_the_table_in_each_graph_still_runs(exported, tmp_path):
    """Exports made before embeddings.data (ortseq 0.2 and early 0.3) keep the tables inside each graph."""
    export_dir = exported("deep_decoder").export_dir
    old = inline_shared_tables(export_dir, tmp_path / "old-export")

    settings = dict(num_beams=2, max_new_tokens=10)
    expected = Seq2SeqModel.load(export_dir).generate(INPUT_IDS, **settings)
    np.testing.assert_array_equal(Seq2SeqModel.load(old).generate(INPUT_IDS, **settings), expected)


def test_a_shared_file_shorter_than_its_graphs_say_is_refused_by_name(exported, tmp_path):
    export_dir = tmp_path / "truncated"
    shutil.copytree(exported("deep_decoder").export_dir, export_dir)
    shared = export_dir / contract.SHARED_WEIGHTS_FILE
    shared.write_bytes(shared.read_bytes()[:-4096])
    with pytest.raises(ManifestError, match=contract.SHARED_WEIGHTS_FILE):
        Seq2SeqModel.load(export_dir, verify=False)  # unverified: the sha256 would catch it first


def _resident_kb(path: Path) -> int:
    """This process's resident kB of the mappings of path (/proc/self/smaps; Linux)."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: address range, perms, ..., path
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1])
    return resident


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_the_shared_tables_pages_are_not_held_once_the_sessions_have_prepacked_them(exported, tmp_path):
    """onnxruntime reads the whole table to prepack the LM head and keeps its own packed copy: the mapped
    pages it read would be a second resident copy. The lookups then read rows copied out of the file,
    not the mapping; where they read the mapping (manifests without lookup_tables) they fault it in."""
    export_dir = exported("deep_decoder").export_dir
    shared = (export_dir / contract.SHARED_WEIGHTS_FILE).resolve()
    model = Seq2SeqModel.load(export_dir)
    assert _resident_kb(shared) == 0
    model.generate(INPUT_IDS[:1, :2], max_new_tokens=2)
    assert _resident_kb(shared) == 0
    del model

    whole = rows_through_the_mapping(export_dir, tmp_path / "whole")
    model = Seq2SeqModel.load(whole)
    mapped = (whole / contract.SHARED_WEIGHTS_FILE).resolve()
    assert _resident_kb(mapped) == 0
    model.generate(INPUT_IDS[:1, :2], max_new_tokens=2)
    assert 0 < _resident_kb(mapped) <= mapped.stat().st_size // 1024 + 4


_PREPACK_PEAK_SCRIPT = """
import sys
from pathlib import Path
from ortseq.runtime.sessions import create_session
from ortseq.runtime.shared_weights import SharedWeights

def status_mb(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

directory, released = Path(sys.argv[1]), sys.argv[2] == "released"
weights = SharedWeights(directory)
graph = directory / "lm_head.onnx"
initializers = weights.initializers(graph)
Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
before = status_mb("VmRSS")
if released:
    with weights.pages_released_while():
        session = create_session(graph, "cpu", 1, initializers)
else:
    session = create_session(graph, "cpu", 1, initializers)
    weights.release_pages()
print(status_mb("VmHWM") - before, status_mb("VmRSS") - before)
"""


def _lm_head_graph(directory: Path, rows: int = 32768, width: int = 512) -> int:
    """A graph whose only node is an LM head, Gemm(x, table, transB=1), the table (64 MiB) in the shared
    file as exports keep it; its size in MiB."""
    table = np.random.default_rng(0).standard_normal((rows, width), dtype=np.float32)
    (directory / contract.SHARED_WEIGHTS_FILE).write_bytes(table.tobytes())
    weight = onnx.TensorProto(name="table", data_type=onnx.TensorProto.FLOAT, dims=table.shape)
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", contract.SHARED_WEIGHTS_FILE), ("offset", "0"), ("length", str(table.nbytes))):
        weight.external_data.add(key=key, value=value)
    node = onnx.helper.make_node("Gemm", ["x", "table"], ["logits"], transB=1)
    graph = onnx.helper.make_graph(
        [node],
        "lm_head",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, width])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, rows])],
        [weight],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(directory / "lm_head.onnx"))
    return table.nbytes // 2**20


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the peak RSS from /proc (Linux)")
def test_the_tables_pages_are_released_while_the_lm_head_is_prepacked(tmp_path):
    """Prepacking reads the whole table while it writes its packed copy: pages released only at the end
    were all resident at once beside that copy, the table twice at the peak of loading. Released as the
    build goes, the peak is the packed copy and little more. Each way in a fresh process."""
    import subprocess
    import sys

    table_mb = _lm_head_graph(tmp_path)
    growth = {}
    for way in ("at_the_end", "released"):
        done = subprocess.run(
            [sys.executable, "-c", _PREPACK_PEAK_SCRIPT, str(tmp_path), way], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        growth[way] = [float(v) for v in done.stdout.split()]  # peak and kept growth over the build, MiB
    (peak_end, kept_end), (peak_released, kept_released) = growth["at_the_end"], growth["released"]
    assert kept_end > 0.75 * table_mb and kept_released > 0.75 * table_mb, growth  # the packed copy stays
    assert peak_end - kept_end > 0.75 * table_mb, growth  # the case discriminates: the mapped table was resident
    assert peak_released - kept_released < 0.5 * table_mb, growth
