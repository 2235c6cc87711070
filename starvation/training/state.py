"""What a run keeps besides its weights: each seed's minibatch order (`Batches`), the resumable states of a
sequential run (`Resume`), and where the wall time went (`Clock`)."""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class Batches:
    """Each seed's minibatch rows: a fresh permutation per epoch from the seed's own generator; None: full batch.

    `next()` gives [seeds, batch_size] indices on the device; an epoch's order is copied there once, not per step.
    """

    def __init__(self, n: int, batch_size: int | None, *, seeds: Sequence[int], device: torch.device) -> None:
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.order = torch.empty(len(seeds), 0, dtype=torch.long)
        self.position = 0

    @property
    def full(self) -> bool:
        """Every update sees all n examples (no batch size, or one at least n): `next()` gives None."""
        return self.batch_size is None or self.batch_size >= self.n

    def state(self) -> dict:
        """Where the epochs stand: restored with `restore`, the rows that follow are the same."""
        return {
            "order": self.order.cpu().clone(),
            "position": self.position,
            "generators": [generator.get_state() for generator in self.generators],
        }

    def restore(self, state: dict) -> None:
        self.order, self.position = to_device(state["order"], self.device), int(state["position"])
        for generator, saved in zip(self.generators, state["generators"], strict=True):
            generator.set_state(saved)

    def next(self) -> torch.Tensor | None:
        size = self.batch_size
        if size is None or size >= self.n:  # `full`
            return None
        if self.position + size > self.order.shape[1]:
            order = torch.stack([torch.randperm(self.n, generator=generator) for generator in self.generators])
            self.order, self.position = to_device(order, self.device), 0
        rows = self.order[:, self.position : self.position + size]
        self.position += size
        return rows


class Resume:
    """A sequential run's resumable states, one file per seed in `folder`: the weights, the optimizer, the step and
    the minibatch order every `every` steps, and the weights and history once the seed is finished. Saved with
    plain tensors and numbers only, and read back with `torch.load(weights_only=True)`. `resumed`: the seeds this
    run went on with, and the step each went on from."""

    def __init__(self, folder: pathlib.Path, every: int | None) -> None:
        self.folder, self.every = folder, every
        self.resumed: dict[int, int] = {}

    def due(self, step: int) -> bool:
        return self.every is not None and self.every > 0 and step % self.every == 0

    def path(self, seed: int) -> pathlib.Path:
        return self.folder / f"seed{seed}.pt"

    def load(self, seed: int) -> dict | None:
        path = self.path(seed)
        return torch.load(path, weights_only=True, map_location="cpu") if path.exists() else None

    def save(
        self,
        seed: int,
        *,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        history: list[dict[tuple[str, str], float]],
        batches: dict | None,
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "finished": optimizer is None,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "batches": batches,
            "history": [[[split, name, value] for (split, name), value in values.items()] for values in history],
        }
        partial = self.path(seed).with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(self.path(seed))  # a worker killed mid-save leaves the last whole state

    @staticmethod
    def reported(folder: pathlib.Path) -> dict[int, int | None]:
        """Per seed with a saved state, the step before which its metrics stand (None: finished, all of them):
        what a run resuming from `folder` will not report again."""
        reported = {}
        for path in sorted(folder.glob("seed*.pt")):
            state = torch.load(path, weights_only=True, map_location="cpu")
            reported[int(path.stem.removeprefix("seed"))] = None if state["finished"] else state["step"]
        return reported


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory, without making the host wait."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class Clock:
    """Wall time of the updates and of the evaluations, split at evaluations (where the device is synced anyway).

    Update time includes what runs between evaluations (should_stop, progress reports); evaluation time includes
    reporting its metrics.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.train_s = self.eval_s = 0.0
        self.compile_s = 0.0  # torch.compile before training (`PhaseCompiled.prepare`), outside train_s
        self.mark = time.perf_counter()

    def start(self) -> None:
        self.mark = time.perf_counter()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        self.train_s += began - self.mark
        yield
        self.mark = time.perf_counter()
        self.eval_s += self.mark - began

    def summary(self, steps: int, *, total_s: float) -> dict[str, float]:
        """step_ms: wall time to move every seed of the job one update (batched: one stacked update)."""
        return {
            "step_ms": 1000 * self.train_s / steps,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "compile_s": self.compile_s,
            "total_s": total_s,
        }
