"""The head of a network: the last linear layer, whose input is the penultimate representation.

A repair replaces only this layer's weight and bias, so the repaired model is the original
network (TorchScript code or ONNX graph included) with new head weights. Our own networks keep
it at a top-level `head` (or as the last child of an `nn.Sequential`); in a foreign model it is
the linear map the graph reading found (`starvation.checkpoints.graph`), written back into the
same attributes or initializers.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from starvation.checkpoints import graph, onnx_graph
from starvation.errors import SpecError


class NoLinearHead(SpecError):
    """The model has no last linear layer that a repair could replace."""

    code = "no_linear_head"

    @property
    def message(self) -> str:
        return f"The model cannot be repaired: {self}."


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

    def to_dtype(self, dtype: torch.dtype) -> LinearHead:
        return LinearHead(self.weight.to(dtype), self.bias.to(dtype))


def find_linear_head(module: nn.Module) -> LinearHead:
    """The last linear layer's own weight and bias (written in place, they change the model): those of
    `module.head`, or of the last child of a Sequential. Raises NoLinearHead when neither is a linear layer with a
    bias."""
    children = dict(module.named_children())
    candidate = children.get("head")
    is_sequential = isinstance(module, nn.Sequential) or getattr(module, "original_name", "") == "Sequential"
    if candidate is None and is_sequential and children:
        candidate = list(children.values())[-1]
    if candidate is None:
        raise NoLinearHead(
            "the model has no top-level 'head' and is not an nn.Sequential, so its last linear layer cannot be found"
        )
    weight, bias = getattr(candidate, "weight", None), getattr(candidate, "bias", None)
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point()):
        raise NoLinearHead("the model's last layer is not a linear layer (no 2-D floating-point weight)")
    if not (isinstance(bias, torch.Tensor) and bias.shape == (weight.shape[0],)):
        raise NoLinearHead("the model's last linear layer has no bias of one value per output")
    return LinearHead(weight, bias)


def read_head(module: nn.Module) -> LinearHead:
    head = find_linear_head(module)
    return LinearHead(head.weight.detach().clone().float(), head.bias.detach().clone().float())


def replace_head(module: nn.Module, new: LinearHead) -> None:
    """Overwrite the head's weight and bias in place; the shapes must be the old ones."""
    head = find_linear_head(module)
    _check_new_head(head, new)
    with torch.no_grad():
        head.weight.copy_(new.weight.to(head.weight.dtype))
        head.bias.copy_(new.bias.to(head.bias.dtype))


def _check_new_head(old: LinearHead, new: LinearHead) -> None:
    if tuple(new.weight.shape) != tuple(old.weight.shape) or tuple(new.bias.shape) != tuple(old.bias.shape):
        raise SpecError(f"the new head is {list(new.weight.shape)} but the model's is {list(old.weight.shape)}")
    if not (torch.isfinite(new.weight).all() and torch.isfinite(new.bias).all()):
        raise SpecError("the new head has non-finite values")


def read_model_head(model) -> LinearHead:
    """The head a graph reading found in a loaded TorchScript or ONNX model (`model.head_site`), as weight [k, d] and
    bias [k]; raises NoLinearHead where there is none, or where it cannot be rewritten (tied, computed at run time)."""
    site = _repairable_site(model)
    if model.format == "onnx":
        onnx_weight, onnx_bias, _ = onnx_graph.onnx_weights(model.proto, model.found)
        head = LinearHead(torch.from_numpy(onnx_weight).float(), torch.from_numpy(onnx_bias.copy()).float())
    else:
        weight, bias = graph.script_weights(model.module, site)
        head = LinearHead(weight.detach().clone().float(), bias.detach().clone().float().reshape(-1))
    if head.weight.dim() != 2 or head.bias.shape != (head.weight.shape[0],):
        raise NoLinearHead(f"the head ({site.node}) does not have one bias value per output")
    return head


def replace_model_head(model, new: LinearHead) -> bytes:
    """The model's file with its head's weight and bias written where they were read (same attributes or
    initializers, same dtype, nothing else changed), serialised; the loaded model is changed too."""
    _check_new_head(read_model_head(model), new)
    if model.format == "onnx":
        onnx_graph.write_onnx_weights(model.proto, model.found, new.weight.double().numpy(), new.bias.double().numpy())
        return model.proto.SerializeToString()
    graph.write_script_weights(model.module, model.head_site, new.weight, new.bias)
    return torchscript_bytes(model.module)


def finetune_hint(fmt: str) -> str:
    """What to try where a head cannot be refitted: a TorchScript model can be fine-tuned whole in its jail."""
    return "; finetune_sd retrains a TorchScript model's whole network instead" if fmt == "torchscript" else ""


def _repairable_site(model) -> graph.HeadSite:
    site = getattr(model, "head_site", None)
    instead = finetune_hint(model.format)
    if site is None:
        reason = getattr(model, "no_features_reason", None) or "no linear head was found in the model"
        raise NoLinearHead(f"{reason}{instead}")
    if site.refusal is not None:
        raise NoLinearHead(f"{site.refusal}: the head ({site.node}) cannot be rewritten{instead}")
    return site


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
