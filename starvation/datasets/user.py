"""Datasets users register: an .npz of arrays, or an image folder with a metadata CSV (CelebA/Waterbirds layout).

Every check raises `SpecError` with a message for the person who uploaded the file. Nothing is unpickled.
"""
from __future__ import annotations

import csv
import pathlib
import re
import zipfile

import numpy as np
import torch

from starvation.datasets.base import Dataset, Split
from starvation.errors import SpecError

NPZ_ARRAYS = {"x", "y", "attribute", "split"}
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ALL = "all"  # the one split of a dataset uploaded without a split column
TEST_NAMES = ("test", "val", "valid", "validation")


def load_npz(path: str | pathlib.Path, name: str) -> Dataset:
    """A dataset from an .npz with arrays x [N, ...], y [N] class indices, attribute [N] ints, optional split [N] str.

    uint8 inputs are divided by 255. Splits whose name starts with "train" are pooled for training; the test
    split is "test" (else "val"/"valid"/"validation", else the first other split). Without `split`, one split
    "all" serves for both.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise SpecError(f"{pathlib.Path(path).name} is not a readable .npz file ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise SpecError("expected an .npz archive (numpy.savez) with arrays x, y and attribute; got a single array")
    with archive:
        keys = set(archive.files)
        missing = sorted({"x", "y", "attribute"} - keys)
        if missing:
            raise SpecError(f"the .npz lacks array(s) {', '.join(missing)}; it needs x, y and attribute (split optional)")
        unexpected = sorted(keys - NPZ_ARRAYS)
        if unexpected:
            raise SpecError(f"the .npz has unexpected array(s) {', '.join(unexpected)}; allowed: x, y, attribute, split")
        try:
            arrays = {key: archive[key] for key in keys}
        except ValueError as error:  # object arrays need pickle, which we refuse
            raise SpecError(f"the .npz holds an array that needs pickle to load ({error}); save plain numeric and "
                            "string arrays") from None
    x = _inputs(arrays["x"])
    split = _split_names(arrays["split"], len(x)) if "split" in arrays else None
    return from_arrays(name, x, arrays["y"], arrays["attribute"], split, info={"source": "npz"})


def load_image_folder(root: str | pathlib.Path, csv_path: str | pathlib.Path, name: str,
                      image_size: int | tuple[int, int]) -> Dataset:
    """A dataset from images under `root` listed in a CSV with columns path, label, attribute[, split].

    Each image is loaded with Pillow as RGB, resized to `image_size` (an int or (height, width)) and stored
    float32 CHW in [0, 1]. Paths are relative to `root`; a path that leaves `root` is refused.
    """
    from PIL import Image, UnidentifiedImageError

    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if height <= 0 or width <= 0:
        raise SpecError(f"image_size must be positive, got {image_size!r}")
    root = pathlib.Path(root).resolve()
    rows = _csv_rows(pathlib.Path(csv_path))
    images, labels, attributes, splits = [], [], [], []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"metadata CSV line {number}"
        image_path = _inside(root, row["path"], where)
        try:
            with Image.open(image_path) as image:
                rgb = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError) as error:
            raise SpecError(f"{where}: cannot read image {row['path']!r} ({error})") from None
        images.append(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        labels.append(_int(row["label"], f"{where}: label"))
        attributes.append(_int(row["attribute"], f"{where}: attribute"))
        splits.append(row.get("split") or ALL)
    x = np.stack(images)
    split = _split_names(np.array(splits), len(x)) if any(s != ALL for s in splits) else None
    return from_arrays(name, x, np.array(labels), np.array(attributes), split,
                       info={"source": "image_folder", "image_size": [height, width]})


def from_arrays(name: str, x: np.ndarray, y: np.ndarray, attribute: np.ndarray, split: np.ndarray | None,
                *, info: dict) -> Dataset:
    """Validated arrays to a `Dataset` (x already float32)."""
    n = len(x)
    y = _class_indices(y, n, "y")
    attribute = _class_indices(attribute, n, "attribute")
    names = [ALL] if split is None else list(dict.fromkeys(split.tolist()))
    split = np.full(n, ALL) if split is None else split
    tensors = {}
    for split_name in names:
        rows = np.flatnonzero(split == split_name)
        tensors[split_name] = Split(name=split_name, x=torch.from_numpy(np.ascontiguousarray(x[rows])),
                                    y=torch.from_numpy(y[rows]), attribute=torch.from_numpy(attribute[rows]))
    train = [s for s in names if s.startswith("train")]
    tests = [s for s in TEST_NAMES if s in names] or [s for s in names if s not in train] or train
    return Dataset(name=name, splits=tensors, train_splits=train or [tests[0]], test_split=tests[0],
                   num_classes=max(2, int(y.max()) + 1), input_shape=tuple(int(d) for d in x.shape[1:]),
                   attribute_name="attribute", info={**info, "n_examples": n, "splits": {s: len(tensors[s]) for s in names}})


def _inputs(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise SpecError(f"x must be numeric, got dtype {x.dtype}")
    if x.ndim < 2 or len(x) == 0:
        raise SpecError(f"x must be [N, ...features] with N >= 1, got shape {list(x.shape)}")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if not np.isfinite(x).all():
        raise SpecError("x holds NaN or infinite values")
    return x


def _class_indices(values: np.ndarray, n: int, what: str) -> np.ndarray:
    if values.ndim != 1 or len(values) != n:
        raise SpecError(f"{what} must be one value per example ({n}), got shape {list(values.shape)}")
    if values.dtype.kind == "f" and np.isfinite(values).all() and (values == np.round(values)).all():
        values = values.astype(np.int64)
    if values.dtype.kind not in "biu":
        raise SpecError(f"{what} must hold integers (class indices), got dtype {values.dtype}")
    values = values.astype(np.int64)
    if values.min() < 0:
        raise SpecError(f"{what} must be class indices 0..k-1 (binary: 0/1), found {int(values.min())}")
    return values


def _split_names(split: np.ndarray, n: int) -> np.ndarray:
    if split.dtype.kind == "S":
        split = np.char.decode(split, "ascii", errors="replace")
    if split.dtype.kind != "U" or split.ndim != 1 or len(split) != n:
        raise SpecError(f"split must be {n} strings such as 'train' and 'test', got dtype {split.dtype}, "
                        f"shape {list(split.shape)}")
    for value in np.unique(split):
        if not SPLIT_NAME.match(value):
            raise SpecError(f"split name {value!r} must be 1-64 letters, digits, '_', '-' or '.'")
    return split


def _csv_rows(csv_path: pathlib.Path) -> list[dict[str, str]]:
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = sorted({"path", "label", "attribute"} - set(reader.fieldnames or []))
            if missing:
                raise SpecError(f"metadata CSV lacks column(s) {', '.join(missing)}; "
                                "needs path, label, attribute and optionally split")
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SpecError(f"cannot read the metadata CSV ({error})") from None
    if not rows:
        raise SpecError("the metadata CSV lists no images")
    return rows


def _inside(root: pathlib.Path, relative: str, where: str) -> pathlib.Path:
    if not relative or pathlib.PurePath(relative).is_absolute():
        raise SpecError(f"{where}: path must be relative to the image folder, got {relative!r}")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise SpecError(f"{where}: path {relative!r} leaves the image folder")
    return path


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SpecError(f"{what} must be an integer, got {text!r}") from None
