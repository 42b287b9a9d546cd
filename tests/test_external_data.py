"""graphs/external_data.py finds the external-data file of every tensor a graph holds, those inside the
bodies of If, Loop and other graph-valued attributes included: onnxruntime opens them all."""

from __future__ import annotations

from pathlib import Path

from onnx import GraphProto, TensorProto, helper

from ortseq.graphs.external_data import external_data_files


def external_tensor(name: str, location: str) -> TensorProto:
    """A float tensor of 2 values whose bytes are in `location` (only the reference is written)."""
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [2], [0.0, 0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "8"}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def body(name: str, location: str, nodes: tuple = ()) -> GraphProto:
    """A subgraph with one initializer in `location`, returning it (after `nodes`)."""
    output = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2])
    identity = helper.make_node("Identity", [f"{name}_w"], [f"{name}_out"])
    return helper.make_graph([*nodes, identity], name, [], [output], [external_tensor(f"{name}_w", location)])


def write_graph_with_nested_data(path: Path) -> Path:
    """Tensors in six places: the top graph, If's two branches (one a Constant's value), a Loop body, an
    If nested in that body, and a custom op's `graphs` attribute (a list of graphs)."""
    constant = helper.make_node("Constant", [], ["else_out"], value=external_tensor("else_value", "else.bin"))
    else_branch = helper.make_graph(
        [constant], "else", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2])]
    )
    nested_if = helper.make_node(
        "If", ["cond"], ["nested_out"], then_branch=body("nested", "nested.bin"), else_branch=body("n2", "nested.bin")
    )
    loop_body = body("loop", "loop.bin", nodes=(nested_if,))
    nodes = [
        helper.make_node("If", ["cond"], ["if_out"], then_branch=body("then", "then.bin"), else_branch=else_branch),
        helper.make_node("Loop", ["", "cond"], ["loop_out"], body=loop_body),
        helper.make_node("Branches", ["cond"], ["custom_out"], domain="test", branches=[body("listed", "listed.bin")]),
    ]
    graph = helper.make_graph(
        nodes,
        "top",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("if_out", TensorProto.FLOAT, [2])],
        [external_tensor("top_w", "top.bin")],
    )
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


def test_locations_inside_if_and_loop_bodies_are_found(tmp_path):
    graph = write_graph_with_nested_data(tmp_path / "model.onnx")
    assert external_data_files(graph) == {"top.bin", "then.bin", "else.bin", "loop.bin", "nested.bin", "listed.bin"}
