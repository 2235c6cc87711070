"""The head of a network: the last linear layer, whose input is the penultimate representation.

A repair replaces only this layer's weight and bias, so the repaired model is the original
network (TorchScript code included) with new head weights. The head is found the same way the
audit finds the feature layer (`starvation.checkpoints.wrap`): a top-level `head` beside the
feature layer, or the last child of an `nn.Sequential`.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

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
    if tuple(new.weight.shape) != tuple(head.weight.shape) or tuple(new.bias.shape) != tuple(head.bias.shape):
        raise SpecError(
            f"the new head is {list(new.weight.shape)} but the model's is {list(head.weight.shape)}"
        )
    if not (torch.isfinite(new.weight).all() and torch.isfinite(new.bias).all()):
        raise SpecError("the new head has non-finite values")
    with torch.no_grad():
        head.weight.copy_(new.weight.to(head.weight.dtype))
        head.bias.copy_(new.bias.to(head.bias.dtype))


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
