"""Datasets users register: an .npz of arrays (image folders: `starvation.datasets.images`), and what both share.

Every check raises `DatasetError` (a `SpecError`) with a message for the person who uploaded the file. Nothing
is unpickled, and nothing is decompressed before its size is known and within limits: an .npz's zip directory and
.npy headers are read first (`check_npz`).
"""

from __future__ import annotations

import math
import pathlib
import re
import zipfile
from collections.abc import Sequence

import numpy as np
import torch

from starvation.datasets.base import Dataset, DataSize, Split
from starvation.datasets.files import DatasetError

NPZ_ARRAYS = {"x", "y", "attribute", "split"}
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ALL = "all"  # the one split of a dataset uploaded without a split column
TEST_NAMES = ("test", "val", "valid", "validation")

# Size limits (the service passes its settings; these are the defaults, docs/security.md "Limits and budgets").
MAX_DATASET_BYTES = 2 << 30  # a loaded dataset: its arrays, x as float32
MAX_COMPRESSION_RATIO = 100  # an .npz member unpacking to more than this many times its packed size is a bomb...
RATIO_CHECKED_ABOVE = 16 << 20  # ...when it unpacks to more than this (an all-zero `attribute` packs 1000:1)
MAX_DIRECTORY_BYTES = 64 << 10  # the zip's central directory: four entries need well under 1 KiB
ARRAY_KINDS = {"x": "biuf", "y": "biuf", "attribute": "biuf", "split": "SU"}  # numpy dtype kinds; never "O"


def check_npz(
    path: str | pathlib.Path,
    *,
    max_bytes: int = MAX_DATASET_BYTES,
    max_compression_ratio: float = MAX_COMPRESSION_RATIO,
) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each array's (dtype, shape), from the zip directory and the .npy headers alone: no array is materialised.

    Refuses (`DatasetError`, code "too_large") a member that unpacks past `max_bytes` or, above
    RATIO_CHECKED_ABOVE, past `max_compression_ratio` times its packed size, and arrays that would take more
    than `max_bytes` once loaded (x as float32); refuses (code "invalid_dataset") other names than x, y,
    attribute and split, object and other non-numeric dtypes, and headers whose shape does not match the bytes.
    """
    filename = pathlib.Path(path).name
    try:
        _check_directory_size(path)
        archive = zipfile.ZipFile(path)
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError(f"{filename} is not a readable .npz file ({error})") from None
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        keys = {name.removesuffix(".npy") for name in names}
        unexpected = sorted(name for name in names if not (name.endswith(".npy") and name[:-4] in NPZ_ARRAYS))
        if unexpected or len(keys) != len(names):
            raise DatasetError(
                f"the .npz has unexpected member(s) {', '.join(unexpected) or '(an array twice)'}; "
                "allowed: x.npy, y.npy, attribute.npy, split.npy"
            )
        missing = sorted({"x", "y", "attribute"} - keys)
        if missing:
            raise DatasetError(
                f"the .npz lacks array(s) {', '.join(missing)}; it needs x, y and attribute (split optional)"
            )
        arrays, loaded_bytes = {}, 0
        for info in infos:
            key = info.filename.removesuffix(".npy")
            _check_member_size(key, info, max_bytes, max_compression_ratio)
            try:
                with archive.open(info) as member:
                    dtype, shape, data_start = _npy_header(member)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as error:
                raise DatasetError(f"array {key!r} of the .npz has no readable .npy header ({error})") from None
            if dtype.hasobject or dtype.kind not in ARRAY_KINDS[key]:
                raise DatasetError(
                    f"array {key!r} has dtype {dtype}; it must be "
                    f"{'strings' if key == 'split' else 'numeric'} (nothing that needs pickle)"
                )
            count = math.prod(shape)
            loaded_bytes += count * dtype.itemsize + (count * 4 if key == "x" else 0)  # x is also kept as float32
            if loaded_bytes > max_bytes:
                raise DatasetError(
                    f"array {key!r} (shape {list(shape)}, {dtype}) takes the dataset past "
                    f"{_size(max_bytes)} in memory, the limit",
                    code="too_large",
                )
            if count * dtype.itemsize != info.file_size - data_start:
                raise DatasetError(
                    f"array {key!r} declares shape {list(shape)} of {dtype} ({count * dtype.itemsize} "
                    f"bytes) but holds {info.file_size - data_start} bytes"
                )
            arrays[key] = (dtype, tuple(shape))
    return arrays


def _check_directory_size(path: str | pathlib.Path) -> None:
    """Refuse a zip directory of more entries or bytes than four arrays need, before zipfile reads it: each
    46-byte entry becomes a ~400-byte Python object, so a 512 MiB upload of empty entries would take 4 GiB."""
    with open(path, "rb") as handle:
        # the end record zipfile itself trusts (zip64 applied); private, but stable, and not in typeshed
        end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    if end is None:
        raise zipfile.BadZipFile("File is not a zip file")
    entries, directory_bytes = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if entries > len(NPZ_ARRAYS) or directory_bytes > MAX_DIRECTORY_BYTES:
        raise DatasetError(
            f"the .npz lists {entries} members in {directory_bytes} bytes; it may hold only x, y, attribute and split",
            code="too_large",
        )


def _check_member_size(key: str, info: zipfile.ZipInfo, max_bytes: int, max_ratio: float) -> None:
    if info.file_size > max_bytes:
        raise DatasetError(
            f"array {key!r} unpacks to {_size(info.file_size)}; the limit is {_size(max_bytes)}", code="too_large"
        )
    if info.file_size > RATIO_CHECKED_ABOVE and info.file_size > max_ratio * max(info.compress_size, 1):
        raise DatasetError(
            f"array {key!r} unpacks to {_size(info.file_size)} from {_size(info.compress_size)} "
            f"(more than {max_ratio:g}:1): refused as a compression bomb",
            code="too_large",
        )


def _npy_header(member) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, offset of the data) from an .npy header, reading nothing past it."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]}; 1.0 and 2.0 are read")
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"bad shape {shape}")
    return np.dtype(dtype), tuple(shape), member.tell()


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def load_npz(
    path: str | pathlib.Path,
    name: str,
    *,
    max_bytes: int = MAX_DATASET_BYTES,
    max_compression_ratio: float = MAX_COMPRESSION_RATIO,
) -> Dataset:
    """A dataset from an .npz with arrays x [N, ...], y [N] class indices, attribute [N] ints, optional split [N] str.

    uint8 inputs are divided by 255. Splits whose name starts with "train" are pooled for training; the test
    split is "test" (else "val"/"valid"/"validation", else the first other split). Without `split`, one split
    "all" serves for both. `check_npz` vets sizes and dtypes before any array is read.
    """
    check_npz(path, max_bytes=max_bytes, max_compression_ratio=max_compression_ratio)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError(f"{pathlib.Path(path).name} is not a readable .npz file ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError("expected an .npz archive (numpy.savez) with arrays x, y and attribute; got a single array")
    with archive:  # check_npz vetted the names, dtypes and sizes
        try:
            arrays = {key: archive[key] for key in archive.files}
        except ValueError as error:  # object arrays need pickle, which we refuse
            raise DatasetError(
                f"the .npz holds an array that needs pickle to load ({error}); save plain numeric and string arrays"
            ) from None
    x = _inputs(arrays["x"])
    split = _split_names(arrays["split"], len(x)) if "split" in arrays else None
    return from_arrays(name, x, arrays["y"], arrays["attribute"], split, info={"source": "npz"})


def registered_size(
    splits: dict[str, int], input_shape: Sequence[int], num_classes: int, *, streamed: bool = False
) -> DataSize:
    """A registered dataset's size from what registration recorded (split sizes), for the memory budget
    (`streamed`: an image folder)."""
    train, _ = train_and_test_splits(list(splits))
    return DataSize(
        n_train=sum(splits[s] for s in train),
        n_examples=sum(splits.values()),
        input_shape=tuple(int(d) for d in input_shape),
        num_classes=int(num_classes),
        streamed=streamed,
    )


def train_and_test_splits(names: list[str]) -> tuple[list[str], str]:
    """(training splits, test split) a registered dataset with these split names gets: splits named "train*" are pooled for training; the test split is test/val/..., else another, else train."""
    train = [s for s in names if s.startswith("train")]
    tests = [s for s in TEST_NAMES if s in names] or [s for s in names if s not in train] or train
    return train or [tests[0]], tests[0]


def from_arrays(
    name: str, x: np.ndarray, y: np.ndarray, attribute: np.ndarray, split: np.ndarray | None, *, info: dict
) -> Dataset:
    """Validated arrays to a `Dataset` (x already float32)."""
    n = len(x)
    y = _class_indices(y, n, "y")
    attribute = _class_indices(attribute, n, "attribute")
    names = [ALL] if split is None else list(dict.fromkeys(split.tolist()))
    split = np.full(n, ALL) if split is None else split
    tensors = {}
    for split_name in names:
        rows = np.flatnonzero(split == split_name)
        tensors[split_name] = Split(
            name=split_name,
            x=torch.from_numpy(np.ascontiguousarray(x[rows])),
            y=torch.from_numpy(y[rows]),
            attribute=torch.from_numpy(attribute[rows]),
        )
    train, test = train_and_test_splits(names)
    return Dataset(
        name=name,
        splits=tensors,
        train_splits=train,
        test_split=test,
        num_classes=max(2, int(y.max()) + 1),
        input_shape=tuple(int(d) for d in x.shape[1:]),
        attribute_name="attribute",
        info={**info, "n_examples": n, "splits": {s: len(tensors[s]) for s in names}},
    )


def _inputs(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"x must be numeric, got dtype {x.dtype}")
    if x.ndim < 2 or len(x) == 0:
        raise DatasetError(f"x must be [N, ...features] with N >= 1, got shape {list(x.shape)}")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DatasetError("x holds NaN or infinite values")
    return x


def _class_indices(values: np.ndarray, n: int, what: str) -> np.ndarray:
    if values.ndim != 1 or len(values) != n:
        raise DatasetError(f"{what} must be one value per example ({n}), got shape {list(values.shape)}")
    if values.dtype.kind == "f" and np.isfinite(values).all() and (values == np.round(values)).all():
        values = values.astype(np.int64)
    if values.dtype.kind not in "biu":
        raise DatasetError(f"{what} must hold integers (class indices), got dtype {values.dtype}")
    values = values.astype(np.int64)
    if values.min() < 0:
        raise DatasetError(f"{what} must be class indices 0..k-1 (binary: 0/1), found {int(values.min())}")
    return values


def _split_names(split: np.ndarray, n: int) -> np.ndarray:
    if split.dtype.kind == "S":
        split = np.char.decode(split, "ascii", errors="replace")
    if split.dtype.kind != "U" or split.ndim != 1 or len(split) != n:
        raise DatasetError(
            f"split must be {n} strings such as 'train' and 'test', got dtype {split.dtype}, shape {list(split.shape)}"
        )
    for value in np.unique(split):
        check_split_name(value)
    return split


def check_split_name(value: str, where: str = "") -> str:
    """A split name of 1-64 plain characters (it names metrics and files), else a `DatasetError` at `where`."""
    if not SPLIT_NAME.match(value):
        raise DatasetError(f"{where}a split name must be 1-64 letters, digits, '_', '-' or '.'")
    return value
