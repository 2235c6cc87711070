"""A user's files, read with care: `DatasetError` for what is refused, and `ImageFiles`, an image folder's split
read from disk per batch (the `x` of a streaming `Split`). Below `base`, `user` and `images`, which all need them."""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from starvation.errors import SpecError

IMAGE_BATCH = 256  # images per batch when a consumer reads a whole split (evaluation, audits)
MAX_IMAGE_PIXELS = 50_000_000  # one image (150 MB as RGB); below Pillow's own 89M warning, so ours decides


class DatasetError(SpecError):
    """A user's dataset is refused: `code` is "invalid_dataset", or "too_large" for a size limit."""

    code = "invalid_dataset"


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
        rgb = read_image(inside(self.root, relative, where), (self.size[1], self.size[0]), self.max_pixels, where)
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0)

    def load(self) -> torch.Tensor:
        """Every image as one tensor: for a few rows only (a check, a plot)."""
        return torch.stack([self.read(i) for i in range(len(self))]) if len(self) else torch.empty(0, 3, *self.size)

    def loader(self, batch_rows: Iterable[list[int]]) -> torch.utils.data.DataLoader:
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
        chunks = [list(range(i, min(i + size, len(x)))) for i in range(0, len(x), size)]
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


def inside(root: pathlib.Path, relative: str, where: str) -> pathlib.Path:
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


def read_image(path: pathlib.Path, size: tuple[int, int] | None, max_pixels: int, where: str):
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
