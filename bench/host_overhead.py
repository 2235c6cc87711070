"""The host's share of one training update: the floor a GPU step cannot go below without CUDA graphs.

    .venv/bin/python bench/host_overhead.py              # 10 seeds, tiny tensors, on the CPU (~5 s)

With tensors this small the arithmetic is negligible, so the time per update is Python, the dispatcher and
autograd: what a GPU spends on the host launching each update's kernels when it is launch-bound (the 10-seed
protocol at 4,000 images is 3,002 updates). Printed per method: one batched update of all seeds, one update of a
single network, and the batched update's parts (forward, the vmapped loss, backward, optimizer). One torch thread.
"""
from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import machine  # noqa: E402
from starvation.ensemble import StackedMLP, seed_losses  # noqa: E402
from starvation.methods import build_method  # noqa: E402
from starvation.networks import build_network  # noqa: E402
from starvation.training import build_optimizer, stacked_logits, stacked_train_step, train_step  # noqa: E402

SEEDS = 10
ADAM = {"name": "adam", "lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8}
METHODS = {"erm": {"name": "erm"},
           "sd": {"name": "sd", "sd_lambda": 2.0, "warmup_steps": 0, "post_warmup_loss_scale": 2e-5}}


def microseconds(call: Callable[[], object], repeats: int = 500) -> float:
    for _ in range(20):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1e6


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(machine(torch.device("cpu")))
    networks = [build_network("mlp", {"hidden": [8, 8]}, (2, 2, 2), 1) for _ in range(SEEDS)]
    x, y = torch.rand(SEEDS, 4, 2, 2, 2), torch.randint(0, 2, (SEEDS, 4))
    print(f"{'method':7} {'batched us':>10} {'one seed us':>11} {'forward':>8} {'loss':>6} {'backward':>9} "
          f"{'optimizer':>9}")
    for name, spec in METHODS.items():
        method, model = build_method(spec), StackedMLP(networks)
        parameters = list(model.parameters())
        optimizer = build_optimizer(ADAM, parameters)
        single = build_optimizer(ADAM, networks[0].parameters())
        batched = microseconds(lambda: stacked_train_step(model, optimizer, method, x, y, 10))
        one = microseconds(lambda: train_step(networks[0], single, method, x[0], y[0], 10))
        forward = microseconds(lambda: model(x))
        with_loss = microseconds(lambda: seed_losses(method, stacked_logits(model(x)), y, 10, parameters))

        def backward() -> None:
            loss = seed_losses(method, stacked_logits(model(x)), y, 10, parameters).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        through_backward = microseconds(backward)
        step = microseconds(optimizer.step)
        print(f"{name:7} {batched:10.0f} {one:11.0f} {forward:8.0f} {with_loss - forward:6.0f} "
              f"{through_backward - with_loss:9.0f} {step:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
