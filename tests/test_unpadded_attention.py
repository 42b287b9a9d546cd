"""The encoder's attention: onnxruntime's MultiHeadAttention, without its mask when no input is padded
(exporter/unpadded_attention.py). The families' conformance suite runs both branches against transformers
(a padded batch, and a batch of rows of one length)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
from helpers import padded_batch

from ortseq.exporter.unpadded_attention import NO_PADDING, masked_nodes_back, skip_mask_when_unpadded
from ortseq.graphs import contract
from ortseq.runtime import Seq2SeqModel


def _encoder(export_dir) -> onnx.ModelProto:
    return onnx.load(str(export_dir / contract.ENCODER_FILE), load_external_data=False)


def _branches(node: onnx.NodeProto) -> tuple[onnx.GraphProto, onnx.GraphProto]:
    graphs = {attribute.name: attribute.g for attribute in node.attribute}
    return graphs["then_branch"], graphs["else_branch"]


def test_each_encoder_layer_attends_with_its_mask_only_when_an_input_is_padded(exported):
    export_dir = exported("odd_heads").export_dir
    model, layers = _encoder(export_dir), Seq2SeqModel.load(export_dir).manifest.dims.encoder_layers
    branches = [node for node in model.graph.node if node.op_type == "If"]
    assert len(branches) == layers
    for node in branches:
        assert list(node.input) == [NO_PADDING]
        unpadded, padded = _branches(node)
        assert [n.op_type for n in unpadded.node] == ["MultiHeadAttention"] == [n.op_type for n in padded.node]
        assert list(unpadded.node[0].input) == list(padded.node[0].input)[:3]  # q, k, v: no mask
        assert padded.node[0].input[4]  # the key padding mask
    assert "Softmax" not in {node.op_type for node in model.graph.node}  # no attention left in plain ops


def test_an_input_encodes_the_same_alone_as_padded_in_a_batch(exported):
    """Alone, the input has no padding (the branch without a mask: the flash kernel); in a batch whose
    other input is longer, it is padded (the masked branch). Its rows of every output agree."""
    model = Seq2SeqModel.load(exported("odd_heads").export_dir)
    names = contract.encoder_outputs(model.manifest.dims.decoder_layers)
    ids, mask = padded_batch(model.manifest, [9, 23], seed=3)
    assert mask[0].sum() == 9 and mask[1].all()
    alone = model.sessions.run_encoder(names, ids[:1, :9], mask[:1, :9])
    batched = model.sessions.run_encoder(names, ids, mask)
    for name, one, both in zip(names, alone, batched):
        if name == "last_hidden_state":
            np.testing.assert_allclose(one[0], both[0, :9], rtol=1e-4, atol=1e-4, err_msg=name)
        elif name != "encoder_attention_mask":  # cross K/V [batch, heads, src, head_dim]
            np.testing.assert_allclose(one[0], both[0, :, :9], rtol=1e-4, atol=1e-4, err_msg=name)


def test_masked_nodes_back_undoes_the_branching(exported):
    branched = _encoder(exported("odd_heads").export_dir)
    plain = copy.deepcopy(branched)
    assert masked_nodes_back(plain)
    assert "If" not in {node.op_type for node in plain.graph.node}
    assert NO_PADDING not in {name for node in plain.graph.node for name in node.output}
    again = copy.deepcopy(plain)
    assert skip_mask_when_unpadded(again) == len([node for node in branched.graph.node if node.op_type == "If"])
    assert again.graph == branched.graph
