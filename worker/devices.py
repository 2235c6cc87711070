"""Which device a job runs on: the spec's choice, else the worker's GS_DEVICE, else what exists."""

from __future__ import annotations


def pick_device(requested: str | None, worker_default: str) -> str:
    from starvation.training import resolve_device

    choice = requested if requested and requested != "auto" else worker_default
    return str(resolve_device(choice))
