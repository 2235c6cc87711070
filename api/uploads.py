"""Receiving uploaded files: streamed to disk under a size limit, hashed on the way."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from fastapi import UploadFile

from api.errors import ApiError

CHUNK = 1024 * 1024


async def save_limited(upload: UploadFile, folder: Path, max_bytes: int) -> tuple[Path, str, int]:
    """Write the upload to a temporary file in `folder`; returns (path, sha256, size)."""
    folder.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix="upload-", delete=False)
    path = Path(handle.name)
    try:
        with handle:
            while chunk := await upload.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise ApiError(413, "too_large", f"The file is larger than the limit of {max_bytes} bytes.")
                digest.update(chunk)
                handle.write(chunk)
        if size == 0:
            raise ApiError(422, "empty_file", "The uploaded file is empty.")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest(), size
