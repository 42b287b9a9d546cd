"""search_step.onnx: the tensor part of a search step (graphs/contract.py documents its I/O).

Independent of the model family and of torch: a handful of standard ops written with onnx.helper, so
every export gets the same graph. The runtime binds the decoder step's logits to it where they lie
(runtime/search_step.py), and only the k best scores and ids per input come back to the host.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..graphs import contract
from .onnx_export import OPSET, save_proto


def search_step_model() -> onnx.ModelProto:
    """log_softmax (beam search) or raw logits (greedy), + the processors' bans, + running scores, top-k."""
    logits, log_probs, bias, ban_ids, ban_values, running, k = contract.SEARCH_STEP_INPUTS
    topk_scores, topk_ids = contract.SEARCH_STEP_OUTPUTS
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["rows", "vocab"])
    # one If, not two graphs: onnxruntime runs every node of a graph whatever outputs are asked for
    then_branch = helper.make_graph(
        [helper.make_node("LogSoftmax", [logits], ["log_softmax"], axis=-1)],
        "log_probs",
        [],
        [_renamed(scores, "log_softmax")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", [logits], ["raw"])], "raw_logits", [], [_renamed(scores, "raw")]
    )
    nodes = [
        helper.make_node("If", [log_probs], ["scores"], then_branch=then_branch, else_branch=else_branch),
        # the row-independent bans: + 0 keeps a score exactly, + -inf bans it (an Add: a Where took 4x as long)
        helper.make_node("Add", ["scores", bias], ["shared_banned"]),
        # each row's own bans (n-grams, bad words): -inf scattered into a zero bias; padding writes 0 (or
        # repeats one of the row's bans), so duplicate indices always write equal values
        helper.make_node("Shape", [logits], ["logits_shape"]),
        helper.make_node(
            "ConstantOfShape", ["logits_shape"], ["zeros"], value=helper.make_tensor("", TensorProto.FLOAT, [1], [0.0])
        ),
        helper.make_node("ScatterElements", ["zeros", ban_ids, ban_values], ["row_bias"], axis=1),
        helper.make_node("Add", ["shared_banned", "row_bias"], ["processed"]),
        helper.make_node("Reshape", [running, "column"], ["running_column"]),
        helper.make_node("Add", ["processed", "running_column"], ["totals"]),
        # [rows, vocab] -> [batch, beams * vocab]: an input's candidates over all of its beams
        helper.make_node("Shape", [running], ["running_shape"], end=1),
        helper.make_node("Concat", ["running_shape", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["totals", "flat_shape"], ["flat"]),
        helper.make_node("TopK", ["flat", k], [topk_scores, topk_ids], axis=1, largest=1, sorted=1),
    ]
    inputs = [
        helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["rows", "vocab"]),
        helper.make_tensor_value_info(log_probs, TensorProto.BOOL, []),
        helper.make_tensor_value_info(bias, TensorProto.FLOAT, [1, "vocab"]),
        helper.make_tensor_value_info(ban_ids, TensorProto.INT64, ["rows", "bans"]),
        helper.make_tensor_value_info(ban_values, TensorProto.FLOAT, ["rows", "bans"]),
        helper.make_tensor_value_info(running, TensorProto.FLOAT, ["batch", "beams"]),
        helper.make_tensor_value_info(k, TensorProto.INT64, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info(topk_scores, TensorProto.FLOAT, ["batch", "k"]),
        helper.make_tensor_value_info(topk_ids, TensorProto.INT64, ["batch", "k"]),
    ]
    constants = [
        helper.make_tensor("column", TensorProto.INT64, [2], [-1, 1]),
        helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1]),
    ]
    graph = helper.make_graph(nodes, "search_step", inputs, outputs, initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ortseq")
    model.ir_version = contract.IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _renamed(value_info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    renamed = onnx.ValueInfoProto()
    renamed.CopyFrom(value_info)
    renamed.name = name
    return renamed


def write_search_step(directory: Path) -> list[str]:
    """Write search_step.onnx into directory; returns the names of the files written."""
    return save_proto(search_step_model(), Path(directory) / contract.SEARCH_STEP_FILE, external_data=False)
