"""Models and datasets for the audit tests, built by hand: none of the project's training code.

- `ColourReader` reads only the colour: logit = k * (mean of channel 1 - mean of channel 0).
- `ColourBlind` averages the two channels first, then matches the grey image to a digit
  template, so swapping the colour cannot change anything it computes.
- `toy_dataset` makes a tiny 2-D dataset with chosen (label, attribute) group sizes, and
  `AttributeReader` / `LabelReader` are models whose accuracy per group is known exactly.
- `SwappableToy` is a toy dataset whose attribute can be swapped, and `FollowsAttribute` a model
  that follows it (or goes against it) on a known share of the examples and reads the label on
  the rest: its flip rate and the direction of its flips are known exactly.
"""
from __future__ import annotations

import pathlib
import warnings

import torch
from torch import nn

from starvation.datasets.base import Dataset, Split


class ChannelMeans(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class ColourReader(nn.Module):
    """Predicts class 1 when the digit is in channel 1 (colour 1 goes with label 1 in training)."""

    def __init__(self, k: float = 50.0) -> None:
        super().__init__()
        self.features = ChannelMeans()
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-k, k]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ChannelAverage(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class ColourBlind(nn.Module):
    """Grey image (mean of the channels), flattened, dotted with a digit template."""

    def __init__(self, template: torch.Tensor, bias: float) -> None:
        super().__init__()
        self.features = nn.Sequential(ChannelAverage(), nn.Flatten())
        self.head = nn.Linear(template.numel(), 1)
        with torch.no_grad():
            self.head.weight.copy_(template.reshape(1, -1))
            self.head.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @classmethod
    def fit_template(cls, train: Split) -> "ColourBlind":
        """Template = mean grey digit of class 1 minus class 0, scaled so logits are O(1)."""
        grey = train.x.mean(dim=1).flatten(1)
        template = grey[train.y == 1].mean(0) - grey[train.y == 0].mean(0)
        scores = grey @ template
        scale = 1.0 / float(scores.std())
        return cls(template * scale, bias=-float(scores.mean()) * scale)


class AttributeReader(nn.Module):
    """On toy data (x = [label, attribute] + jitter): predicts the attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, 10.0]]))
            self.head.bias.fill_(-5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LabelReader(AttributeReader):
    """On toy data: predicts the label."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[10.0, 0.0]]))


def toy_split(name: str, groups: dict[tuple[int, int], int], seed: int = 0) -> Split:
    """`groups` maps (label, attribute) to a count; x = [label, attribute] + small jitter."""
    generator = torch.Generator().manual_seed(seed)
    ys, attributes = [], []
    for (label, attribute), count in groups.items():
        ys += [label] * count
        attributes += [attribute] * count
    y, attribute = torch.tensor(ys), torch.tensor(attributes)
    x = torch.stack([y, attribute], dim=1).float() + 0.1 * torch.randn(len(y), 2, generator=generator)
    return Split(name=name, x=x, y=y, attribute=attribute)


def toy_dataset(train: dict[tuple[int, int], int], test: dict[tuple[int, int], int]) -> Dataset:
    return Dataset(
        name="toy", splits={"train": toy_split("train", train, 1), "test": toy_split("test", test, 2)},
        train_splits=["train"], test_split="test", num_classes=2, input_shape=(2,), attribute_name="shade",
    )


def save_torchscript(module: nn.Module, path: pathlib.Path) -> pathlib.Path:
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; users still upload it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def save_onnx(module: nn.Module, path: pathlib.Path, example: torch.Tensor, *, dynamic_batch: bool = True) -> pathlib.Path:
    """The legacy (TorchScript-based) exporter: the dynamo one needs onnxscript, not installed."""
    axes = {"x": {0: "batch"}, "logit": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, input_names=["x"],
                          output_names=["logit"], dynamic_axes=axes)
    return path


class PickleBomb:
    """Unpickling this creates `marker`: proof that a loader unpickled the upload."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SwappableToy(Dataset):
    """x = [label, attribute, u] (+ jitter on the first two); u spreads evenly over [0, 1)."""

    can_intervene = True

    def intervene(self, split: Split) -> Split:
        x = split.x.clone()
        x[:, 1] = 1 - x[:, 1]
        return Split(name=f"{split.name}_intervened", x=x, y=split.y.clone(), attribute=1 - split.attribute)

    @classmethod
    def build(cls, n_test: int = 1_000) -> "SwappableToy":
        train = toy_split("train", {(0, 0): 40, (0, 1): 10, (1, 0): 10, (1, 1): 40}, 1)  # attribute 1 goes with label 1
        test = toy_split("test", {(0, 0): n_test // 4, (0, 1): n_test // 4, (1, 0): n_test // 4, (1, 1): n_test // 4}, 2)
        splits = {}
        for split in (train, test):
            u = (torch.randperm(len(split), generator=torch.Generator().manual_seed(3)).double() + 0.5) / len(split)
            splits[split.name] = Split(split.name, torch.cat([split.x, u.float()[:, None]], dim=1), split.y,
                                       split.attribute)
        return cls(name="swappable_toy", splits=splits, train_splits=["train"], test_split="test", num_classes=2,
                   input_shape=(3,), attribute_name="shade")


class FollowsAttribute(nn.Module):
    """Predicts the attribute where u < towards, its opposite where towards <= u < towards + against,
    the label elsewhere; so a swap flips exactly those examples, in a known direction."""

    def __init__(self, towards: float, against: float = 0.0, k: float = 10.0) -> None:
        super().__init__()
        self.towards, self.against, self.k = towards, against, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label, attribute, u = x[:, 0] - 0.5, x[:, 1] - 0.5, x[:, 2]
        follows = torch.where(u < self.towards, attribute, torch.where(u < self.towards + self.against, -attribute,
                                                                       label))
        return (self.k * follows)[:, None]
