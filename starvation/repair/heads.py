"""The head of a network: the last linear layer, whose input is the penultimate representation.

A repair replaces only this layer's weight and bias, so the repaired model is the original
network (TorchScript code or ONNX graph included) with new head weights. The head is found the
same way the audit finds the feature layer (`starvation.checkpoints.wrap`): a top-level `head`
beside the feature layer, or the last child of an `nn.Sequential`; in an ONNX graph, the Gemm
node that makes the output.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from starvation.errors import SpecError


class NoLinearHead(SpecError):
    """The model has no last linear layer that a repair could replace."""


@dataclass
class LinearHead:
    """logits = features @ weight.T + bias; weight [k, d] (k = 1 for a binary model), bias [k]."""

    weight: torch.Tensor
    bias: torch.Tensor

    @property
    def num_outputs(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight.dtype) @ self.weight.T + self.bias

    def to_dtype(self, dtype: torch.dtype) -> "LinearHead":
        return LinearHead(self.weight.to(dtype), self.bias.to(dtype))


def find_linear_head(module: nn.Module) -> nn.Module:
    """The submodule holding the last linear layer: `module.head`, or the last child of a
    Sequential. Raises NoLinearHead when neither is a linear layer with a bias."""
    children = dict(module.named_children())
    candidate = children.get("head")
    is_sequential = isinstance(module, nn.Sequential) or getattr(module, "original_name", "") == "Sequential"
    if candidate is None and is_sequential and children:
        candidate = list(children.values())[-1]
    if candidate is None:
        raise NoLinearHead(
            "the model has no top-level 'head' and is not an nn.Sequential, so its last linear layer "
            "cannot be found"
        )
    weight, bias = getattr(candidate, "weight", None), getattr(candidate, "bias", None)
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point()):
        raise NoLinearHead("the model's last layer is not a linear layer (no 2-D floating-point weight)")
    if not (isinstance(bias, torch.Tensor) and bias.shape == (weight.shape[0],)):
        raise NoLinearHead("the model's last linear layer has no bias of one value per output")
    return candidate


def read_head(module: nn.Module) -> LinearHead:
    head = find_linear_head(module)
    return LinearHead(head.weight.detach().clone().float(), head.bias.detach().clone().float())


def replace_head(module: nn.Module, new: LinearHead) -> None:
    """Overwrite the head's weight and bias in place; the shapes must be the old ones."""
    head = find_linear_head(module)
    _check_new_head(LinearHead(head.weight, head.bias), new)
    with torch.no_grad():
        head.weight.copy_(new.weight.to(head.weight.dtype))
        head.bias.copy_(new.bias.to(head.bias.dtype))


def _check_new_head(old: LinearHead, new: LinearHead) -> None:
    if tuple(new.weight.shape) != tuple(old.weight.shape) or tuple(new.bias.shape) != tuple(old.bias.shape):
        raise SpecError(f"the new head is {list(new.weight.shape)} but the model's is {list(old.weight.shape)}")
    if not (torch.isfinite(new.weight).all() and torch.isfinite(new.bias).all()):
        raise SpecError("the new head has non-finite values")


def read_onnx_head(proto) -> LinearHead:
    """The head of an ONNX graph (`starvation.checkpoints.wrap.onnx_head`) as weight [k, d] and bias [k]."""
    return _head_of(*_onnx_head(proto))


def _head_of(node, alpha: float, beta: float, trans_b: bool, constants: dict) -> LinearHead:
    from onnx import numpy_helper

    b, c = (numpy_helper.to_array(constants[name]).astype(np.float64) for name in node.input[1:3])
    weight = alpha * (b if trans_b else b.T)
    if c.size not in (1, weight.shape[0]):
        raise NoLinearHead(f"the ONNX graph's last Gemm adds a bias of shape {list(c.shape)} to {weight.shape[0]} "
                           "outputs: not one value per output")
    bias = beta * np.broadcast_to(c.reshape(-1), (weight.shape[0],))
    return LinearHead(torch.from_numpy(weight).float(), torch.from_numpy(bias.copy()).float())


def replace_onnx_head(proto, new: LinearHead) -> bytes:
    """The ONNX graph with its head's constants replaced (nothing else), serialised; `proto` is changed too."""
    from onnx import numpy_helper

    node, alpha, beta, trans_b, constants = head = _onnx_head(proto)
    _check_new_head(_head_of(*head), new)
    weight, bias = new.weight.double().numpy() / alpha, new.bias.double().numpy() / beta
    for name, value in ((node.input[1], weight if trans_b else weight.T), (node.input[2], bias)):
        dtype = numpy_helper.to_array(constants[name]).dtype
        constants[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), name))
    return proto.SerializeToString()


def _onnx_head(proto):
    """(Gemm node, alpha, beta, transB, {name: initializer}) of the graph's head; its constants used by it alone."""
    import onnx

    from starvation.checkpoints.wrap import onnx_head

    node, reason = onnx_head(proto.graph)
    if node is None:
        raise NoLinearHead(reason)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    alpha, beta = float(attributes.get("alpha", 1.0)), float(attributes.get("beta", 1.0))
    if alpha == 0 or beta == 0:
        raise NoLinearHead("the ONNX graph's last Gemm multiplies its weight or its bias by 0")
    uses = [name for n in proto.graph.node for name in n.input]
    if uses.count(node.input[1]) > 1 or uses.count(node.input[2]) > 1:
        raise NoLinearHead("the ONNX graph's head shares its weight or bias with another node")
    constants = {t.name: t for t in proto.graph.initializer if t.name in node.input[1:3]}
    return node, alpha, beta, bool(attributes.get("transB", 0)), constants


def torchscript_bytes(module: torch.jit.ScriptModule) -> bytes:
    """A TorchScript module serialised in memory (the jail's child cannot open files)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; it is the format users gave us
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(module, buffer)
    return buffer.getvalue()


def check_head_feeds_output(head: LinearHead, features: torch.Tensor, logits: torch.Tensor) -> float:
    """The largest gap between the model's logits and head(features); raises NoLinearHead when
    the head is not what turns the feature layer into the output."""
    if features.shape[1] != head.num_features or logits.shape[1] != head.num_outputs:
        raise NoLinearHead(
            f"the feature layer has {features.shape[1]} values and the output {logits.shape[1]}, but the last "
            f"linear layer maps {head.num_features} to {head.num_outputs}: it does not read the feature layer"
        )
    expected = head.to_dtype(torch.float64).logits(features.double())
    gap = float((expected - logits.double()).abs().max()) if len(logits) else 0.0
    scale = float(logits.float().abs().max()) if len(logits) else 0.0
    if gap > 1e-3 * max(1.0, scale):
        raise NoLinearHead(
            "the model's output is not the last linear layer applied to the feature layer (something "
            "runs between them), so replacing that layer would not repair the model as fitted"
        )
    return gap
