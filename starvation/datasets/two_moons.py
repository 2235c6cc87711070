"""The paper's two moons (Figures 1-3): linearly separable with margin `delta`, curved class shapes."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from starvation import params as P
from starvation.datasets.base import DataSize, Split
from starvation.datasets.builtin import BuiltinDataset

TEST_SEED_OFFSET = 1_000_000  # the test draw uses random_state = seed + this, never another seed's train draw
MAX_SAMPLES = 1_000_000  # per draw: 3,333x the paper's 300, and 8 MB of points


def moons(n_samples: int, noise: float, delta: float, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """Points [N, 2] and labels in {-1, +1}, transformed as PAPER.md's two-moons construction."""
    from sklearn.datasets import make_moons

    points, labels = make_moons(n_samples=n_samples, noise=noise, random_state=random_state)
    sign = 2.0 * labels - 1.0
    points = points.copy()
    points[:, 0] -= 0.5
    points[:, 1] -= 0.3 * sign
    points[:, 1] -= points[:, 1].mean()
    points[:, 1] = -sign * np.abs(points[:, 1])  # each class on its own side of zero
    points[:, 1] -= sign * delta  # delta > 0 opens a margin of delta on each side, < 0 overlaps
    return points[:, ::-1].astype(np.float32).copy(), sign  # swap: the separating direction first


class TwoMoons(BuiltinDataset):
    NAME: ClassVar[str] = "two_moons"
    DESCRIPTION: ClassVar[str] = (
        "Two moons made linearly separable with margin delta along the first coordinate (PAPER.md, "
        "Figures 1-3); a 'train' draw and a 'test' draw. No spurious attribute: attribute is all zeros."
    )
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "delta": P.Param(0.1, "margin: > 0 separates the classes by 2*delta, < 0 overlaps them", P.number),
        "n_samples": P.Param(
            300, f"points per draw (train and test each), 1..{MAX_SAMPLES}", P.int_between(1, MAX_SAMPLES)
        ),
        "noise": P.Param(0.1, "standard deviation of make_moons' Gaussian noise", P.non_negative),
    }
    ATTRIBUTES: ClassVar[dict[str, str]] = {}
    SPLITS: ClassVar[list[str]] = ["train", "test"]
    TRAIN_SPLITS: ClassVar[list[str]] = ["train"]
    TEST_SPLIT: ClassVar[str] = "test"
    NUM_CLASSES: ClassVar[int] = 2
    INPUT_SHAPE: ClassVar[tuple[int, ...]] = (2,)
    SIZE_PARAM: ClassVar[str | None] = "n_samples"

    @classmethod
    def size(cls, params: dict[str, Any], data_dir: str | None = None) -> DataSize:
        n = params["n_samples"]
        return DataSize(n_train=n, n_examples=2 * n, input_shape=cls.INPUT_SHAPE, num_classes=cls.NUM_CLASSES)

    @classmethod
    def create(cls, params: dict[str, Any], *, seed: int, data_dir: str | None) -> TwoMoons:
        splits = {}
        for name, random_state in (("train", seed), ("test", seed + TEST_SEED_OFFSET)):
            points, sign = moons(params["n_samples"], params["noise"], params["delta"], random_state)
            labels = torch.from_numpy((sign > 0).astype(np.int64))  # class index: -1 -> 0, +1 -> 1
            splits[name] = Split(name=name, x=torch.from_numpy(points), y=labels, attribute=torch.zeros_like(labels))
        return cls(
            name=cls.NAME,
            splits=splits,
            train_splits=list(cls.TRAIN_SPLITS),
            test_split=cls.TEST_SPLIT,
            num_classes=cls.NUM_CLASSES,
            input_shape=cls.INPUT_SHAPE,
            attribute_name=None,
            info={"source": "sklearn.make_moons", "n_train": params["n_samples"], "n_test": params["n_samples"]},
        )
