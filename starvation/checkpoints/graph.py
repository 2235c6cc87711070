"""Where a foreign model's head and features are, read from its graph rather than its attribute names.

From the graph's output we walk back through what only changes shape (or is the identity at inference) and at
most one final sigmoid or softmax, to the linear map that makes the logits: `aten::linear`, `aten::addmm`, or
`aten::matmul`/`aten::mm` plus `aten::add` of a bias in TorchScript's inlined `forward`; `Gemm` or `MatMul` +
`Add` in ONNX. That map's input is the feature tensor. Its weight and bias are where a repair writes: each must
be one module attribute (a `GetAttr` chain from the model) or one initializer, read by that map alone. A head
that breaks this still gives the features (`HeadSite.refusal` says why it cannot be rewritten).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from starvation.checkpoints.errors import CheckpointError, printable

MAX_GRAPH_NODES = 50_000  # far above any classifier we audit; a bigger graph is refused before it is walked

_SCRIPT_PASS = {  # one tensor in, the same values out (in another shape) at inference
    "aten::reshape",
    "aten::view",
    "aten::flatten",
    "aten::squeeze",
    "aten::unsqueeze",
    "aten::contiguous",
    "aten::dropout",
    "aten::feature_dropout",
    "aten::alpha_dropout",
    "aten::clone",
    "aten::detach",
    "aten::to",
    "aten::type_as",
}
_SCRIPT_ACTIVATIONS = {"aten::sigmoid": "sigmoid", "aten::softmax": "softmax", "aten::log_softmax": "softmax"}
_SCRIPT_TRANSPOSES = {"aten::t", "aten::numpy_T", "aten::transpose", "aten::permute"}


@dataclass(frozen=True)
class HeadSite:
    """The head a graph reading found: which node, which tensor holds the features, the output form, and where
    its weight and bias live (attribute paths or initializer names). `weight_rows_are_outputs` is False where
    the weight is stored [features, outputs] (e.g. `x @ self.w`). `refusal` says why a repair cannot rewrite
    it (tied, computed at run time, no bias); the features can be read all the same."""

    node: str
    features: str
    output_form: str
    weight: str | None
    bias: str | None
    weight_rows_are_outputs: bool = True
    alpha: float = 1.0  # ONNX Gemm: logits = alpha * features @ W' + beta * bias
    beta: float = 1.0
    features_transposed: bool = False  # ONNX Gemm with transA: the features tensor is [d, N]
    refusal: str | None = None

    def describe(self) -> dict:
        """What a report shows of the head (names as printable text)."""
        return {
            "node": shown_name(self.node),
            "features": shown_name(self.features),
            "output_form": self.output_form,
            "weight": shown_name(self.weight),
            "bias": shown_name(self.bias),
            "repairable": self.refusal is None,
            "not_repairable_because": self.refusal,
        }


class NoHead(Exception):
    """No linear map makes the output; the message names the op that does and why it is not a head."""


# --------------------------------------------------------------------------------------------
# TorchScript
# --------------------------------------------------------------------------------------------


@dataclass
class ScriptGraph:
    """A TorchScript model's inlined `forward` graph and the head found in it, with the features function
    (and, behind a final sigmoid or softmax, the logits function) cut out of it."""

    site: HeadSite
    features_fn: Callable[..., torch.Tensor]  # a ScriptFunction taking (module._c, x)
    logits_fn: Callable[..., torch.Tensor] | None  # None: the model's output are its logits


def read_script_graph(module: torch.jit.ScriptModule) -> ScriptGraph:
    """The head of a TorchScript model and its features function; raises NoHead (or CheckpointError for a graph
    too large to walk)."""
    with unreadable_is_no_head():
        return _read_script_graph(module)


def _read_script_graph(module: torch.jit.ScriptModule) -> ScriptGraph:
    graph = module.forward.graph.copy()  # type: ignore[attr-defined]  # a ScriptMethod; torch types it a Callable
    torch._C._jit_pass_inline(graph)
    nodes = list(graph.nodes())
    if len(nodes) > MAX_GRAPH_NODES:
        raise CheckpointError(
            "graph_too_large", f"The model's forward graph has {len(nodes)} nodes; the limit is {MAX_GRAPH_NODES}."
        )
    outputs = list(graph.outputs())
    if len(outputs) != 1 or not _is_tensor(outputs[0]):
        raise NoHead("the model's forward does not return one tensor")
    value, activation = _script_walk(outputs[0], len(nodes))
    logits_value = value
    node = value.node()
    kind = node.kind()
    weight_value = bias_value = None
    rows_are_outputs = True
    if kind == "aten::linear":
        features, weight_value, bias_value = node.inputsAt(0), node.inputsAt(1), node.inputsAt(2)
    elif kind == "aten::addmm":
        if not (_constant(node.inputsAt(3)) == 1 and _constant(node.inputsAt(4)) == 1):
            raise NoHead("the output is made by aten::addmm with a beta or alpha other than 1")
        bias_value, features = node.inputsAt(0), node.inputsAt(1)
        weight_value, rows_are_outputs = _script_untranspose(node.inputsAt(2))
    elif kind == "aten::add" and _constant(node.inputsAt(2)) == 1:
        product, bias_value = _matmul_side(node.inputsAt(0), node.inputsAt(1))
        if product is None:
            raise NoHead("the output is made by aten::add of two tensors neither of which is a matrix product")
        features = product.node().inputsAt(0)
        weight_value, rows_are_outputs = _script_untranspose(product.node().inputsAt(1))
    elif kind in ("aten::matmul", "aten::mm"):
        features = node.inputsAt(0)
        weight_value, rows_are_outputs = _script_untranspose(node.inputsAt(1))
    else:
        raise NoHead(
            f"the output is made by {printable(kind)}, which is not a linear map (aten::linear, "
            "aten::addmm, or aten::matmul/aten::mm plus aten::add of a bias)"
        )
    if features.node().kind() == "prim::Param":
        raise NoHead(
            f"the output's {printable(kind)} reads the model's input directly: there is no hidden "
            "representation to call features"
        )
    weight, weight_why = _script_attribute(module, graph, weight_value, "weight")
    bias, bias_why = (
        (None, "the head has no bias for a repair to write")
        if _constant_none(bias_value)
        else _script_attribute(module, graph, bias_value, "bias")
    )
    refusal = weight_why or bias_why or _script_shared(module, graph, weight, bias)
    outputs_count = _rows(module, weight, rows_are_outputs)
    head_name = _script_node_name(kind, weight)
    site = HeadSite(
        node=head_name,
        features=_layer_name(features, node, head_name),
        output_form=output_form(outputs_count, activation),
        weight=weight,
        bias=bias,
        weight_rows_are_outputs=rows_are_outputs,
        refusal=refusal,
    )
    index = _value_index(graph)
    return ScriptGraph(
        site,
        _script_cut(graph, index[features.unique()]),
        _script_cut(graph, index[logits_value.unique()]) if activation else None,
    )


def script_weights(module: torch.nn.Module, site: HeadSite) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's weight as [outputs, features] and its bias [outputs], as stored (same tensors, same dtype)."""
    weight, bias = _get_path(module, site.weight), _get_path(module, site.bias)
    return (weight if site.weight_rows_are_outputs else weight.T), bias


def write_script_weights(module: torch.nn.Module, site: HeadSite, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a new head into the attributes it was read from, in their dtype and layout."""
    old_weight, old_bias = _get_path(module, site.weight), _get_path(module, site.bias)
    with torch.no_grad():
        old_weight.copy_((weight if site.weight_rows_are_outputs else weight.T).to(old_weight.dtype))
        old_bias.copy_(bias.reshape(old_bias.shape).to(old_bias.dtype))


def _script_walk(value, budget: int):
    """From the output back through shape-only ops and one final sigmoid/softmax: (the logits value, the
    activation or None)."""
    activation = None
    for _ in range(budget + 1):
        kind = value.node().kind()
        if kind in _SCRIPT_PASS:
            value = value.node().inputsAt(0)
        elif kind in _SCRIPT_ACTIVATIONS and activation is None:
            activation, value = _SCRIPT_ACTIVATIONS[kind], value.node().inputsAt(0)
        else:
            return value, activation
    raise NoHead("the walk back from the output did not end")


def _matmul_side(a, b):
    """(the matrix product, the other addend) of an aten::add, or (None, None)."""
    for product, other in ((a, b), (b, a)):
        if product.node().kind() in ("aten::matmul", "aten::mm"):
            return product, other
    return None, None


def _script_untranspose(value):
    """(the stored weight, whether its rows are the outputs): `x @ w.t()` reads w as [outputs, features]."""
    node = value.node()
    kind = node.kind()
    if kind in ("aten::t", "aten::numpy_T"):
        return node.inputsAt(0), True
    if kind == "aten::transpose" and sorted(_constant(node.inputsAt(i)) for i in (1, 2)) in ([0, 1], [-2, -1]):
        return node.inputsAt(0), True
    if kind == "aten::permute" and _constant(node.inputsAt(1)) == [1, 0]:
        return node.inputsAt(0), True
    return value, False


def _script_attribute(module, graph, value, what: str) -> tuple[str | None, str | None]:
    """(attribute path, None) where `value` is a GetAttr chain from the model to a tensor, else (None, why)."""
    names = []
    node = value.node()
    while node.kind() == "prim::GetAttr":
        names.append(node.s("name"))
        parent = node.inputsAt(0)
        if parent.node().kind() == "prim::Param":
            if parent.unique() != next(graph.inputs()).unique():
                break
            path = ".".join(reversed(names))
            tensor = _get_path(module, path)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                return None, f"the head's {what} ({shown_name(path)}) is not a floating-point tensor"
            return path, None
        node = parent.node()
    made_by = printable(node.kind())
    source = "from the model's input" if _reads_input(graph, value) else "at run time"
    return None, f"the head's {what} is computed {source} (by {made_by}), not read from one parameter"


def _script_shared(module, graph, weight: str | None, bias: str | None) -> str | None:
    """Why the head's weight or bias is not the head's alone (tied): another GetAttr reads the same attribute, or
    another parameter or buffer shares its storage."""
    if weight is None or bias is None:
        return None
    reads: dict[str, int] = {}
    for node in graph.nodes():
        if node.kind() == "prim::GetAttr" and _is_tensor(node.output()):
            path = _getattr_path(graph, node)
            if path is not None:
                reads[path] = reads.get(path, 0) + 1
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(dict(module.named_buffers(remove_duplicate=False)))
    for what, path in (("weight", weight), ("bias", bias)):
        if reads.get(path, 0) > 1:
            return f"the head's {what} ({shown_name(path)}) is read by another node of the graph too (tied)"
        tensor = _get_path(module, path)
        twins = [
            name
            for name, other in tensors.items()
            if name != path
            and other.numel()
            and other.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        ]
        if twins:
            return f"the head's {what} ({shown_name(path)}) shares its storage with {shown_name(twins[0])} (tied)"
    return None


def _getattr_path(graph, node) -> str | None:
    names = []
    while node.kind() == "prim::GetAttr":
        names.append(node.s("name"))
        parent = node.inputsAt(0)
        if parent.node().kind() == "prim::Param":
            return ".".join(reversed(names)) if parent.unique() == next(graph.inputs()).unique() else None
        node = parent.node()
    return None


def _reads_input(graph, value) -> bool:
    """Whether `value` depends on the model's input tensor (bounded by the graph's size)."""
    inputs = {i.unique() for i in list(graph.inputs())[1:]}
    seen, todo = set(), [value]
    while todo:
        current = todo.pop()
        if current.unique() in inputs:
            return True
        if current.unique() in seen:
            continue
        seen.add(current.unique())
        todo.extend(current.node().inputs())
    return False


def _script_cut(graph, index: int):
    """A function whose output is the graph's `index`-th value (graph surgery on a copy)."""
    cut = graph.copy()
    value = _values(cut)[index]
    while len(list(cut.outputs())):
        cut.eraseOutput(0)
    cut.registerOutput(value)
    torch._C._jit_pass_dce(cut)
    return torch._C._create_function_from_graph("gs_cut", cut)


def _layer_name(features, head, head_name: str) -> str:
    """The submodule whose output the features are, below what it shares with the head (`features` beside `head`,
    `head.drop` before `head.fc`); where the model's own `forward` made them, 'input of' the head's op."""
    made_in, head_in = _module_path(features.node()), _module_path(head)
    shared = 0
    while shared < min(len(made_in), len(head_in)) and made_in[shared] == head_in[shared]:
        shared += 1
    return ".".join(made_in[: shared + 1]) if len(made_in) > shared else f"input of {head_name}"


def _module_path(node) -> list[str]:
    """The submodule names a node was inlined from: 'features(Sequential).2(ReLU)' is ['features', '2']."""
    names = re.findall(r"(\w+)\([^()]*\)", node.getModuleHierarchy() or "")
    return [name for name in names if name not in ("UNKNOWN_INSTANCE", "SELF")]


def _values(graph) -> list:
    return [*graph.inputs(), *(v for node in graph.nodes() for v in node.outputs())]


def _value_index(graph) -> dict:
    return {v.unique(): i for i, v in enumerate(_values(graph))}


def _rows(module, weight: str | None, rows_are_outputs: bool) -> int | None:
    tensor = _get_path(module, weight) if weight else None
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        return None
    return int(tensor.shape[0 if rows_are_outputs else 1])


def _script_node_name(kind: str, weight: str | None) -> str:
    """The head's op, and the module it belongs to (or the attribute it reads), e.g. `aten::linear (fc)`."""
    kinds = {"aten::add": "aten::matmul + aten::add"}.get(kind, kind)
    owner = weight.rsplit(".", 1)[0] if weight and "." in weight else weight
    return f"{kinds} ({owner})" if owner else kinds


def _get_path(module, path: str | None):
    target = module
    for name in (path or "").split("."):
        target = getattr(target, name, None)
        if target is None:
            return None
    return target


def _is_tensor(value) -> bool:
    return isinstance(value.type(), torch._C.TensorType)


def _constant(value):
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else None


def _constant_none(value) -> bool:
    """No bias: none given to the op (`aten::matmul` alone), or a `None` constant (`F.linear(x, w)`)."""
    return value is None or value.node().kind() == "prim::Constant" and isinstance(value.type(), torch._C.NoneType)


# --------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def unreadable_is_no_head():
    """A graph this reading does not understand is a model without a known head, not a broken upload: it still
    runs, and its audit says why there are no features."""
    try:
        yield
    except (NoHead, CheckpointError):
        raise
    except Exception as exc:  # whatever a strange graph makes torch's or onnx's graph API raise
        raise NoHead(f"its graph could not be read ({printable(type(exc).__name__)})") from None


def shown_name(name: str | None) -> str | None:
    """A name from the model as a report shows it: printable and short (the model chose it)."""
    return None if name is None else re.sub(r"[^\x20-\x7e]", "?", name)[:120]


def output_form(outputs: int | None, activation: str | None) -> str:
    """What the model outputs, in words: one logit, two-class logits, K-class logits, or probabilities."""
    logits = {None: "logits", 1: "one logit", 2: "two-class logits"}.get(outputs, f"{outputs}-class logits")
    if activation == "sigmoid":
        return f"sigmoid probability of {logits}"
    if activation == "softmax":
        return f"softmax probabilities of {logits}"
    return logits
