"""The head of an ONNX graph (`read_onnx_graph`), and its weights read and written: as `graph` does for TorchScript.

From the graph's output we walk back through what only changes shape and at most one final sigmoid or softmax, to
`Gemm`, or `MatMul` + `Add`; that map's input is the feature tensor (see `starvation.checkpoints.graph`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from starvation.checkpoints.errors import CheckpointError, printable
from starvation.checkpoints.graph import (
    MAX_GRAPH_NODES,
    HeadSite,
    NoHead,
    output_form,
    shown_name,
    unreadable_is_no_head,
)

_ONNX_PASS = {"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Dropout"}
_ONNX_ACTIVATIONS = {"Sigmoid": "sigmoid", "Softmax": "softmax", "LogSoftmax": "softmax"}


@dataclass
class OnnxGraph:
    """The head of an ONNX graph: the site, and the tensor names the features and the logits are read from."""

    site: HeadSite
    features_tensor: str
    logits_tensor: str


def read_onnx_graph(graph) -> OnnxGraph:
    """The head of an ONNX graph; raises NoHead (or CheckpointError for a graph too large to walk)."""
    with unreadable_is_no_head():
        return _read_onnx_graph(graph)


def _read_onnx_graph(graph) -> OnnxGraph:
    import onnx

    if len(graph.node) > MAX_GRAPH_NODES:
        raise CheckpointError(
            "graph_too_large", f"The ONNX graph has {len(graph.node)} nodes; the limit is {MAX_GRAPH_NODES}."
        )
    producer = {}
    for node in graph.node:
        for out in node.output:
            if out in producer or out in {i.name for i in graph.input}:
                raise NoHead("a tensor of the ONNX graph is made twice")
            producer[out] = node
    initializers = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input} - set(initializers)
    if len(graph.output) < 1:
        raise NoHead("the ONNX graph has no output")
    tensor, activation, seen = graph.output[0].name, None, set()
    while True:
        node = producer.get(tensor)
        if node is None:
            break
        if set(node.output) & set(node.input):
            raise NoHead(f"the ONNX graph's {printable(node.op_type)} node feeds itself")
        if id(node) in seen:
            raise NoHead(f"the ONNX graph has a cycle through its {printable(node.op_type)} node")
        seen.add(id(node))
        if node.op_type in _ONNX_PASS:
            tensor = node.input[0]
        elif node.op_type in _ONNX_ACTIVATIONS and activation is None:
            activation, tensor = _ONNX_ACTIVATIONS[node.op_type], node.input[0]
        else:
            break
    logits_tensor = tensor
    node = producer.get(tensor)
    if node is None:
        raise NoHead("the ONNX graph's output is not made by any node (it is an input or a constant)")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    alpha = beta = 1.0
    features_transposed = False
    if node.op_type == "Gemm":
        alpha, beta = float(attributes.get("alpha", 1.0)), float(attributes.get("beta", 1.0))
        features_transposed = bool(attributes.get("transA", 0))
        features, weight_name = node.input[0], node.input[1]
        rows_are_outputs = bool(attributes.get("transB", 0))
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    elif node.op_type == "Add":
        product, bias_name = _onnx_matmul_side(node, producer)
        if product is None:
            raise NoHead("the ONNX graph's output is made by an Add of two tensors neither of which is a MatMul")
        features = product.input[0]
        weight_name, rows_are_outputs = _onnx_untranspose(product.input[1], producer)
    elif node.op_type == "MatMul":
        features, bias_name = node.input[0], None
        weight_name, rows_are_outputs = _onnx_untranspose(node.input[1], producer)
    else:
        raise NoHead(
            f"the ONNX graph's output is made by a {printable(node.op_type)} node, which is not a linear "
            "map (Gemm, or MatMul plus Add of a bias)"
        )
    if features in inputs:
        raise NoHead(
            f"the ONNX graph's {printable(node.op_type)} reads the model's input directly: there is no "
            "hidden representation to call features"
        )
    refusal = None
    if alpha == 0 or beta == 0:
        refusal = "the head's Gemm multiplies its weight or its bias by 0"
    uses = [name for n in graph.node for name in n.input]
    for what, name in (("weight", weight_name), ("bias", bias_name)):
        if name is None:
            refusal = refusal or "the head has no bias for a repair to write"
        elif name not in initializers:
            made_by = producer[name].op_type if name in producer else "a graph input"
            refusal = refusal or (
                f"the head's {what} is computed at run time (by {printable(made_by)}), not read from one initializer"
            )
        elif uses.count(name) > 1:
            refusal = refusal or f"the head's {what} ({shown_name(name)}) is read by another node too (tied)"
    weight = initializers.get(weight_name)
    rows = None
    if weight is not None and len(weight.dims) == 2:
        rows = int(weight.dims[0 if rows_are_outputs else 1])
    bias = initializers.get(bias_name) if bias_name else None
    if refusal is None and (rows is None or bias is None or int(np.prod(bias.dims, dtype=np.int64)) != rows):
        refusal = "the head's weight is not a matrix with one bias value per output"
    kinds = "MatMul + Add" if node.op_type == "Add" else node.op_type
    site = HeadSite(
        node=f"{kinds} ({node.name})" if node.name else kinds,
        features=features,
        output_form=output_form(rows, activation),
        weight=weight_name,
        bias=bias_name,
        weight_rows_are_outputs=rows_are_outputs,
        alpha=alpha,
        beta=beta,
        features_transposed=features_transposed,
        refusal=refusal,
    )
    return OnnxGraph(site, features, logits_tensor)


def onnx_weights(proto, found: OnnxGraph) -> tuple[np.ndarray, np.ndarray, dict]:
    """(weight [outputs, features], bias [outputs], {name: initializer}) of the head, in float64, scales folded."""
    from onnx import numpy_helper

    constants = {t.name: t for t in proto.graph.initializer if t.name in (found.site.weight, found.site.bias)}
    stored = numpy_helper.to_array(constants[found.site.weight]).astype(np.float64)
    weight = found.site.alpha * (stored if found.site.weight_rows_are_outputs else stored.T)
    bias = found.site.beta * numpy_helper.to_array(constants[found.site.bias]).astype(np.float64).reshape(-1)
    return weight, bias, constants


def write_onnx_weights(proto, found: OnnxGraph, weight: np.ndarray, bias: np.ndarray) -> None:
    """Write a new head into the initializers it was read from, in their dtype, shape and layout."""
    from onnx import numpy_helper

    _, _, constants = onnx_weights(proto, found)
    site = found.site
    stored_weight = weight / site.alpha if site.weight_rows_are_outputs else (weight / site.alpha).T
    for name, value in ((site.weight, stored_weight), (site.bias, bias / site.beta)):
        old = numpy_helper.to_array(constants[name])
        new = np.ascontiguousarray(np.asarray(value).reshape(old.shape).astype(old.dtype))
        constants[name].CopyFrom(numpy_helper.from_array(new, name))


def _onnx_matmul_side(node, producer):
    for mine, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        made = producer.get(mine)
        if made is not None and made.op_type == "MatMul":
            return made, other
    return None, None


def _onnx_untranspose(name: str, producer) -> tuple[str, bool]:
    """(the stored weight, whether its rows are the outputs): MatMul reads [features, outputs] unless the weight
    goes through a Transpose."""
    import onnx

    made = producer.get(name)
    if made is not None and made.op_type == "Transpose":
        perm = {a.name: onnx.helper.get_attribute_value(a) for a in made.attribute}.get("perm", [1, 0])
        if list(perm) == [1, 0]:
            return made.input[0], True
    return name, False
