"""Datasets by name: the built-ins (`DATASETS`) and loaders for the ones users register."""

from __future__ import annotations

from typing import Any

from starvation.datasets.base import HOLDOUT_SPLIT, Dataset, DataSize, Split, hold_out
from starvation.datasets.builtin import BuiltinDataset
from starvation.datasets.colored_mnist import ColoredMNIST
from starvation.datasets.files import DatasetError, ImageFiles, batched, batches_of
from starvation.datasets.images import (
    ImageFolderDataset,
    ImageIndex,
    index_image_folder,
    load_image_folder,
    load_index,
    open_image_folder,
    save_index,
)
from starvation.datasets.two_moons import TwoMoons
from starvation.datasets.user import check_npz, load_npz, registered_size
from starvation.errors import SpecError

DATASETS: dict[str, type[BuiltinDataset]] = {cls.NAME: cls for cls in (ColoredMNIST, TwoMoons)}


def dataset_class(name: str) -> type[BuiltinDataset]:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise SpecError(f"unknown dataset {name!r}; built-in datasets: {', '.join(sorted(DATASETS))}") from None


def resolve_params(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The params of built-in `name` checked, with defaults filled in."""
    return dataset_class(name).resolve_params(params)


def build(name: str, params: dict[str, Any] | None, *, seed: int, data_dir: str | None) -> Dataset:
    """Built-in dataset `name` with `params`; the same name, params and seed give identical tensors."""
    cls = dataset_class(name)
    return cls.create(cls.resolve_params(params), seed=seed, data_dir=data_dir)


def size(name: str, params: dict[str, Any] | None, *, data_dir: str | None) -> DataSize:
    """How big built-in dataset `name` with `params` will be where `data_dir` is the data directory, unbuilt."""
    cls = dataset_class(name)
    return cls.size(cls.resolve_params(params), data_dir)


__all__ = [
    "DATASETS",
    "HOLDOUT_SPLIT",
    "BuiltinDataset",
    "DataSize",
    "Dataset",
    "DatasetError",
    "ImageFiles",
    "ImageFolderDataset",
    "ImageIndex",
    "Split",
    "SpecError",
    "batched",
    "batches_of",
    "build",
    "check_npz",
    "dataset_class",
    "hold_out",
    "index_image_folder",
    "load_image_folder",
    "load_index",
    "load_npz",
    "open_image_folder",
    "registered_size",
    "resolve_params",
    "save_index",
    "size",
]
