"""Built-in architectures. Each is `head(features(x))`: the audit hooks `features`, the penultimate layer."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from starvation import params as P
from starvation.errors import SpecError

# Bounds on every architecture parameter, the same for a train spec and for uploaded weights (`check_arch_params`):
# a width or a depth is a memory size, and an unbounded one lets a 100-byte request allocate gigabytes.
MAX_WIDTH = 16_384  # units of one MLP hidden layer (the paper: 300 and 500)
MAX_DEPTH = 32  # MLP hidden layers, CNN conv blocks
MAX_CHANNELS = 2_048  # output channels of one CNN block
MAX_PARAMETERS = 50_000_000  # weights and biases of one network (200 MB in float32; the paper's MLP: 208,201)


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
        "hidden": P.Param([300, 300], f"hidden layer widths, each 1..{MAX_WIDTH}, at most {MAX_DEPTH} layers "
                          "(the paper: [300, 300] Colored MNIST, [500] moons)",
                          P.list_of(P.int_between(1, MAX_WIDTH), max_length=MAX_DEPTH)),
    }
    WIDTHS: ClassVar[str] = "hidden"  # the parameter that sets the network's size

    @staticmethod
    def parameter_count(params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        widths = [math.prod(input_shape), *params["hidden"], num_outputs]
        return sum(a * b + b for a, b in zip(widths, widths[1:]))

    @staticmethod
    def activation_count(params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        """Values one example keeps for the backward pass: each hidden layer's ReLU output, and the logits."""
        return sum(params["hidden"]) + num_outputs

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
        "channels": P.Param([32, 64], f"output channels of each 3x3 conv block, each 1..{MAX_CHANNELS}, at most "
                            f"{MAX_DEPTH} blocks",
                            P.list_of(P.int_between(1, MAX_CHANNELS), min_length=1, max_length=MAX_DEPTH)),
    }
    WIDTHS: ClassVar[str] = "channels"

    @staticmethod
    def parameter_count(params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        widths = [input_shape[0] if input_shape else 3, *params["channels"]]
        convs = sum(9 * a * b + b for a, b in zip(widths, widths[1:]))
        return convs + widths[-1] * num_outputs + num_outputs

    @staticmethod
    def activation_count(params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        """Per example: each block's ReLU output and what its max-pool keeps, at that block's resolution."""
        height, width = (input_shape[1], input_shape[2]) if len(input_shape) == 3 else (1, 1)
        count = 0
        for index, channels in enumerate(params["channels"]):
            if index > 0:
                height, width = -(-height // 2), -(-width // 2)  # MaxPool2d(2, ceil_mode=True)
            count += 2 * channels * height * width
        return count + params["channels"][-1] + num_outputs

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


def check_arch_params(arch: str, params: dict[str, Any] | None, *, input_shape: Sequence[int] | None = None,
                      num_outputs: int = 1, field: str = "arch_params") -> dict[str, Any]:
    """`params` of built-in `arch` within its bounds (widths, depth, channels, total size), defaults filled in.

    The one check for a train spec's `model` and for uploaded weights' `arch_params`: raises `ParamError` (a
    `SpecError`) naming `field.<param>`, before anything is allocated. Without `input_shape` the first layer's
    inputs are not counted towards MAX_PARAMETERS.
    """
    cls = arch_class(arch)
    resolved = P.resolve(f"arch {arch!r}", cls.PARAMS, params, field=field)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else ((1, 1, 1) if arch == "cnn" else (1,))
    count = cls.parameter_count(resolved, shape, max(int(num_outputs), 1))
    if count > MAX_PARAMETERS:
        raise P.ParamError(f"{field}.{cls.WIDTHS} gives arch {arch!r} {count:,} parameters"
                           f"{f' for input {list(shape)}' if input_shape is not None else ''}; the limit is "
                           f"{MAX_PARAMETERS:,}", f"{field}.{cls.WIDTHS}")
    return resolved


def resolve_arch_params(arch: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The train spec's `model` section (bounded as uploads are: `check_arch_params`)."""
    return check_arch_params(arch, params, field="model")


def parameter_count(arch: str, params: dict[str, Any] | None, input_shape: Sequence[int], num_outputs: int) -> int:
    """Weights and biases of the network `build_network` would make, counted without building it."""
    cls = arch_class(arch)
    return cls.parameter_count(P.resolve(f"arch {arch!r}", cls.PARAMS, params), tuple(input_shape), num_outputs)


def activation_count(arch: str, params: dict[str, Any] | None, input_shape: Sequence[int], num_outputs: int) -> int:
    """Values one example's forward pass keeps for the backward pass (the budget's activations, per example)."""
    cls = arch_class(arch)
    return cls.activation_count(P.resolve(f"arch {arch!r}", cls.PARAMS, params), tuple(input_shape), num_outputs)


def build_network(arch: str, params: dict[str, Any] | None, input_shape: Sequence[int], num_outputs: int) -> Network:
    """A freshly initialised built-in network (seed torch's RNG first for a reproducible init)."""
    if num_outputs < 1:
        raise SpecError(f"num_outputs must be >= 1, got {num_outputs}")
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or min(input_shape) < 1:
        raise SpecError(f"input_shape must be positive dimensions, got {list(input_shape)}")
    resolved = check_arch_params(arch, params, input_shape=input_shape, num_outputs=num_outputs)
    return arch_class(arch).build(resolved, input_shape, num_outputs)


def output_count(num_classes: int) -> int:
    """One logit for a binary task, one per class otherwise."""
    return 1 if num_classes == 2 else num_classes


def describe_all() -> list[dict]:
    return [{"arch": cls.NAME, "description": cls.DESCRIPTION, "params": P.describe(cls.PARAMS)} for cls in ARCHS.values()]
