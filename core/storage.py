"""Where the files one process writes for another live (uploads, a job's outputs, image-folder indexes, resume
state): a folder, GS_VAR_DIR/storage (unset GS_STORAGE_URL or file://..., the embedded default), or an
S3-compatible object store (GS_STORAGE_URL=s3://BUCKET/PREFIX; docs/storage.md). Keys are made from our ids only
(the `*_key` functions below); the database records the key. Rows written before keys recorded the absolute path of
the file under GS_VAR_DIR/storage: `key_of` reads both."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlparse

from core.settings import Settings

STORE_RETRY_AFTER_S = 10
CHUNK = 1 << 20
KEY = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class StoreUnavailable(Exception):
    """The store did not answer (down, too slow, refusing or failing the request): try again later."""


class ObjectChanged(StoreUnavailable):
    """An object replaced between reading its ETag and its bytes."""


class StoredFileMissing(FileNotFoundError):
    """No object under a key: a file a job or a download needs is gone (its message names our ids, never a path)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"The stored file {key} is missing.")
        self.key = key


class StoredFileTooLarge(Exception):
    """A stored input larger than the service would ever have stored: not read."""


def checkpoint_key(checkpoint_id: str, suffix: str) -> str:
    return f"checkpoints/{checkpoint_id}{suffix}"


def dataset_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}.npz"


def dataset_index_key(dataset_id: str) -> str:
    """An image folder's checked index: written by the API's check (api/dataset_checks.py), read by the worker."""
    return f"datasets/{dataset_id}.index.npz"


def job_key(job_id: str, relative: str = "") -> str:
    """A job's outputs, `relative` to its folder (`core.paths.job_dir`): written by the worker, served by the API."""
    return f"jobs/{job_id}/{relative}".rstrip("/")


def checked(key: str) -> str:
    if not KEY.fullmatch(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"not a storage key: {key!r}")
    return key


def key_of(settings: Settings, recorded: str) -> str:
    """The key a row recorded; an older row's absolute path under GS_VAR_DIR/storage read as its key."""
    if not os.path.isabs(recorded):
        return checked(recorded)
    path, root = Path(recorded).resolve(), settings.storage_dir.resolve()
    if not path.is_relative_to(root):
        raise StoredFileMissing("(outside the service's storage)")
    return checked(path.relative_to(root).as_posix())


@dataclass(frozen=True)
class Stat:
    size: int
    etag: str  # changes whenever the object's bytes do


class Store(Protocol):
    local: bool  # files live in this host's folder (the API may hand them to FileResponse)

    def put(self, key: str, path: Path, *, move: bool = False) -> None: ...
    def stat(self, key: str) -> Stat: ...
    def fetch(self, key: str) -> Path: ...
    def chunks(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...
    def keys(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str, *, keep: str | None = None) -> None: ...
    def presigned_get(self, key: str, *, expires_s: int, filename: str, media_type: str) -> str | None: ...


class FileStore:
    """Today's layout: the key is the path under GS_VAR_DIR/storage, which every process must share."""

    local = True

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / checked(key)

    def put(self, key: str, path: Path, *, move: bool = False) -> None:
        target = self.path(key)
        if path.resolve() == target.resolve():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
        (shutil.move if move else shutil.copyfile)(path, partial)
        partial.replace(target)

    def stat(self, key: str) -> Stat:
        try:
            found = self.path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise StoredFileMissing(key) from None
        return Stat(found.st_size, f"{found.st_mtime_ns}-{found.st_size}")

    def fetch(self, key: str) -> Path:
        if not self.path(key).is_file():
            raise StoredFileMissing(key)
        return self.path(key)

    def chunks(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        with self.fetch(key).open("rb") as handle:
            handle.seek(start)
            left = None if end is None else end - start
            while (chunk := handle.read(CHUNK if left is None else min(CHUNK, left))) != b"":
                yield chunk
                left = None if left is None else left - len(chunk)

    def keys(self, prefix: str) -> list[str]:
        folder = self.path(prefix)
        return sorted(p.relative_to(self.root).as_posix() for p in folder.rglob("*") if p.is_file())

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str, *, keep: str | None = None) -> None:
        folder = self.path(prefix)
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
            return
        for path in folder.iterdir() if folder.is_dir() else ():
            if path != self.path(keep):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def presigned_get(self, key: str, *, expires_s: int, filename: str, media_type: str) -> str | None:
        return None  # a folder has no URL of its own: the API serves its files


class S3Store:
    """An S3-compatible object store through boto3 (docs/storage.md: why boto3): multipart uploads past
    `MULTIPART_BYTES`, ranged reads, and a bounded cache of what this process read (`fetch`), keyed by the
    object's ETag so that a changed object is never served stale."""

    local = False
    MULTIPART_BYTES = 16 << 20
    TIMEOUT_S = 10.0  # a store slower than this to connect or to send the next bytes is unavailable (tried twice)

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        cache: Cache,
        public_endpoint_url: str | None = None,
        connections: int = 10,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix, self.cache = bucket, prefix.strip("/") + "/" if prefix.strip("/") else "", cache
        # Credentials: boto3's chain (AWS_* variables, a profile, an instance role), never a request's.
        config = Config(
            connect_timeout=self.TIMEOUT_S,
            read_timeout=self.TIMEOUT_S,
            retries={"max_attempts": 2, "mode": "standard"},
            tcp_keepalive=True,
            signature_version="s3v4",  # presigned URLs too: SigV4, expiring, the secret never in them
            max_pool_connections=connections,  # requests in flight at once from this process's threads
        )
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        # Presigned URLs name the host a client reaches (signing makes no request): the public endpoint if set.
        self.signer: Any = (
            boto3.client("s3", endpoint_url=public_endpoint_url, config=config) if public_endpoint_url else self.client
        )
        self.transfer = TransferConfig(
            multipart_threshold=self.MULTIPART_BYTES, multipart_chunksize=self.MULTIPART_BYTES, max_concurrency=4
        )

    def name(self, key: str) -> str:
        return self.prefix + checked(key)

    @contextmanager
    def answering(self, key: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if error.get("Code") in ("404", "NoSuchKey", "NotFound") or status == 404:
                raise StoredFileMissing(key) from None
            if status == 412:
                raise ObjectChanged(f"{key} changed while it was read") from None
            raise StoreUnavailable(f"the object store answered {status} {error.get('Code')}") from None
        except BotoCoreError as exc:  # unreachable, timed out, a broken connection
            raise StoreUnavailable(f"the object store did not answer: {type(exc).__name__}") from None

    def put(self, key: str, path: Path, *, move: bool = False) -> None:
        with self.answering(key):
            self.client.upload_file(str(path), self.bucket, self.name(key), Config=self.transfer)
        if move:
            path.unlink(missing_ok=True)

    def stat(self, key: str) -> Stat:
        with self.answering(key):
            head = self.client.head_object(Bucket=self.bucket, Key=self.name(key))
        return Stat(int(head["ContentLength"]), str(head["ETag"]).strip('"'))

    def fetch(self, key: str) -> Path:
        """A local copy of the object as it is now: from the cache when its ETag still matches."""
        for _ in range(2):
            try:
                return self.fetch_once(key)
            except ObjectChanged:
                continue  # replaced mid-read: read the new one
        return self.fetch_once(key)

    def fetch_once(self, key: str) -> Path:
        stat = self.stat(key)

        def download(partial: Path) -> None:
            # Ranged reads in parallel, each with If-Match on the ETag just read: an object replaced meanwhile is a
            # 412 (StoreUnavailable: read again later), never a copy mixing two versions.
            ranges = [
                (start, min(start + self.MULTIPART_BYTES, stat.size))
                for start in range(0, stat.size, self.MULTIPART_BYTES)
            ]
            with partial.open("wb") as handle:
                handle.truncate(stat.size)
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda span: self.read_into(partial, key, stat.etag, *span), ranges))

        return self.cache.get(f"{key}\n{stat.etag}", Path(key).suffix, download)

    def read_into(self, path: Path, key: str, etag: str, start: int, end: int) -> None:
        with self.answering(key):
            body = self.client.get_object(
                Bucket=self.bucket, Key=self.name(key), Range=f"bytes={start}-{end - 1}", IfMatch=quoted(etag)
            )["Body"]
            with path.open("r+b") as handle:
                handle.seek(start)
                for chunk in body.iter_chunks(CHUNK):
                    handle.write(chunk)

    def chunks(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        extra = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
        with self.answering(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self.name(key), **extra)["Body"]
        try:
            with self.answering(key):
                yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        with self.answering(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.name(prefix) + "/"
            ):
                found += [item["Key"][len(self.prefix) :] for item in page.get("Contents", ())]
        return sorted(found)

    def delete(self, key: str) -> None:
        with self.answering(key):
            self.client.delete_object(Bucket=self.bucket, Key=self.name(key))

    def delete_prefix(self, prefix: str, *, keep: str | None = None) -> None:
        doomed = [k for k in self.keys(prefix) if keep is None or not k.startswith(checked(keep) + "/")]
        for start in range(0, len(doomed), 1000):
            batch = [{"Key": self.name(k)} for k in doomed[start : start + 1000]]
            with self.answering(prefix):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def presigned_get(self, key: str, *, expires_s: int, filename: str, media_type: str) -> str:
        """A URL that GETs the object for `expires_s` seconds, without our credentials: it carries a signature
        derived from them, so it is handed to the one client that asked and never logged."""
        params = {"Bucket": self.bucket, "Key": self.name(key), "ResponseContentType": media_type,
                  "ResponseContentDisposition": attachment(filename)}  # fmt: skip
        with self.answering(key):
            return str(self.signer.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s))


def attachment(filename: str) -> str:
    """A Content-Disposition that saves the download as `filename` (RFC 6266's filename* for non-ASCII)."""
    escaped = quote(filename)
    return f"attachment; filename*=utf-8''{escaped}" if escaped != filename else f'attachment; filename="{filename}"'


def quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


class Cache:
    """Objects this process read, in a folder of at most `limit` bytes: least recently used out first. An entry's
    name is the hash of the key and the ETag, so a changed object is another entry (the old one ages out)."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.lock = threading.Lock()

    def get(self, identity: str, suffix: str, download: Callable[[Path], None]) -> Path:
        entry = self.folder / (hashlib.sha256(identity.encode()).hexdigest() + suffix)
        if entry.is_file():
            os.utime(entry)  # its place in the least-recently-used order
            return entry
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}.partial")
        try:
            download(partial)
            partial.replace(entry)
        finally:
            partial.unlink(missing_ok=True)
        self.trim(keep=entry)
        return entry

    def trim(self, keep: Path, target: int | None = None) -> None:
        """Oldest entries out until the folder holds at most `target` bytes (default: the limit)."""
        target = self.limit if target is None else target
        with self.lock:
            entries = []
            for path in self.folder.iterdir():
                try:
                    if not path.name.startswith("."):
                        entries.append((path.stat().st_mtime, path.stat().st_size, path))
                except FileNotFoundError:  # another process trimmed it
                    continue
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if total <= target:
                    break
                if path != keep:  # a file bigger than the whole cache is still handed over once
                    path.unlink(missing_ok=True)
                    total -= size


def store(settings: Settings) -> Store:
    """The process's store, as GS_STORAGE_URL names it."""
    return _store(
        settings.storage_url, settings.s3_endpoint_url, settings.var_dir, settings.cache_bytes,
        settings.s3_public_endpoint_url,
    )  # fmt: skip


@lru_cache(maxsize=8)
def _store(
    url: str | None, endpoint_url: str | None, var_dir: Path, cache_bytes: int, public_endpoint_url: str | None = None
) -> Store:
    parsed = urlparse(url or "")
    if parsed.scheme in ("", "file"):
        return FileStore(Path(parsed.path) if parsed.path else var_dir / "storage")  # = Settings.storage_dir
    if parsed.scheme == "s3" and parsed.netloc:
        return S3Store(
            parsed.netloc, parsed.path, endpoint_url=endpoint_url, cache=Cache(var_dir / "cache", cache_bytes),
            public_endpoint_url=public_endpoint_url,
        )  # fmt: skip
    raise ValueError(f"GS_STORAGE_URL must be file://PATH or s3://BUCKET/PREFIX, not {url!r}")


def local_copy(settings: Settings, recorded: str) -> Path:
    """A readable file on this host holding what a row recorded (a key, or an older row's path), refused before it
    is read when it is larger than anything the service stores (an object replaced behind our back)."""
    kept, key = store(settings), key_of(settings, recorded)
    limit = max(settings.max_upload_bytes, settings.max_dataset_bytes)
    if (size := kept.stat(key).size) > limit:
        raise StoredFileTooLarge(f"The stored file {key} holds {size} bytes, more than the {limit} the service stores.")
    return kept.fetch(key)
