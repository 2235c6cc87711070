"""Image folders that stream: a metadata CSV is checked once into an index, and images are read from disk per batch.

`index_image_folder` reads the CSV (path, label, attribute[, split][, counterfactual]), refuses any row whose path
leaves the folder, is missing, is not an image or is over the pixel limit (every image's header is read; a sample,
or all of a small folder, is decoded in full), and returns an `ImageIndex`: the rows as arrays, saved with
`save_index` and read back with `load_index` (plain arrays, no pickle). `open_image_folder` turns an index into a
`Dataset` whose splits hold `ImageFiles` as their `x`: paths, read and resized with Pillow when a batch is asked for
(`batches_of`, through a `torch.utils.data.DataLoader` with `workers` processes). Memory holds batches, never the
folder, so it does not grow with the number of images.

A `counterfactual` column names, per row, the same image with only the attribute changed (Waterbirds with its bird
pasted on the other background, say); with it, the dataset can intervene (the audit's counterfactual probe).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import pathlib
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from starvation.datasets.base import Dataset, Split
from starvation.datasets.user import ALL, MAX_IMAGE_PIXELS, DatasetError, _int, _train_and_test, check_split_name

COLUMNS = ("path", "label", "attribute")  # required; `split` and `counterfactual` are optional
DECODED_SAMPLE = 256  # images decoded in full at registration (all of them in a folder this small or smaller)
IMAGE_BATCH = 256  # images per batch when a consumer reads a whole split (evaluation, audits)
MAX_ROWS = 2_000_000  # images one CSV may list (CelebA: 202,599); the check holds ~200 bytes a row
MAX_PATH_CHARS = 1_024  # one path in the CSV


@dataclass(frozen=True)
class ImageIndex:
    """A checked metadata CSV: one entry per row, in the CSV's order."""

    paths: np.ndarray  # str, relative to the folder
    labels: np.ndarray  # int64
    attributes: np.ndarray  # int64
    splits: np.ndarray  # str
    counterfactuals: np.ndarray | None = None  # str, relative paths, or None without the column

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


@dataclass(frozen=True, eq=False)
class ImageFiles:
    """A split's images as files: `x` of a streaming `Split`. Indexing gives a subset (still files); `batches_of`
    reads them. Each image is read as RGB and resized to `size` (height, width): float32 CHW in [0, 1]."""

    root: pathlib.Path
    paths: np.ndarray  # str, relative to root
    size: tuple[int, int]
    max_pixels: int = MAX_IMAGE_PIXELS
    workers: int = 0  # DataLoader worker processes reading batches (0: read in this process)
    pin_memory: bool = False  # page-locked batches, for a copy to a GPU that does not make the host wait
    counterfactuals: np.ndarray | None = None  # str, per row the same image with only the attribute changed

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, ...]:
        """What the images read as: [N, 3, height, width], as a tensor's shape."""
        return (len(self.paths), 3, *self.size)

    def __getitem__(self, rows) -> ImageFiles:
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        swapped = None if self.counterfactuals is None else np.atleast_1d(self.counterfactuals[rows])
        return dataclasses.replace(self, paths=np.atleast_1d(self.paths[rows]), counterfactuals=swapped)

    def swapped(self) -> ImageFiles:
        """The counterfactual images in place of these (and these as theirs)."""
        if self.counterfactuals is None:
            raise NotImplementedError("these images have no counterfactuals (no counterfactual column in the CSV)")
        return dataclasses.replace(self, paths=self.counterfactuals, counterfactuals=self.paths)

    def read(self, index: int) -> torch.Tensor:
        relative = str(self.paths[index])
        where = f"image {relative!r}"  # one the check passed: a job's owner learns which went missing since
        rgb = _read_image(_inside(self.root, relative, where), (self.size[1], self.size[0]), self.max_pixels, where)
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0)

    def load(self) -> torch.Tensor:
        """Every image as one tensor: for a few rows only (a check, a plot)."""
        return torch.stack([self.read(i) for i in range(len(self))]) if len(self) else torch.empty(0, 3, *self.size)

    def loader(self, batch_rows: Iterable[Sequence[int]]) -> torch.utils.data.DataLoader:
        """(images [B, 3, H, W], rows [B]) for each list of rows `batch_rows` yields, in its order."""
        return torch.utils.data.DataLoader(
            _Reader(self),
            batch_sampler=batch_rows,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )

    @staticmethod
    def cat(parts: Sequence[ImageFiles]) -> ImageFiles:
        first = parts[0]
        if any((p.root, p.size) != (first.root, first.size) for p in parts):
            raise ValueError("only image files of one folder and one size are pooled")
        swapped = (
            None
            if any(p.counterfactuals is None for p in parts)
            else np.concatenate([p.counterfactuals for p in parts])
        )
        return dataclasses.replace(first, paths=np.concatenate([p.paths for p in parts]), counterfactuals=swapped)


class _Reader(torch.utils.data.Dataset):
    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.files.read(index), index


def batches_of(x: torch.Tensor | ImageFiles, batch_size: int) -> Iterator[torch.Tensor]:
    """`x` in order, `batch_size` rows at a time (image files: at most IMAGE_BATCH, read as they are needed)."""
    if isinstance(x, ImageFiles):
        size = min(batch_size, IMAGE_BATCH)
        chunks = [range(i, min(i + size, len(x))) for i in range(0, len(x), size)]
        for images, _ in x.loader(chunks):
            yield images
        return
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


def batched(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor | ImageFiles,
    device: torch.device | str,
    batch_size: int,
) -> torch.Tensor:
    """`fn` over `x` in batches on `device`; the results concatenated on the CPU."""
    outs = [fn(batch.to(device)).cpu() for batch in batches_of(x, batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


# ---- registration: the CSV checked into an index ----------------------------------------------------------------


def index_image_folder(
    root: str | pathlib.Path,
    csv_path: str | pathlib.Path,
    *,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    decoded_sample: int = DECODED_SAMPLE,
    max_rows: int = MAX_ROWS,
    time_limit_s: float | None = None,
) -> ImageIndex:
    """The CSV's rows checked: every path inside `root` (at most MAX_PATH_CHARS) and a regular file Pillow can open
    as an image within the pixel limit (its header read), `decoded_sample` images spread over the folder decoded in
    full, labels and attributes class indices, split names short and plain, a binary attribute where there is a
    `counterfactual` column, at most `max_rows` rows (read one at a time), all within `time_limit_s` seconds.
    Raises `DatasetError` naming the line."""
    root = pathlib.Path(root).resolve()
    paths, labels, attributes, splits, counterfactuals, lines = [], [], [], [], [], []
    has_counterfactual = False
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    for number, row in _csv_rows(pathlib.Path(csv_path)):
        where = f"metadata CSV line {number}"
        _within(deadline, time_limit_s, where)
        if len(paths) == max_rows:
            raise DatasetError(f"{where}: the CSV lists more than {max_rows:,} images, the limit", code="too_large")
        has_counterfactual = "counterfactual" in row
        relative = _path_of(root, row["path"], where, max_image_pixels)
        if has_counterfactual:
            counterfactuals.append(
                _path_of(root, row.get("counterfactual", ""), f"{where}: counterfactual", max_image_pixels)
            )
        label, attribute = _int(row["label"], f"{where}: label"), _int(row["attribute"], f"{where}: attribute")
        if label < 0 or attribute < 0:
            raise DatasetError(f"{where}: label and attribute must be class indices 0..k-1 (not negative)")
        if has_counterfactual and attribute > 1:
            raise DatasetError(f"{where}: a counterfactual swaps a binary attribute (0/1); this attribute is above 1")
        split = check_split_name(row.get("split") or ALL, f"{where}: ")
        paths.append(relative)
        labels.append(label)
        attributes.append(attribute)
        splits.append(split)
        lines.append(number)
    if not paths:
        raise DatasetError("the metadata CSV lists no images")
    for index in _spread(len(paths), decoded_sample):  # headers can be whole while the pixels are cut short
        _within(deadline, time_limit_s, f"metadata CSV line {lines[index]}")
        _read_image(root / paths[index], (8, 8), max_image_pixels, f"metadata CSV line {lines[index]}")
    return ImageIndex(
        paths=_strings(paths),
        labels=np.array(labels, dtype=np.int64),
        attributes=np.array(attributes, dtype=np.int64),
        splits=np.array(splits),
        counterfactuals=_strings(counterfactuals) if has_counterfactual else None,
    )


def _path_of(root: pathlib.Path, relative: str, where: str, max_pixels: int) -> str:
    """`relative` once it is short, stays inside `root` and names an image whose header is within the limits."""
    if len(relative) > MAX_PATH_CHARS:
        raise DatasetError(f"{where}: a path of {len(relative)} characters; the limit is {MAX_PATH_CHARS}")
    _read_image(_inside(root, relative, where), None, max_pixels, where)
    return relative


def _within(deadline: float | None, time_limit_s: float | None, where: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DatasetError(
            f"{where}: the check ran past its limit of {time_limit_s:g} s; "
            "a folder this large needs a longer limit (or fewer images)",
            code="too_large",
        )


def _strings(values: list[str]) -> np.ndarray:
    """Python strings in an object array: as long as each string, where numpy's fixed-width "U" would give every row
    the width of the longest."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def save_index(index: ImageIndex, path: str | pathlib.Path) -> None:
    """Plain arrays only (strings as UTF-8 bytes and offsets), so `load_index` needs no pickle."""
    arrays = {"labels": index.labels, "attributes": index.attributes, "splits": index.splits}
    for name in ("paths", "counterfactuals"):
        values = getattr(index, name)
        if values is not None:
            encoded = [value.encode("utf-8") for value in values]
            arrays[f"{name}_utf8"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
            arrays[f"{name}_ends"] = np.cumsum([len(value) for value in encoded], dtype=np.int64)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_index(path: str | pathlib.Path) -> ImageIndex:
    with np.load(path, allow_pickle=False) as archive:
        fields = {name: archive[name] for name in ("labels", "attributes", "splits")}
        for name in ("paths", "counterfactuals"):
            if f"{name}_utf8" in archive.files:
                data, ends = archive[f"{name}_utf8"].tobytes(), archive[f"{name}_ends"].tolist()
                fields[name] = _strings([data[a:b].decode("utf-8") for a, b in zip([0, *ends[:-1]], ends)])
    return ImageIndex(**fields)


def open_image_folder(
    root: str | pathlib.Path,
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
        root=pathlib.Path(root).resolve(),
        paths=index.paths,
        size=(height, width),
        max_pixels=max_image_pixels,
        workers=workers,
        pin_memory=pin_memory,
        counterfactuals=index.counterfactuals,
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
    train, test = _train_and_test(names)
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
        return self.splits[self.test_split].x.counterfactuals is not None

    def intervene(self, split: Split) -> Split:
        return Split(
            name=f"{split.name}_intervened", x=split.x.swapped(), y=split.y.clone(), attribute=1 - split.attribute
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


def open_regular(path: pathlib.Path, what: str) -> io.BufferedReader:
    """`path` opened for reading if it is a regular file, checked on the open descriptor (so nothing swapped in after a
    check gets through); O_NONBLOCK keeps the open of a FIFO from waiting for a writer that never comes."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise DatasetError(f"{what} is not a regular file (a FIFO, device, socket or folder is never read)")
        os.set_blocking(descriptor, True)
        return open(descriptor, "rb", closefd=True)
    except BaseException:
        os.close(descriptor)
        raise


def _inside(root: pathlib.Path, relative: str, where: str) -> pathlib.Path:
    if not relative or pathlib.PurePath(relative).is_absolute():
        raise DatasetError(f"{where}: the path must be relative to the image folder")
    try:
        path = (root / relative).resolve()
    except (ValueError, OSError) as error:  # a NUL byte, a loop of links: the row's fault, named as such
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise DatasetError(f"{where}: the path is not a usable path ({reason})") from None
    if not path.is_relative_to(root):
        raise DatasetError(f"{where}: the path leaves the image folder")
    return path


def _read_image(path: pathlib.Path, size: tuple[int, int] | None, max_pixels: int, where: str):
    """The image at `path` as RGB resized to `size` (width, height); its pixel count checked before decoding.
    `size` None: the header alone is read and checked (None returned). Any failure is a `DatasetError` at `where`."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own check agrees: a warning past it, an error past twice it
    try:
        with open_regular(path, f"{where}: the image") as handle, Image.open(handle) as image:  # header only
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise DatasetError(
                    f"{where}: the image is {image.width}x{image.height} = {pixels} pixels; "
                    f"the limit is {max_pixels} (a decompression bomb, or a photo to shrink first)",
                    code="too_large",
                )
            return None if size is None else image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    except DatasetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # Pillow's (warnings as errors)
        raise DatasetError(
            f"{where}: the image is refused as a decompression bomb ({error})", code="too_large"
        ) from None
    except Exception as error:
        # a decoder's own text may quote the file's path or bytes: the type says enough
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise DatasetError(f"{where}: cannot read the image ({reason})") from None
