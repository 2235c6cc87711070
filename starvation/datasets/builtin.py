"""What a built-in dataset adds to `Dataset`: declared params, a seeded constructor, a description."""

from __future__ import annotations

from typing import Any, ClassVar

from starvation import params as P
from starvation.datasets.base import Dataset, DataSize


class BuiltinDataset(Dataset):
    """A dataset the service can construct from a name, params and a seed (listed by GET /v1/datasets)."""

    NAME: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    PARAMS: ClassVar[dict[str, P.Param]]
    ATTRIBUTES: ClassVar[dict[str, str]]  # attribute name -> what it is
    SPLITS: ClassVar[list[str]]
    TRAIN_SPLITS: ClassVar[list[str]]
    TEST_SPLIT: ClassVar[str]
    NUM_CLASSES: ClassVar[int]
    INPUT_SHAPE: ClassVar[tuple[int, ...]]
    SIZE_PARAM: ClassVar[str | None] = None  # the parameter that sets how many examples there are

    @classmethod
    def create(cls, params: dict[str, Any], *, seed: int, data_dir: str | None) -> BuiltinDataset:
        """Build the splits from already-resolved params; same params and seed give the same tensors."""
        raise NotImplementedError

    @classmethod
    def resolve_params(cls, params: dict[str, Any] | None) -> dict[str, Any]:
        return P.resolve(f"dataset {cls.NAME!r}", cls.PARAMS, params, field="dataset.params")

    @classmethod
    def size(cls, params: dict[str, Any], data_dir: str | None = None) -> DataSize:
        """How big `create` will make the dataset with these resolved params (an upper bound), without building it."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict:
        return {
            "name": cls.NAME,
            "description": cls.DESCRIPTION,
            "params": P.describe(cls.PARAMS),
            "attributes": dict(cls.ATTRIBUTES),
            "splits": list(cls.SPLITS),
            "train_splits": list(cls.TRAIN_SPLITS),
            "test_split": cls.TEST_SPLIT,
            "num_classes": cls.NUM_CLASSES,
            "input_shape": list(cls.INPUT_SHAPE),
            "can_intervene": cls.can_intervene,
            "has_four_corners": cls.has_four_corners,
        }
