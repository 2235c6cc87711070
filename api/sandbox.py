"""Checking uploaded models in a separate process, so a hostile file can crash or hang only that.

TorchScript runs the uploader's code in the dry forward pass; a crafted file may also crash the
C++ loader. The check runs in a spawned process with a time limit; a crash or a timeout kills the
process (a fresh one serves the next upload) and becomes a 422 for the uploader.
"""
from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


class SandboxError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _validate(kwargs: dict[str, Any]) -> dict[str, Any] | tuple[str, str]:
    from starvation.checkpoints import CheckpointError, validate_checkpoint

    try:
        return validate_checkpoint(**kwargs)
    except CheckpointError as exc:
        return (exc.code, str(exc))


def _get_pool() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    return _pool


def shutdown() -> None:
    global _pool
    if _pool is not None:
        for process in list(getattr(_pool, "_processes", {}).values()):
            process.kill()
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def validate_checkpoint(timeout_s: float, **kwargs: Any) -> dict[str, Any]:
    """starvation.checkpoints.validate_checkpoint in the sandbox process; raises SandboxError."""
    with _lock:  # one check at a time: the sandbox is a single process
        future = _get_pool().submit(_validate, kwargs)
        try:
            outcome = future.result(timeout=timeout_s)
        except FutureTimeout:
            shutdown()
            raise SandboxError("load_failed", f"Loading and running the model took longer than {timeout_s:.0f} s.")
        except BrokenProcessPool:
            shutdown()
            raise SandboxError("load_failed", "The model crashed the process that loaded it.") from None
    if isinstance(outcome, tuple):
        raise SandboxError(*outcome)
    return outcome
