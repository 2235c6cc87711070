"""How an update runs fast on a GPU: replayed from CUDA graphs, compiled per phase, with TF32 matmuls or a
bfloat16 forward pass."""

from __future__ import annotations

import contextlib
import functools
import time
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

    def __init__(
        self, update: Callable[[torch.Tensor | None, int], None], method: Method, device: torch.device
    ) -> None:
        self.update, self.method, self.device = update, method, device
        self.stream = torch.cuda.Stream(device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[Any, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self.eager: dict[Any, int] = {}
        self.phases = PhaseOrder(method)

    def __call__(self, rows: torch.Tensor | None, step: int) -> None:
        with torch.cuda.device(self.device):  # streams and replays on the training device, whichever is current
            self._step(rows, step)

    def _step(self, rows: torch.Tensor | None, step: int) -> None:
        phase = self.phases.at(step)
        if phase in self.graphs:
            graph, static_rows = self.graphs[phase]
            if static_rows is not None and rows is not None:  # captured with rows: replayed with rows
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


class PhaseOrder:
    """A method's phase at each step, checked to move only forward: a graph or a compiled loss is made once per
    phase and reused for every later step of it, which is right only if the loss at a step depends on the step
    through its phase alone and a phase, once left, never comes back (SD's warm-up, IRM's anneal)."""

    def __init__(self, method: Method) -> None:
        self.method = method
        self.left: set[Any] = set()
        self.current: Any = None
        self.started = False

    def at(self, step: int) -> Any:
        phase = self.method.phase(step)
        if self.started and phase != self.current:
            if phase in self.left:
                raise AssertionError(
                    f"method {self.method.NAME!r} went back to phase {phase!r} at step {step}: "
                    "a graphed or compiled update assumes phases only move forward"
                )
            self.left.add(self.current)
        self.current, self.started = phase, True
        return phase


class PhaseCompiled:
    """`loss(*args, step=step)` under `torch.compile`, one compiled function per phase of the method's loss.

    The step is bound to the first step of each phase (the loss depends on it through the phase alone:
    `PhaseOrder`), so Dynamo never sees a new integer and never recompiles within a phase. Inductor fuses the
    elementwise work around the matmuls (bias, ReLU and their backward, the loss) that eager mode runs as separate
    kernels. `prepare(steps, parameters, *args)` compiles every phase a run meets before its clock starts.
    """

    def __init__(self, loss: Callable[..., torch.Tensor], method: Method) -> None:
        self.loss, self.method = loss, method
        self.compiled: dict[Any, Callable[..., torch.Tensor]] = {}
        self.phases = PhaseOrder(method)

    def __call__(self, *args: Any, step: int) -> torch.Tensor:
        phase = self.phases.at(step)
        if phase not in self.compiled:
            self._compile(phase, step)
        return self.compiled[phase](*args)

    def _compile(self, phase: Any, step: int) -> None:
        self.compiled[phase] = torch.compile(functools.partial(self.loss, step=step), dynamic=False)

    def prepare(self, steps: int, parameters: list[torch.Tensor], *args: Any) -> float:
        """Compile the forward and backward of each phase of `steps` on `args` before training; the seconds it
        took. The gradients this makes are dropped (`parameters`' .grad set to None): nothing is updated."""
        started = time.perf_counter()
        firsts: dict[Any, int] = {}
        for step in range(steps):
            firsts.setdefault(self.method.phase(step), step)
        for phase, step in firsts.items():
            self._compile(phase, step)
            self.compiled[phase](*args).sum().backward()
        for parameter in parameters:
            parameter.grad = None
        if parameters and parameters[0].device.type == "cuda":
            torch.cuda.synchronize(parameters[0].device)
        return time.perf_counter() - started


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
