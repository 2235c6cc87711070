"""How a job's seeds run (`choose_execution`: batched or sequential; `per_seed_matmuls`) and the network each
starts from (`init_network`): what the training loop and a sweep decide before their first update."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from starvation.datasets import Dataset
from starvation.ensemble import unsupported_reason
from starvation.methods import method_class
from starvation.networks import Network, build_network, output_count
from starvation.training.resolved import ResolvedTrainSpec
from starvation.weights import load_initial_weights

# Above this many multiply-adds per seed and update, a batched job on the CPU runs each seed's matmuls on its own
# (`per_seed_matmuls`). On a 2-core CPU (docs/performance.md) one batched matmul over 10 seeds is 1.4x slower than
# 10 separate ones at 830M (CMNIST, full batch), even at 53M (CMNIST, batches of 256), faster at 0.45M (two moons).
CPU_PER_SEED_MATMUL_MACS = 50_000_000


def choose_execution(spec: ResolvedTrainSpec, network: Network) -> tuple[str, str]:
    """("batched" | "sequential", why) for the resolved `spec`; `network` shows the architecture (no weights)."""
    requested = spec.execution
    if requested == "sequential":
        return "sequential", "requested"
    reason = unsupported_reason(network) or method_class(spec.method.name).SEQUENTIAL_ONLY
    if reason is not None:
        return "sequential", f"cannot batch: {reason}"
    if requested == "batched":
        return "batched", "requested"
    if len(spec.seeds) == 1:
        return "sequential", "auto: one seed"
    return "batched", "auto: several seeds"


def update_rows(spec: ResolvedTrainSpec, data: Dataset) -> int:
    """Examples per update: the spec's batch size, or every pooled training example (full batch)."""
    n_train = sum(len(data.splits[name]) for name in data.train_splits)
    return min(spec.batch_size or n_train, n_train)


def per_seed_matmuls(network: Network, rows: int, device: torch.device) -> bool:
    """Whether a batched job runs each seed's matmuls on its own (`StackedMLP`): on the CPU, for large updates.

    `rows`: examples per update (the batch, or all). On a GPU one batched matmul always pays (one launch, not S).
    """
    macs = rows * sum(p.numel() for p in network.parameters() if p.ndim > 1)
    return device.type == "cpu" and macs > CPU_PER_SEED_MATMUL_MACS


def network_shape(spec: ResolvedTrainSpec, data: Dataset) -> Network:
    """The spec's network for `data`, without weights (built on the meta device: no RNG drawn, no memory)."""
    with torch.device("meta"):
        return build_network(spec.model.arch, dict(spec.model.params), data.input_shape, output_count(data.num_classes))


def init_network(
    spec: ResolvedTrainSpec, data: Dataset, seed: int, init_weights: Mapping[str, torch.Tensor] | None = None
) -> Network:
    """Seed `seed`'s initial network (filled from `init_weights` where given); the caller's global RNG is left as
    it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(
            spec.model.arch, dict(spec.model.params), data.input_shape, output_count(data.num_classes)
        )
    if init_weights is not None:
        load_initial_weights(network, init_weights)
    return network
