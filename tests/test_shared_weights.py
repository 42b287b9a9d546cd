"""Each weight stored once: the token embeddings live in embeddings.data, read by both graphs, loaded once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import inline_shared_tables

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
    assert len(tensors) == 2  # the encoder's table and the decoder's (read by its Gather and its LM head)
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
    export_dir = exported("deep_decoder").export_dir
    model = Seq2SeqModel.load(export_dir)
    shared = model.sessions.shared_weights
    encoder = shared.initializers(export_dir / contract.ENCODER_FILE)
    decoder = shared.initializers(export_dir / contract.DECODER_FILE)
    addresses = {value.data_ptr() for _, value in encoder + decoder}
    assert len(encoder) == 1 and len(decoder) == 1 and len(addresses) == 1


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
def test_the_shared_tables_pages_are_not_held_once_the_sessions_have_prepacked_them(exported):
    """onnxruntime reads the whole table to prepack the LM head and keeps its own packed copy: the mapped
    pages it read would be a second resident copy. A lookup faults back only the rows it reads."""
    export_dir = exported("deep_decoder").export_dir
    model = Seq2SeqModel.load(export_dir)
    shared = (export_dir / contract.SHARED_WEIGHTS_FILE).resolve()
    assert _resident_kb(shared) == 0
    model.generate(INPUT_IDS[:1, :2], max_new_tokens=2)
    assert 0 < _resident_kb(shared) <= shared.stat().st_size // 1024 + 4
