"""How an update runs fast on a GPU: replayed from CUDA graphs, with TF32 matmuls or a bfloat16 forward pass."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from starvation.methods import Method

class GraphedUpdates:
    """A loop's update, `update(rows, step)`, replayed from CUDA graphs: one launch a step instead of dozens.

    Per phase of the method's loss (`Method.phase`: SD before and after its warm-up), the first WARMUP updates
    run eagerly on a side stream (lazy initialisations, the optimizer's state), the next one is captured and then
    replayed, with each step's minibatch rows copied into the captured rows tensor. The captured update reads the
    same data and parameter tensors and writes the same parameters, so evaluation between replays sees the model
    as it is. The optimizer must be capturable (`build_optimizer(..., capturable=True)`). The phases' graphs share
    one memory pool: they never run at once, and each computes every temporary it reads.
    """

    WARMUP = 3

    def __init__(self, update: Callable[[torch.Tensor | None, int], None], method: Method,
                 device: torch.device) -> None:
        self.update, self.method, self.device = update, method, device
        self.stream = torch.cuda.Stream(device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[Any, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self.eager: dict[Any, int] = {}

    def __call__(self, rows: torch.Tensor | None, step: int) -> None:
        with torch.cuda.device(self.device):  # streams and replays on the training device, whichever is current
            self._step(rows, step)

    def _step(self, rows: torch.Tensor | None, step: int) -> None:
        phase = self.method.phase(step)
        if phase in self.graphs:
            graph, static_rows = self.graphs[phase]
            if static_rows is not None:
                static_rows.copy_(rows)
            graph.replay()
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if self.eager.get(phase, 0) < self.WARMUP:
                self.eager[phase] = self.eager.get(phase, 0) + 1
                self.update(rows, step)
            else:
                static_rows = None if rows is None else rows.clone()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                    self.update(static_rows, step)
                self.graphs[phase] = graph, static_rows
                graph.replay()  # capturing recorded this step's update without running it
        torch.cuda.current_stream().wait_stream(self.stream)


# ---- precision -----------------------------------------------------------------------------

@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TensorFloat-32 for CUDA matmuls and convolutions on or off (cuDNN's default is on); restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def forward_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Where a training update's forward pass runs: bf16 autocast, or as it is (tf32 is set for the whole run)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)  # a cache breaks CUDA graphs
    return contextlib.nullcontext()
