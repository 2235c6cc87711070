"""A database that blinks (restarting, unreachable) while a job runs: what the worker waits out instead of failing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

log = logging.getLogger("gs.worker")
DATABASE_BLINKS = (OperationalError, InterfaceError, PoolTimeout)
OUTAGE_PATIENCE_S = 120.0  # how long a job's rows, files and outcome wait for a database that blinked
T = TypeVar("T")


def patiently(write: Callable[[], T], what: str) -> T:
    """`write()`, tried again every second through a database blink for up to OUTAGE_PATIENCE_S (then it raises)."""
    started = time.monotonic()
    while True:
        try:
            return write()
        except DATABASE_BLINKS as exc:
            if time.monotonic() - started > OUTAGE_PATIENCE_S:
                raise
            log.warning("%s not stored yet (database unavailable), trying again: %s", what, exc)
            time.sleep(1.0)
