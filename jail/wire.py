"""Messages between the service and a jailed child, over two pipes.

A message is a JSON header and, optionally, tensors serialised with safetensors (never a
pickle): `<u32 header length><header><u64 payload length><payload>`. The service reads what
the child sends as untrusted input: lengths are bounded before anything is read.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load, save

MAX_HEADER_BYTES = 1 << 20


class WireError(Exception):
    pass


class PayloadTooLarge(WireError):
    """An answer larger than the caller allowed: refused from its declared length, before it is read."""


POLL_S = 1.0  # how often a wait for an answer asks `poll` whether to go on


def send(fd: int, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
    body = json.dumps(header).encode()
    payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}) if tensors else b""
    _write_all(fd, struct.pack("<I", len(body)) + body + struct.pack("<Q", len(payload)))
    _write_all(fd, payload)


def receive(
    fd: int, *, max_payload: int, deadline: float | None = None, poll: Callable[[], None] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The next message. `deadline` (time.monotonic()) raises TimeoutError; `poll` is called about every POLL_S
    while waiting, and what it raises ends the wait (a cancelled job)."""
    (length,) = struct.unpack("<I", _read_exactly(fd, 4, deadline, poll))
    if length > MAX_HEADER_BYTES:
        raise WireError(f"header of {length} bytes")
    try:
        header = json.loads(_read_exactly(fd, length, deadline, poll))
    except ValueError:
        raise WireError("header is not JSON") from None
    if not isinstance(header, dict):
        raise WireError("header is not an object")
    (size,) = struct.unpack("<Q", _read_exactly(fd, 8, deadline, poll))
    if size > max_payload:
        raise PayloadTooLarge(f"payload of {size} bytes, at most {max_payload} allowed")
    tensors = load(_read_exactly(fd, size, deadline, poll)) if size else {}
    return header, tensors


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exactly(fd: int, size: int, deadline: float | None, poll: Callable[[], None] | None = None) -> bytes:
    chunks, left = [], size
    while left:
        while deadline is not None or poll is not None:
            wait = POLL_S if deadline is None else min(deadline - time.monotonic(), POLL_S if poll else 3600.0)
            if wait <= 0 and deadline is not None:
                raise TimeoutError
            if select.select([fd], [], [], max(wait, 0))[0]:
                break
            if poll is not None:
                poll()
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
