"""Image folders that stream: a metadata CSV is checked once into an index, and images are read per batch.

`index_image_folder` reads the CSV (path, label, attribute[, split][, counterfactual]), refuses any row whose path
leaves the folder, is missing, is not an image or is over the pixel limit (every image's header is read; a sample,
or all of a small folder, is decoded in full), and returns an `ImageIndex`: the rows as arrays, saved with
`save_index` and read back with `load_index` (plain arrays, no pickle). The folder is a local path or any
`ImageSource` (files.py): one that knows each image's size and version (an object store's ETag) has them checked
against `max_image_bytes` and recorded in the index, so that a job reads each image as it was checked.
`open_image_folder` turns an index into a `Dataset` whose splits hold `ImageFiles` as their `x`: paths, read and
resized with Pillow when a batch is asked for (`batches_of`, through a `torch.utils.data.DataLoader` with `workers`
processes). Memory holds batches, never the folder, so it does not grow with the number of images.

A `counterfactual` column names, per row, the same image with only the attribute changed (Waterbirds with its bird
pasted on the other background, say); with it, the dataset can intervene (the audit's counterfactual probe).
"""

from __future__ import annotations

import csv
import io
import itertools
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch

from starvation.datasets.base import Dataset, Split
from starvation.datasets.files import (
    MAX_IMAGE_PIXELS,
    DatasetError,
    ImageFiles,
    ImageHead,
    ImageSource,
    decode_image,
    open_regular,
    source_of,
)
from starvation.datasets.user import ALL, check_split_name, train_and_test_splits

COLUMNS = ("path", "label", "attribute")  # required; `split` and `counterfactual` are optional
DECODED_SAMPLE = 256  # images decoded in full at registration (all of them in a folder this small or smaller)
MAX_ROWS = 2_000_000  # images one CSV may list (CelebA: 202,599); the check holds ~200 bytes a row
MAX_PATH_CHARS = 1_024  # one path in the CSV
ROWS_AT_ONCE = 256  # rows whose images a source that reads `threads` at once has in flight
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ImageIndex:
    """A checked metadata CSV: one entry per row, in the CSV's order."""

    paths: np.ndarray  # str, relative to the folder
    labels: np.ndarray  # int64
    attributes: np.ndarray  # int64
    splits: np.ndarray  # str
    counterfactuals: np.ndarray | None = None  # str, relative paths, or None without the column
    # Where the source knows them (an object store): each image's version (ETag) and size as the check read them.
    versions: np.ndarray | None = None  # str
    sizes: np.ndarray | None = None  # int64 bytes
    counterfactual_versions: np.ndarray | None = None  # str

    def summary(self) -> dict:
        """Counts per split and per (label, attribute) group within each split."""
        out = {}
        for split in dict.fromkeys(self.splits.tolist()):
            rows = self.splits == split
            pairs, counts = np.unique(np.stack([self.labels[rows], self.attributes[rows]]), axis=1, return_counts=True)
            out[split] = {
                "n": int(rows.sum()),
                "groups": [
                    {"label": int(label), "attribute": int(attribute), "n": int(n)}
                    for (label, attribute), n in zip(pairs.T, counts)
                ],
            }
        return out


# ---- registration: the CSV checked into an index ----------------------------------------------------------------


def index_image_folder(
    root: str | pathlib.Path | ImageSource,
    csv_path: str | pathlib.Path,
    *,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_image_bytes: int | None = None,
    decoded_sample: int = DECODED_SAMPLE,
    max_rows: int = MAX_ROWS,
    time_limit_s: float | None = None,
) -> ImageIndex:
    """The CSV's rows checked: every path inside `root` (at most MAX_PATH_CHARS) and a regular file Pillow can open
    as an image within the pixel limit (its header read) and, where the source knows its size, `max_image_bytes`;
    `decoded_sample` images spread over the folder decoded in full, labels and attributes class indices, split names
    short and plain, a binary attribute where there is a `counterfactual` column, at most `max_rows` rows (read one
    at a time), all within `time_limit_s` seconds. Raises `DatasetError` naming the line."""
    source = source_of(root)
    paths: list[str] = []
    counterfactuals: list[str] = []
    labels: list[int] = []
    attributes: list[int] = []
    lines: list[int] = []
    splits: list[str] = []
    versions: list[str | None] = []
    sizes: list[int | None] = []
    counterfactual_versions: list[str | None] = []
    has_counterfactual = False
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s

    def headed(numbered: tuple[int, dict[str, str]]) -> tuple[ImageHeadFound, ImageHeadFound | None]:
        number, row = numbered
        where = f"metadata CSV line {number}"
        found = _path_of(source, row["path"], where, max_image_pixels, max_image_bytes)
        if "counterfactual" not in row:
            return found, None
        return found, _path_of(
            source, row.get("counterfactual", ""), f"{where}: counterfactual", max_image_pixels, max_image_bytes
        )

    rows = _limited(_csv_rows(pathlib.Path(csv_path)), max_rows, deadline, time_limit_s)
    for (number, row), (found, swapped) in _in_order(headed, rows, source.threads):
        where = f"metadata CSV line {number}"
        has_counterfactual = swapped is not None
        label, attribute = (
            _label_int(row["label"], f"{where}: label"),
            _label_int(row["attribute"], f"{where}: attribute"),
        )
        if label < 0 or attribute < 0:
            raise DatasetError(f"{where}: label and attribute must be class indices 0..k-1 (not negative)")
        if has_counterfactual and attribute > 1:
            raise DatasetError(f"{where}: a counterfactual swaps a binary attribute (0/1); this attribute is above 1")
        split = check_split_name(row.get("split") or ALL, f"{where}: ")
        paths.append(found.relative)
        versions.append(found.version)
        sizes.append(found.size)
        if swapped is not None:
            counterfactuals.append(swapped.relative)
            counterfactual_versions.append(swapped.version)
        labels.append(label)
        attributes.append(attribute)
        splits.append(split)
        lines.append(number)
    if not paths:
        raise DatasetError("the metadata CSV lists no images")

    def decoded(index: int) -> None:  # headers can be whole while the pixels are cut short
        where = f"metadata CSV line {lines[index]}"
        _within(deadline, time_limit_s, where)
        decode_image(lambda: source.open(paths[index], where, versions[index]), (8, 8), max_image_pixels, where)

    for _ in _in_order(decoded, _spread(len(paths), decoded_sample), source.threads):
        pass
    known = None not in versions and None not in counterfactual_versions
    return ImageIndex(
        paths=_strings(paths),
        labels=np.array(labels, dtype=np.int64),
        attributes=np.array(attributes, dtype=np.int64),
        splits=np.array(splits),
        counterfactuals=_strings(counterfactuals) if has_counterfactual else None,
        versions=_strings(versions) if known else None,
        sizes=np.array(sizes, dtype=np.int64) if None not in sizes else None,
        counterfactual_versions=_strings(counterfactual_versions) if known and has_counterfactual else None,
    )


@dataclass(frozen=True)
class ImageHeadFound:
    relative: str
    size: int | None
    version: str | None


def _path_of(source: ImageSource, relative: str, where: str, max_pixels: int, max_bytes: int | None) -> ImageHeadFound:
    """`relative` once it is short, stays inside the folder and names an image whose header is within the limits."""
    if len(relative) > MAX_PATH_CHARS:
        raise DatasetError(f"{where}: a path of {len(relative)} characters; the limit is {MAX_PATH_CHARS}")
    if (reason := source.refuses(relative)) is not None:
        raise DatasetError(f"{where}: {reason}")  # never the value: it may be anything the CSV's author typed
    found: list[ImageHead] = []

    def opened() -> BinaryIO:
        head = ImageHead(*source.head(relative, where))
        if head.size is not None and max_bytes is not None and head.size > max_bytes:
            head.handle.close()
            raise DatasetError(f"{where}: the image is {head.size} bytes; the limit is {max_bytes}", code="too_large")
        found.append(head)
        return head.handle

    decode_image(opened, None, max_pixels, where)
    return ImageHeadFound(relative, found[0].size, found[0].version)


def _limited(
    rows: Iterator[tuple[int, dict[str, str]]], max_rows: int, deadline: float | None, time_limit_s: float | None
) -> Iterator[tuple[int, dict[str, str]]]:
    for count, (number, row) in enumerate(rows):
        where = f"metadata CSV line {number}"
        _within(deadline, time_limit_s, where)
        if count == max_rows:
            raise DatasetError(f"{where}: the CSV lists more than {max_rows:,} images, the limit", code="too_large")
        yield number, row


def _in_order(work: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[tuple[T, R]]:
    """(item, work(item)) in the items' order, `threads` items in flight at once (1: one after the other); the
    first error in that order is raised, as if they had run one at a time."""
    if threads <= 1:
        for item in items:
            yield item, work(item)
        return
    iterator, stopped = iter(items), None
    with ThreadPoolExecutor(threads) as pool:
        while stopped is None:
            chunk: list[T] = []
            try:
                chunk.extend(itertools.islice(iterator, ROWS_AT_ONCE))
            except DatasetError as error:  # the items before it come first, as one at a time
                stopped = error
            if not chunk and stopped is None:
                return
            yield from zip(chunk, pool.map(work, chunk))
            if len(chunk) < ROWS_AT_ONCE and stopped is None:
                return
        raise stopped


def _within(deadline: float | None, time_limit_s: float | None, where: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DatasetError(
            f"{where}: the check ran past its limit of {time_limit_s:g} s; "
            "a folder this large needs a longer limit (or fewer images)",
            code="too_large",
        )


def _strings(values: Sequence[str | None]) -> np.ndarray:
    """Python strings in an object array: as long as each string, where numpy's fixed-width "U" would give every row
    the width of the longest."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


STRING_FIELDS = ("paths", "counterfactuals", "versions", "counterfactual_versions")


def save_index(index: ImageIndex, path: str | pathlib.Path) -> None:
    """Plain arrays only (strings as UTF-8 bytes and offsets), so `load_index` needs no pickle."""
    arrays: dict[str, Any] = {"labels": index.labels, "attributes": index.attributes, "splits": index.splits}
    if index.sizes is not None:
        arrays["sizes"] = index.sizes
    for name in STRING_FIELDS:
        values = getattr(index, name)
        if values is not None:
            encoded = [value.encode("utf-8") for value in values]
            arrays[f"{name}_utf8"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
            arrays[f"{name}_ends"] = np.cumsum([len(value) for value in encoded], dtype=np.int64)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_index(path: str | pathlib.Path) -> ImageIndex:
    with np.load(path, allow_pickle=False) as archive:
        fields = {name: archive[name] for name in ("labels", "attributes", "splits", "sizes") if name in archive.files}
        for name in STRING_FIELDS:
            if f"{name}_utf8" in archive.files:
                data, ends = archive[f"{name}_utf8"].tobytes(), archive[f"{name}_ends"].tolist()
                fields[name] = _strings([data[a:b].decode("utf-8") for a, b in zip([0, *ends[:-1]], ends)])
    return ImageIndex(**fields)


def open_image_folder(
    root: str | pathlib.Path | ImageSource,
    index: ImageIndex,
    name: str,
    image_size: int | tuple[int, int],
    *,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    workers: int = 0,
    pin_memory: bool = False,
) -> ImageFolderDataset:
    """A streaming `Dataset` over a checked index: splits named as in the CSV ("train*" pooled for training)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if height <= 0 or width <= 0:
        raise DatasetError(f"image_size must be positive, got {image_size!r}")
    files = ImageFiles(
        source=source_of(root),
        paths=index.paths,
        size=(height, width),
        max_pixels=max_image_pixels,
        workers=workers,
        pin_memory=pin_memory,
        counterfactuals=index.counterfactuals,
        versions=index.versions,
        counterfactual_versions=index.counterfactual_versions,
    )
    names = list(dict.fromkeys(index.splits.tolist()))
    splits = {}
    for split_name in names:
        rows = np.flatnonzero(index.splits == split_name)
        splits[split_name] = Split(
            name=split_name,
            x=files[rows],
            y=torch.from_numpy(index.labels[rows]),
            attribute=torch.from_numpy(index.attributes[rows]),
        )
    train, test = train_and_test_splits(names)
    info = {
        "source": "image_folder",
        "image_size": [height, width],
        "n_examples": len(index.paths),
        "splits": {s: len(splits[s]) for s in names},
        "counterfactual": index.counterfactuals is not None,
    }
    return ImageFolderDataset(
        name=name,
        splits=splits,
        train_splits=train,
        test_split=test,
        num_classes=max(2, int(index.labels.max()) + 1),
        input_shape=(3, height, width),
        attribute_name="attribute",
        info=info,
    )


@dataclass
class ImageFolderDataset(Dataset):
    """An image folder's splits as files; it intervenes where the CSV names each image's counterfactual."""

    @property
    def can_intervene(self) -> bool:  # type: ignore[override]
        return self.splits[self.test_split].files.counterfactuals is not None

    def intervene(self, split: Split) -> Split:
        return Split(
            name=f"{split.name}_intervened", x=split.files.swapped(), y=split.y.clone(), attribute=1 - split.attribute
        )


def load_image_folder(
    root: str | pathlib.Path,
    csv_path: str | pathlib.Path,
    name: str,
    image_size: int | tuple[int, int],
    *,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    workers: int = 0,
) -> ImageFolderDataset:
    """`index_image_folder` then `open_image_folder`: a folder checked and opened in one call (notebooks, tests)."""
    index = index_image_folder(root, csv_path, max_image_pixels=max_image_pixels)
    return open_image_folder(root, index, name, image_size, max_image_pixels=max_image_pixels, workers=workers)


def _spread(count: int, sample: int) -> list[int]:
    """`sample` row numbers spread evenly over `count` rows (all of them when there are no more)."""
    if count <= sample:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, sample).round().astype(int).tolist()))


def _csv_rows(csv_path: pathlib.Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) one at a time, values stripped; the header must name the columns."""
    try:
        with io.TextIOWrapper(open_regular(csv_path, "the metadata CSV"), newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = sorted(set(COLUMNS) - set(reader.fieldnames or []))
            if missing:
                raise DatasetError(
                    f"metadata CSV lacks column(s) {', '.join(missing)}; "
                    "needs path, label, attribute and optionally split and counterfactual"
                )
            for row in reader:
                yield reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"cannot read the metadata CSV ({error})") from None


def _label_int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{what} must be an integer") from None
