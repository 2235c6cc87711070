"""Built-in architectures. Each is `head(features(x))`: the audit hooks `features`, the penultimate layer."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from starvation import params as P
from starvation.errors import SpecError


class Network(nn.Module):
    """`features`: a Sequential ending at the last hidden layer; `head`: the Linear to the logits.

    Binary tasks have one output logit ([N, 1]); k classes have k.
    """

    def __init__(self, features: nn.Sequential, head: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _init_xavier(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases, as the paper's MLPs."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


class MLP:
    NAME: ClassVar[str] = "mlp"
    DESCRIPTION: ClassVar[str] = "flatten, then Linear+ReLU per hidden width, then a Linear head"
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "hidden": P.Param([300, 300], "hidden layer widths (the paper: [300, 300] Colored MNIST, [500] moons)",
                          P.list_of(P.positive_int)),
    }

    @staticmethod
    def build(params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> Network:
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for hidden in params["hidden"]:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        network = Network(nn.Sequential(*layers), nn.Linear(width, num_outputs))
        _init_xavier(network)
        return network


class CNN:
    NAME: ClassVar[str] = "cnn"
    DESCRIPTION: ClassVar[str] = "3x3 Conv+ReLU blocks (max-pool between), global average pool, a Linear head"
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "channels": P.Param([32, 64], "output channels of each 3x3 conv block", P.list_of(P.positive_int, min_length=1)),
    }

    @staticmethod
    def build(params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> Network:
        if len(input_shape) != 3:
            raise SpecError(f"arch 'cnn' needs image inputs [channels, height, width], got shape {list(input_shape)}")
        layers: list[nn.Module] = []
        width = input_shape[0]
        for index, channels in enumerate(params["channels"]):
            if index > 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            layers += [nn.Conv2d(width, channels, kernel_size=3, padding=1), nn.ReLU()]
            width = channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        network = Network(nn.Sequential(*layers), nn.Linear(width, num_outputs))
        _init_xavier(network)
        return network


ARCHS: dict[str, type] = {cls.NAME: cls for cls in (MLP, CNN)}


def arch_class(arch: str) -> type:
    try:
        return ARCHS[arch]
    except (KeyError, TypeError):
        raise SpecError(f"unknown arch {arch!r}; built-in architectures: {', '.join(sorted(ARCHS))}") from None


def resolve_arch_params(arch: str, params: dict[str, Any] | None) -> dict[str, Any]:
    return P.resolve(f"arch {arch!r}", arch_class(arch).PARAMS, params)


def build_network(arch: str, params: dict[str, Any] | None, input_shape: Sequence[int], num_outputs: int) -> Network:
    """A freshly initialised built-in network (seed torch's RNG first for a reproducible init)."""
    if num_outputs < 1:
        raise SpecError(f"num_outputs must be >= 1, got {num_outputs}")
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise SpecError(f"input_shape must be positive dimensions, got {list(input_shape)}")
    return arch_class(arch).build(resolve_arch_params(arch, params), input_shape, num_outputs)


def output_count(num_classes: int) -> int:
    """One logit for a binary task, one per class otherwise."""
    return 1 if num_classes == 2 else num_classes


def describe_all() -> list[dict]:
    return [{"arch": cls.NAME, "description": cls.DESCRIPTION, "params": P.describe(cls.PARAMS)} for cls in ARCHS.values()]
