"""What every benchmark prints about where it ran, and how it waits for the device."""
from __future__ import annotations

import os
import platform
import resource

import torch


def machine(device: torch.device) -> str:
    cores = os.cpu_count()
    line = (f"machine: {platform.machine()}, {cores} CPU cores ({torch.get_num_threads()} torch threads), "
            f"Python {platform.python_version()}, torch {torch.__version__}, device {device}")
    if device.type == "cuda":
        line += f" ({torch.cuda.get_device_name(device)})"
    return line


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak: resident set size on the CPU (ru_maxrss, KiB on Linux), allocated memory on a GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
