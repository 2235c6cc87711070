"""Built-in architectures. Each is `head(features(x))`: the audit hooks `features`, the penultimate layer."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from starvation import params as P
from starvation.errors import SpecError
from starvation.resnet_blocks import (
    MAX_RESNET_WIDTH,
    RESNET_MIN_SIZE,
    BasicBlock,
    Bottleneck,
    conv1x1,
    strided,
)

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
            if layer.bias is not None:  # ours always have one
                nn.init.zeros_(layer.bias)


class Arch:
    """A built-in architecture, one class per name in `ARCHS`: its parameters and their bounds, how big a network
    of it is (counted without building it), and how to build one."""

    NAME: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    PARAMS: ClassVar[dict[str, P.Param]]
    WIDTHS: ClassVar[str]  # the parameter that sets the network's size
    BATCH_NORM: ClassVar[bool] = False  # normalises over the batch: an update needs 2 examples at least
    NOMINAL_SHAPE: ClassVar[tuple[int, ...]]  # the input `check_arch_params` counts without one given
    TORCHVISION_NAMES: ClassVar[bool] = False  # weights may come with torchvision's key names

    @classmethod
    def parameter_count(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        raise NotImplementedError

    @classmethod
    def activation_count(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        """Values one example keeps for the backward pass."""
        raise NotImplementedError

    @classmethod
    def inference_count(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        """Values one example holds at once in a forward pass without gradients, its input aside; by default
        `activation_count` (an upper bound: what a pass with gradients keeps)."""
        return cls.activation_count(params, input_shape, num_outputs)

    @classmethod
    def largest_tensor(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        """Values in the network's largest parameter tensor (the NTK's per-example gradients are held a tensor at
        a time); by default `parameter_count`, a bound from above."""
        return cls.parameter_count(params, input_shape, num_outputs)

    @classmethod
    def build(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> Network:
        raise NotImplementedError


class MLP(Arch):
    NAME: ClassVar[str] = "mlp"
    DESCRIPTION: ClassVar[str] = "flatten, then Linear+ReLU per hidden width, then a Linear head"
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "hidden": P.Param(
            [300, 300],
            f"hidden layer widths, each 1..{MAX_WIDTH}, at most {MAX_DEPTH} layers "
            "(the paper: [300, 300] Colored MNIST, [500] moons)",
            P.list_of(P.int_between(1, MAX_WIDTH), max_length=MAX_DEPTH),
        ),
    }
    WIDTHS: ClassVar[str] = "hidden"
    NOMINAL_SHAPE: ClassVar[tuple[int, ...]] = (1,)

    @classmethod
    def parameter_count(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        widths = [math.prod(input_shape), *params["hidden"], num_outputs]
        return sum(a * b + b for a, b in zip(widths, widths[1:]))

    @classmethod
    def largest_tensor(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        widths = [math.prod(input_shape), *params["hidden"], num_outputs]
        return max(a * b for a, b in zip(widths, widths[1:]))

    @classmethod
    def activation_count(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        """Values one example keeps for the backward pass: each hidden layer's ReLU output, and the logits."""
        return sum(params["hidden"]) + num_outputs

    @classmethod
    def build(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> Network:
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for hidden in params["hidden"]:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        network = Network(nn.Sequential(*layers), nn.Linear(width, num_outputs))
        _init_xavier(network)
        return network


class CNN(Arch):
    NAME: ClassVar[str] = "cnn"
    DESCRIPTION: ClassVar[str] = "3x3 Conv+ReLU blocks (max-pool between), global average pool, a Linear head"
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "channels": P.Param(
            [32, 64],
            f"output channels of each 3x3 conv block, each 1..{MAX_CHANNELS}, at most {MAX_DEPTH} blocks",
            P.list_of(P.int_between(1, MAX_CHANNELS), min_length=1, max_length=MAX_DEPTH),
        ),
    }
    WIDTHS: ClassVar[str] = "channels"
    NOMINAL_SHAPE: ClassVar[tuple[int, ...]] = (1, 1, 1)

    @classmethod
    def parameter_count(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        widths = [input_shape[0] if input_shape else 3, *params["channels"]]
        convs = sum(9 * a * b + b for a, b in zip(widths, widths[1:]))
        return convs + widths[-1] * num_outputs + num_outputs

    @classmethod
    def largest_tensor(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        widths = [input_shape[0] if input_shape else 3, *params["channels"]]
        return max(widths[-1] * num_outputs, *(9 * a * b for a, b in zip(widths, widths[1:])))

    @classmethod
    def activation_count(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        """Per example: each block's ReLU output and what its max-pool keeps, at that block's resolution."""
        height, width = (input_shape[1], input_shape[2]) if len(input_shape) == 3 else (1, 1)
        count = 0
        for index, channels in enumerate(params["channels"]):
            if index > 0:
                height, width = -(-height // 2), -(-width // 2)  # MaxPool2d(2, ceil_mode=True)
            count += 2 * channels * height * width
        return count + params["channels"][-1] + num_outputs

    @classmethod
    def build(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> Network:
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


# ---- ResNets: torchvision's resnet18 and resnet50 (v1.5), under torchvision's module names ----------------------


class _ResNet(Arch):
    """torchvision's ResNet: conv1 7x7/2, bn1, relu, maxpool 3x3/2, layer1..layer4 (planes width x 1, 2, 4, 8;
    layer2..4 start with stride 2), global average pool, flatten; `head` is torchvision's `fc`.

    `features` holds torchvision's top-level modules under their names, so our state-dict keys are
    `features.<torchvision key>` and `head.weight`/`head.bias` (`torchvision_state_dict_to_ours`).
    """

    NAME: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    BLOCK: ClassVar[type[BasicBlock] | type[Bottleneck]]
    LAYERS: ClassVar[tuple[int, int, int, int]]  # blocks per stage
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "width": P.Param(
            64,
            f"channels of the stem and of layer1's 3x3 convs, 1..{MAX_RESNET_WIDTH}; layer2..4 use "
            "2x, 4x and 8x as many (a Bottleneck puts out 4x its 3x3 channels). 64 is torchvision's, and "
            "what its ImageNet weights need",
            P.int_between(1, MAX_RESNET_WIDTH),
        ),
    }
    WIDTHS: ClassVar[str] = "width"
    BATCH_NORM: ClassVar[bool] = True
    NOMINAL_SHAPE: ClassVar[tuple[int, ...]] = (1, RESNET_MIN_SIZE, RESNET_MIN_SIZE)
    TORCHVISION_NAMES: ClassVar[bool] = True

    @classmethod
    def _image_shape(cls, input_shape: Sequence[int]) -> tuple[int, int, int]:
        if len(input_shape) != 3 or min(input_shape[1:]) < RESNET_MIN_SIZE:
            raise SpecError(
                f"arch {cls.NAME!r} needs image inputs [channels, height, width] of at least "
                f"{RESNET_MIN_SIZE}x{RESNET_MIN_SIZE}, got shape {list(input_shape)}"
            )
        channels, height, width = (int(d) for d in input_shape)
        return channels, height, width

    @classmethod
    def _blocks(cls, width: int) -> list[tuple[str, int, int, int, bool]]:
        """(stage name, inplanes, planes, stride, has a downsample shortcut) of every block, in order."""
        blocks, inplanes = [], width
        for index, count in enumerate(cls.LAYERS):
            planes, stride = width * 2**index, (1 if index == 0 else 2)
            for block in range(count):
                first = block == 0
                downsample = first and (stride != 1 or inplanes != planes * cls.BLOCK.expansion)
                blocks.append((f"layer{index + 1}", inplanes, planes, stride if first else 1, downsample))
                inplanes = planes * cls.BLOCK.expansion
        return blocks

    @classmethod
    def _counts(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> tuple[int, int, int]:
        """(parameters, values one example keeps for the backward pass, values it holds at once without
        gradients), from the layer plan alone.

        Kept values: each conv's output (its BatchNorm's input) and each BatchNorm's output (the in-place ReLU's,
        or the block's sum), the max-pool's output and its int64 indices (2 float32 values each), the pooled
        features and the logits. Without gradients a block holds at most its input and, around each conv, the
        conv's input, output, BatchNorm output and workspace: 4x its largest conv output bounds these (measured on
        the CPU: within 1.3x of the peak for resnet18/50 at 32..224 pixels).
        """
        channels, height, width = cls._image_shape(input_shape)
        base = params["width"]
        height, width = strided(height, 2), strided(width, 2)
        n_parameters = channels * base * 49 + 2 * base
        kept = peak = 2 * base * height * width  # conv1's output and bn1's (relu is in place)
        stem = base * height * width
        height, width = strided(height, 2), strided(width, 2)
        kept += 3 * base * height * width
        peak = max(peak, stem + base * height * width)
        block_input = base * height * width
        for _, inplanes, planes, stride, downsample in cls._blocks(base):
            convs = cls.BLOCK.convs(inplanes, planes, stride)
            if downsample:
                convs.append((inplanes, planes * cls.BLOCK.expansion, 1, stride))
            largest = 0
            for c_in, c_out, kernel, out_stride in convs:
                values = c_out * strided(height, out_stride) * strided(width, out_stride)
                n_parameters += c_in * c_out * kernel * kernel + 2 * c_out
                kept += 2 * values
                largest = max(largest, values)
            peak = max(peak, block_input + 4 * largest)
            height, width = strided(height, stride), strided(width, stride)
            block_input = planes * cls.BLOCK.expansion * height * width
        features = 8 * base * cls.BLOCK.expansion
        n_parameters += features * num_outputs + num_outputs
        return n_parameters, kept + features + num_outputs, peak + features + num_outputs

    @classmethod
    def parameter_count(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        return cls._counts(params, input_shape, num_outputs)[0]

    @classmethod
    def largest_tensor(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        channels, _, _ = cls._image_shape(input_shape)
        base = params["width"]
        convs = [
            c_in * c_out * kernel * kernel
            for _, inplanes, planes, stride, _ in cls._blocks(base)
            for c_in, c_out, kernel, _ in cls.BLOCK.convs(inplanes, planes, stride)
        ]
        return max(channels * base * 49, 8 * base * cls.BLOCK.expansion * num_outputs, *convs)

    @classmethod
    def activation_count(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        """Per example: every conv's and BatchNorm's output at its resolution, the max-pool's, features, logits."""
        return cls._counts(params, input_shape, num_outputs)[1]

    @classmethod
    def inference_count(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> int:
        """Per example, the most values a forward pass without gradients holds at once (the input not counted):
        far fewer than `activation_count` for a deep network, whose layers' outputs are freed as it goes."""
        return cls._counts(params, input_shape, num_outputs)[2]

    @classmethod
    def build(cls, params: dict[str, Any], input_shape: Sequence[int], num_outputs: int) -> Network:
        channels, _, _ = cls._image_shape(input_shape)
        base = params["width"]
        stages: dict[str, list[nn.Module]] = {f"layer{i}": [] for i in range(1, 5)}
        for stage, inplanes, planes, stride, downsample in cls._blocks(base):
            shortcut = (
                nn.Sequential(
                    conv1x1(inplanes, planes * cls.BLOCK.expansion, stride),
                    nn.BatchNorm2d(planes * cls.BLOCK.expansion),
                )
                if downsample
                else None
            )
            stages[stage].append(cls.BLOCK(inplanes, planes, stride, shortcut))
        features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(channels, base, kernel_size=7, stride=2, padding=3, bias=False),
                bn1=nn.BatchNorm2d(base),
                relu=nn.ReLU(inplace=True),
                maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                **{name: nn.Sequential(*blocks) for name, blocks in stages.items()},
                avgpool=nn.AdaptiveAvgPool2d((1, 1)),
                flatten=nn.Flatten(),
            )
        )
        network = Network(features, nn.Linear(8 * base * cls.BLOCK.expansion, num_outputs))
        for layer in features.modules():  # torchvision's initialisation; the head keeps nn.Linear's default
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(layer, nn.BatchNorm2d):
                nn.init.ones_(layer.weight)
                nn.init.zeros_(layer.bias)
        return network


class ResNet18(_ResNet):
    NAME: ClassVar[str] = "resnet18"
    DESCRIPTION: ClassVar[str] = (
        "torchvision's ResNet-18: 7x7 stem, 4 stages of 2 BasicBlocks (BatchNorm), global "
        "average pool, a Linear head; takes torchvision-named weights"
    )
    BLOCK = BasicBlock
    LAYERS = (2, 2, 2, 2)


class ResNet50(_ResNet):
    NAME: ClassVar[str] = "resnet50"
    DESCRIPTION: ClassVar[str] = (
        "torchvision's ResNet-50 (v1.5): 7x7 stem, 4 stages of 3, 4, 6, 3 Bottlenecks "
        "(BatchNorm), global average pool, a Linear head; takes torchvision-named weights"
    )
    BLOCK = Bottleneck
    LAYERS = (3, 4, 6, 3)


ARCHS: dict[str, type[Arch]] = {cls.NAME: cls for cls in (MLP, CNN, ResNet18, ResNet50)}


def arch_class(arch: str) -> type[Arch]:
    try:
        return ARCHS[arch]
    except (KeyError, TypeError):
        raise SpecError(f"unknown arch {arch!r}; built-in architectures: {', '.join(sorted(ARCHS))}") from None


def check_arch_params(
    arch: str,
    params: dict[str, Any] | None,
    *,
    input_shape: Sequence[int] | None = None,
    num_outputs: int = 1,
    field: str = "arch_params",
) -> dict[str, Any]:
    """`params` of built-in `arch` within its bounds (widths, depth, channels, total size), defaults filled in.

    The one check for a train spec's `model` and for uploaded weights' `arch_params`: raises `ParamError` (a
    `SpecError`) naming `field.<param>`, before anything is allocated. Without `input_shape` the first layer's
    inputs are not counted towards MAX_PARAMETERS.
    """
    cls = arch_class(arch)
    resolved = P.resolve(f"arch {arch!r}", cls.PARAMS, params, field=field)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else cls.NOMINAL_SHAPE
    count = cls.parameter_count(resolved, shape, max(int(num_outputs), 1))
    if count > MAX_PARAMETERS:
        raise P.ParamError(
            f"{field}.{cls.WIDTHS} gives arch {arch!r} {count:,} parameters"
            f"{f' for input {list(shape)}' if input_shape is not None else ''}; the limit is "
            f"{MAX_PARAMETERS:,}",
            f"{field}.{cls.WIDTHS}",
        )
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


def largest_tensor(arch: str, params: dict[str, Any] | None, input_shape: Sequence[int], num_outputs: int) -> int:
    """Values in the largest parameter tensor of the network `build_network` would make (`Arch.largest_tensor`)."""
    cls = arch_class(arch)
    return cls.largest_tensor(P.resolve(f"arch {arch!r}", cls.PARAMS, params), tuple(input_shape), num_outputs)


def inference_count(arch: str, params: dict[str, Any] | None, input_shape: Sequence[int], num_outputs: int) -> int:
    """Values one example holds at once in a forward pass without gradients, its input aside (the budget's
    evaluation, per example): `Arch.inference_count`."""
    cls = arch_class(arch)
    return cls.inference_count(P.resolve(f"arch {arch!r}", cls.PARAMS, params), tuple(input_shape), num_outputs)


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
