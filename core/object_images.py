"""Image folders in an object store (docs/storage.md, "Image folders in the store"): `s3://BUCKET/PREFIX/` under a
prefix the operator lists in GS_DATA_URLS, on the store of GS_S3_ENDPOINT_URL with the AWS_* credentials.

- Which folders a caller may name (`granted_folder`): a key, `<listed prefix><key id>/...`; the admin token, anything
  under a listed prefix; as GS_DATA_DIR/<key id> bounds local folders. A URL is read strictly (plain segments, no
  `..`, `//`, percent-encoding, backslash or control character), never normalised into something else.
- `StoreImages`, the science package's `ImageSource` for such a folder: a CSV row's path is a key under the folder's
  prefix or refused (`key_refusal`); the check reads each image's first MiB with its size and ETag, refusing one
  over GS_MAX_IMAGE_BYTES before its body is read; a job reads each image whole with If-Match on the ETag its check
  recorded (a changed image: `ImageChanged`, never other bytes), `threads` at once per process, through the
  process's cache of objects (GS_VAR_DIR/cache, keyed by ETag). A store that does not answer is asked again every
  second for `patience_s`, then `StoreUnavailable`. It is picklable: its boto3 client is made in each process that
  reads (DataLoader workers fork).
"""

from __future__ import annotations

import errno
import io
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar

from core.settings import Settings
from core.storage import CHUNK, Cache, S3Store, StoredFileTooLarge, StoreUnavailable, quoted

HEAD_BYTES = 1 << 20  # what the check reads of each image: its header, or the whole of a small one
READ_PATIENCE_S = 120.0  # how long a read waits for a store that does not answer (as a job's writes do)
THREADS = 16  # images one process reads at once
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")  # one part of a folder's key; `.` and `..` are refused besides
REFUSED_IN_KEYS = re.compile(r"[\\%\x00-\x1f\x7f]")
T = TypeVar("T")


class ImageChanged(Exception):
    """An image is no longer the version its folder's check read: a job fails with `input_changed`."""


@dataclass(frozen=True)
class StoreFolder:
    bucket: str
    prefix: str  # "" (the whole bucket) or ending in "/"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, relative: str) -> str:
        return self.prefix + relative


def folder_of(url: str) -> StoreFolder | None:
    """The folder `url` names, read strictly (s3://, a bucket's name, `/`, plain segments, the last `/` optional);
    None for anything else."""
    bucket, slash, key = url.removeprefix("s3://").partition("/")
    if not url.startswith("s3://") or not slash or not BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        return None
    parts = key.removesuffix("/").split("/") if key else []
    if any(not SEGMENT.fullmatch(part) or part in (".", "..") for part in parts):
        return None
    return StoreFolder(bucket, "".join(f"{part}/" for part in parts))


def listed_prefixes(settings: Settings) -> list[StoreFolder]:
    """GS_DATA_URLS, each entry checked when the settings were read (core.settings)."""
    entries = [part.strip() for part in settings.data_urls.split(",") if part.strip()]
    return [found for url in entries if url.endswith("/") and (found := folder_of(url)) is not None]


def granted_folder(settings: Settings, url: str, *, owner_id: str, is_admin: bool) -> StoreFolder | None:
    """The folder `url` names when the caller may read it: under `<listed prefix><key id>/` (a key) or a listed
    prefix (the admin token); None otherwise, whatever the reason."""
    folder = folder_of(url)
    if folder is None:
        return None
    for listed in listed_prefixes(settings):
        grant = listed.prefix if is_admin else f"{listed.prefix}{owner_id}/"
        if folder.bucket == listed.bucket and folder.prefix.startswith(grant):  # both end in "/": whole segments
            return folder
    return None


def key_refusal(relative: str) -> str | None:
    """Why `relative` (a CSV row's path) is no key under its folder's prefix, in words that never repeat it."""
    if not relative:
        return "the path is empty"
    if relative.startswith("/"):
        return "the path must be relative to the image folder"
    if REFUSED_IN_KEYS.search(relative):
        return "the path holds a backslash, a percent sign or a control character, which no key here may"
    if any(part in ("", ".", "..") for part in relative.split("/")):
        return "the path names a key outside the image folder (an empty, `.` or `..` segment)"
    return None


class ImageCache(Cache):
    """The process's cache of objects (core.storage.Cache) for many small entries: instead of on every entry, the
    folder is trimmed once this process has added 1/64 of the bound since it last did, down to 7/8 of it, so that
    up to eight processes filling it at once keep it under the bound."""

    def __init__(self, folder: Path, limit: int) -> None:
        super().__init__(folder, limit)
        self.added = 0

    def trim(self, keep: Path, target: int | None = None) -> None:
        try:
            self.added += keep.stat().st_size
        except FileNotFoundError:
            return
        if self.added >= self.limit // 64:
            self.added = 0
            super().trim(keep, self.limit * 7 // 8 if target is None else target)


@dataclass(frozen=True)
class StoreImages:
    """An image folder in the object store, as the science package reads one (`starvation.datasets.ImageSource`)."""

    bucket: str
    prefix: str
    endpoint_url: str | None
    cache_dir: Path
    cache_bytes: int
    max_image_bytes: int
    patience_s: float = READ_PATIENCE_S
    cached: bool = True  # a worker keeps what it read; the API's check reads and keeps nothing
    threads: int = THREADS

    def refuses(self, relative: str) -> str | None:
        return key_refusal(relative)

    def head(self, relative: str, where: str) -> tuple[BinaryIO, int, str]:
        """(the image's first HEAD_BYTES, its size, its ETag): `starvation.datasets.files.ImageHead`."""

        def read() -> tuple[BinaryIO, int, str]:
            key = self.key(relative)
            try:
                with self.answering(where):
                    response = self.client().get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{HEAD_BYTES - 1}")
            except RangeNotSatisfiable:  # an empty object has no first byte
                with self.answering(where):
                    response = self.client().get_object(Bucket=self.bucket, Key=key)
            size, etag = total_size(response), str(response["ETag"]).strip('"')
            with closing_body(response) as body:
                if size > self.max_image_bytes:  # refused from its size: its body is never read
                    return io.BytesIO(), size, etag
                with self.answering(where):
                    return io.BytesIO(body.read()), size, etag

        return self.patiently(read)

    def open(self, relative: str, where: str, version: str | None) -> BinaryIO:
        key = self.key(relative)

        def download(into: BinaryIO) -> None:
            with self.answering(where):
                extra = {} if version is None else {"IfMatch": quoted(version)}
                response = self.client().get_object(Bucket=self.bucket, Key=key, **extra)
            with closing_body(response) as body:
                if int(response["ContentLength"]) > self.max_image_bytes:
                    raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
                with self.answering(where):
                    for chunk in body.iter_chunks(CHUNK):
                        into.write(chunk)

        def read() -> BinaryIO:
            if not self.cached or version is None:
                buffer = io.BytesIO()
                download(buffer)
                buffer.seek(0)
                return buffer

            def to_file(partial: Path) -> None:
                with partial.open("wb") as handle:
                    download(handle)

            entry = self.cache().get(f"s3://{self.bucket}/{key}\n{version}", PurePosixPath(key).suffix, to_file)
            return io.BytesIO(entry.read_bytes())  # the entry may be trimmed by another process once read

        return self.patiently(read)

    def key(self, relative: str) -> str:
        if key_refusal(relative) is not None:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return self.prefix + relative

    def client(self) -> Any:
        return connection(self).client

    def cache(self) -> ImageCache:
        return connection(self).cache

    @contextmanager
    def answering(self, where: str) -> Iterator[None]:
        """The store's answers as the science package reads them: a missing or forbidden image an OSError (the
        row's fault), a changed one `ImageChanged`, anything else `StoreUnavailable` (asked again)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)) from None
            if status == 403:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES)) from None
            if status == 412:
                raise ImageChanged(
                    f"{where}: the image changed in the store since the folder was checked; register the folder again"
                ) from None
            if status == 416:
                raise RangeNotSatisfiable() from None
            raise StoreUnavailable(f"the object store answered {status} {code}") from None
        except BotoCoreError as exc:  # unreachable, timed out, a broken connection
            raise StoreUnavailable(f"the object store did not answer: {type(exc).__name__}") from None

    def patiently(self, read: Callable[[], T]) -> T:
        """`read()`, asked again every second while the store does not answer, for up to `patience_s`."""
        started = time.monotonic()
        while True:
            try:
                return read()
            except StoreUnavailable:
                if time.monotonic() - started >= self.patience_s:
                    raise
                time.sleep(min(1.0, self.patience_s))


class RangeNotSatisfiable(Exception):
    """A ranged read of an empty object."""


class Connection:
    """One process's cache for a store's images, and its client, made at the first read the cache cannot answer."""

    def __init__(self, images: StoreImages) -> None:
        self.images, self.cache = images, ImageCache(images.cache_dir, images.cache_bytes)
        self.made: Any = None

    @property
    def client(self) -> Any:
        if self.made is None:
            with CONNECTING:
                if self.made is None:
                    kept = S3Store("unused", "", endpoint_url=self.images.endpoint_url, cache=self.cache,
                                   connections=self.images.threads)  # fmt: skip
                    self.made = kept.client
        return self.made


CONNECTIONS: dict[tuple[Any, ...], Connection] = {}
CONNECTING = threading.Lock()


def connection(images: StoreImages) -> Connection:
    """This process's connection for `images`' store: made on first use in each process, never inherited."""
    identity = (images.endpoint_url, images.threads, images.cache_dir, images.cache_bytes)
    if (found := CONNECTIONS.get(identity)) is not None:
        return found
    with CONNECTING:
        return CONNECTIONS.setdefault(identity, Connection(images))


def forget_connections() -> None:
    """In a forked child: the parent's connections (and the lock, maybe held by one of its threads) are not ours."""
    global CONNECTING
    CONNECTIONS.clear()
    CONNECTING = threading.Lock()


os.register_at_fork(after_in_child=forget_connections)


def total_size(response: dict[str, Any]) -> int:
    """An object's size from a GET's answer: a ranged one says it after the slash of Content-Range."""
    ranged = response.get("ContentRange")
    return int(ranged.rsplit("/", 1)[1]) if ranged else int(response["ContentLength"])


@contextmanager
def closing_body(response: dict[str, Any]) -> Iterator[Any]:
    body = response["Body"]
    try:
        yield body
    finally:
        body.close()


def images_in_store(
    settings: Settings, url: str, *, patience_s: float = READ_PATIENCE_S, cached: bool = True
) -> StoreImages:
    """The `ImageSource` of a folder a dataset row records (`StoreFolder.url`)."""
    folder = folder_of(url)
    if folder is None:
        raise ValueError("not an image folder in the store")
    return StoreImages(
        bucket=folder.bucket,
        prefix=folder.prefix,
        endpoint_url=settings.s3_endpoint_url,
        cache_dir=settings.var_dir / "cache",
        cache_bytes=settings.cache_bytes,
        max_image_bytes=settings.max_image_bytes,
        patience_s=patience_s,
        cached=cached,
    )


def is_store_folder(recorded: str) -> bool:
    return recorded.startswith("s3://")


def exists(images: StoreImages, relative: str) -> bool:
    """Whether the folder holds `relative` (a registration's metadata CSV); a store that does not answer raises."""
    try:
        with images.answering(relative):
            images.client().head_object(Bucket=images.bucket, Key=images.key(relative))
    except OSError:
        return False
    return True


def fetch_file(images: StoreImages, relative: str, into: Path, max_bytes: int) -> Path:
    """`relative` (a metadata CSV) copied to `into`; one larger than `max_bytes` is refused before it is read."""

    def download() -> Path:
        with images.answering(relative):
            response = images.client().get_object(Bucket=images.bucket, Key=images.key(relative))
        with closing_body(response) as body, into.open("wb") as handle:
            if (size := int(response["ContentLength"])) > max_bytes:
                raise StoredFileTooLarge(f"the metadata CSV is {size} bytes; the limit is {max_bytes}")
            with images.answering(relative):
                for chunk in body.iter_chunks(CHUNK):
                    handle.write(chunk)
        return into

    return images.patiently(download)
