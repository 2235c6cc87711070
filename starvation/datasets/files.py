"""A user's files, read with care: `DatasetError` for what is refused, and `ImageFiles`, an image folder's split
read per batch (the `x` of a streaming `Split`) from its `ImageSource`: a local folder (`FolderSource`) or anything
else that reads an image's bytes by its path relative to the folder (the service's object store,
core/object_images.py). Below `base`, `user` and `images`, which all need them."""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import pickle
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, Protocol

import numpy as np
import torch

from starvation.errors import SpecError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_BATCH = 256  # images per batch when a consumer reads a whole split (evaluation, audits)
MAX_IMAGE_PIXELS = 50_000_000  # one image (150 MB as RGB); below Pillow's own 89M warning, so ours decides


class DatasetError(SpecError):
    """A user's dataset is refused: `code` is "invalid_dataset", or "too_large" for a size limit."""

    code = "invalid_dataset"


class ImageHead(NamedTuple):
    """What a source answers for an image the check reads: a file holding at least its header, its size in bytes
    and its version (None where the source knows neither: a local folder)."""

    handle: BinaryIO
    size: int | None
    version: str | None


class ImageSource(Protocol):
    """Where an image folder's files are read from, by paths relative to the folder. Picklable and comparable:
    DataLoader workers get a copy, and splits of one folder are pooled. `open` raises OSError for an image it cannot
    read (missing, say), which the row's error names; anything else it raises (a store that stays down, an image
    changed since `version`) ends the read as it is."""

    @property
    def threads(self) -> int:
        """Images one process reads at once (1: one after the other; a store's reads wait on the network)."""
        ...

    def refuses(self, relative: str) -> str | None:
        """Why `relative` names nothing inside the folder (a reason that never repeats it), or None."""
        ...

    def head(self, relative: str, where: str) -> tuple[BinaryIO, int | None, str | None]:
        """An `ImageHead` (or a plain tuple of the same): a source below the science package cannot name it."""
        ...

    def open(self, relative: str, where: str, version: str | None) -> BinaryIO:
        """The whole image, as it was at `version` when that is given."""
        ...


@dataclass(frozen=True)
class FolderSource:
    """An image folder on this host's disk: a path is refused once it resolves outside `root` (`..`, a link)."""

    root: pathlib.Path
    threads: int = 1

    def refuses(self, relative: str) -> str | None:
        return None  # `open` resolves the path, links included, and refuses it there

    def head(self, relative: str, where: str) -> ImageHead:
        return ImageHead(self.open(relative, where, None), None, None)

    def open(self, relative: str, where: str, version: str | None) -> BinaryIO:
        return open_regular(inside(self.root, relative, where), f"{where}: the image")


def source_of(folder: str | pathlib.Path | ImageSource) -> ImageSource:
    """A folder's source: a local path read as a `FolderSource`, any other source as it is."""
    return FolderSource(pathlib.Path(folder).resolve()) if isinstance(folder, (str, os.PathLike)) else folder


@dataclass(frozen=True, eq=False)
class ImageFiles:
    """A split's images as files: `x` of a streaming `Split`. Indexing gives a subset (still files); `batches_of`
    reads them. Each image is read as RGB and resized to `size` (height, width): float32 CHW in [0, 1]."""

    source: ImageSource
    paths: np.ndarray  # str, relative to the folder
    size: tuple[int, int]
    max_pixels: int = MAX_IMAGE_PIXELS
    workers: int = 0  # DataLoader worker processes reading batches (0: read in this process)
    pin_memory: bool = False  # page-locked batches, for a copy to a GPU that does not make the host wait
    counterfactuals: np.ndarray | None = None  # str, per row the same image with only the attribute changed
    versions: np.ndarray | None = None  # str, per row the image's version when it was checked (a store's ETag)
    counterfactual_versions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, ...]:
        """What the images read as: [N, 3, height, width], as a tensor's shape."""
        return (len(self.paths), 3, *self.size)

    def __getitem__(self, rows) -> ImageFiles:
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()

        def picked(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else np.atleast_1d(values[rows])

        return dataclasses.replace(
            self,
            paths=np.atleast_1d(self.paths[rows]),
            counterfactuals=picked(self.counterfactuals),
            versions=picked(self.versions),
            counterfactual_versions=picked(self.counterfactual_versions),
        )

    def swapped(self) -> ImageFiles:
        """The counterfactual images in place of these (and these as theirs)."""
        if self.counterfactuals is None:
            raise NotImplementedError("these images have no counterfactuals (no counterfactual column in the CSV)")
        return dataclasses.replace(
            self,
            paths=self.counterfactuals,
            counterfactuals=self.paths,
            versions=self.counterfactual_versions,
            counterfactual_versions=self.versions,
        )

    def read(self, index: int, opened: Callable[[], BinaryIO] | None = None) -> torch.Tensor:
        """Image `index`, from the handle `opened` gives (`opened_now`), or opened here."""
        relative = str(self.paths[index])
        where = f"image {relative!r}"  # one the check passed: a job's owner learns which went missing since
        size = (self.size[1], self.size[0])
        rgb = decode_image(opened or (lambda: self.open(index, where)), size, self.max_pixels, where)
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0)

    def open(self, index: int, where: str) -> BinaryIO:
        relative = str(self.paths[index])
        if (reason := self.source.refuses(relative)) is not None:
            raise DatasetError(f"{where}: {reason}")
        return self.source.open(relative, where, None if self.versions is None else str(self.versions[index]))

    def opened_now(self, index: int) -> Callable[[], BinaryIO]:
        """Image `index` opened now (its bytes read, in a reader thread), for `read` to decode later: a callable that
        returns the handle, or raises what opening it raised."""
        try:
            handle = self.open(index, f"image {str(self.paths[index])!r}")
        except Exception as error:
            failure = error

            def failed() -> BinaryIO:
                raise failure

            return failed
        return lambda: handle

    def load(self) -> torch.Tensor:
        """Every image as one tensor: for a few rows only (a check, a plot)."""
        return torch.stack([self.read(i) for i in range(len(self))]) if len(self) else torch.empty(0, 3, *self.size)

    def loader(self, batch_rows: Iterable[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images [B, 3, H, W], rows [B]) for each list of rows `batch_rows` yields, in its order. An image that
        cannot be read raises its own error here, as it was raised where it was read (a DataLoader worker's would
        otherwise come back as its type around a traceback's text)."""
        loader = torch.utils.data.DataLoader(
            _Reader(self),
            batch_sampler=batch_rows,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            collate_fn=_collate,
        )
        for batch in loader:
            if isinstance(batch, _Failed):
                raise batch.error
            yield batch

    @staticmethod
    def cat(parts: Sequence[ImageFiles]) -> ImageFiles:
        first = parts[0]
        if any((p.source, p.size) != (first.source, first.size) for p in parts):
            raise ValueError("only image files of one folder and one size are pooled")

        def joined(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        return dataclasses.replace(
            first,
            paths=np.concatenate([p.paths for p in parts]),
            counterfactuals=joined("counterfactuals"),
            versions=joined("versions"),
            counterfactual_versions=joined("counterfactual_versions"),
        )


class _Failed:
    """An image's error, carried back from a DataLoader worker whole (its type, code and message)."""

    def __init__(self, error: Exception) -> None:
        try:
            pickle.dumps(error)
        except Exception:  # a foreign error that cannot travel: its type says enough
            error = RuntimeError(f"an image could not be read ({type(error).__name__})")
        self.error = error


class _Reader(torch.utils.data.Dataset):
    def __init__(self, files: ImageFiles) -> None:
        self.files = files
        self.pool: tuple[int, ThreadPoolExecutor] | None = None  # this process's readers, made at the first batch

    def __getstate__(self) -> dict:
        return {"files": self.files, "pool": None}  # a loader process makes its own

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | _Failed, int]:
        return self.decoded(index, None)

    def decoded(self, index: int, opened: Callable[[], BinaryIO] | None) -> tuple[torch.Tensor | _Failed, int]:
        try:
            return (self.files.read(index) if opened is None else self.files.read(index, opened)), index
        except Exception as error:
            return _Failed(error), index

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor | _Failed, int]]:
        """A batch's images: with a source that reads several at once (a store's reads wait on the network), their
        bytes read `source.threads` at a time, then decoded one after the other in this thread (decoding holds the
        interpreter: more threads would only take turns)."""
        if self.files.source.threads <= 1 or len(indices) == 1:
            return [self[index] for index in indices]
        if self.pool is None or self.pool[0] != os.getpid():  # forked with the parent's: its threads are not here
            self.pool = (os.getpid(), ThreadPoolExecutor(self.files.source.threads))
        opened = list(self.pool[1].map(self.files.opened_now, indices))
        return [self.decoded(index, handle) for index, handle in zip(indices, opened)]


def _collate(items: list[tuple[torch.Tensor | _Failed, int]]) -> tuple[torch.Tensor, torch.Tensor] | _Failed:
    for image, _ in items:
        if isinstance(image, _Failed):
            return image
    return torch.utils.data.default_collate(items)


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


def decode_image(
    open_image: Callable[[], BinaryIO], size: tuple[int, int] | None, max_pixels: int, where: str
) -> Image.Image | None:
    """The image `open_image()` opens, as RGB resized to `size` (width, height); its pixel count checked before
    decoding. `size` None: the header alone is read and checked (None returned). An image that cannot be opened
    (OSError) or decoded is a `DatasetError` at `where`; whatever else `open_image` raises is raised as it is."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own check agrees: a warning past it, an error past twice it
    try:
        opened = open_image()
    except OSError as error:  # missing, unreadable: the row's fault, named as such (never with its path)
        raise DatasetError(f"{where}: cannot read the image ({error.strerror or type(error).__name__})") from None
    try:
        with opened as handle, Image.open(handle) as image:  # header only
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
