"""Several seeds of one network trained as one model: parameters stacked on a leading seed dimension.

Seed s of a `StackedMLP` holds the parameters of the s-th `Network` it was stacked from, under the same names;
`network_state(s)` gives them back for a module of its own (a checkpoint). The forward pass is one batched matmul
per layer over the seeds (`baddbmm`), so S small models cost one launch per layer on a GPU instead of S.

Why summing the seeds' losses trains each seed as if alone: seed s's loss depends on seed s's parameters only,
so the gradient of the sum w.r.t. them is that seed's own gradient; Adam and SGD act elementwise, so one
optimizer over the stacked tensors keeps S independent states (the step counter is shared, and equal).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import vmap

from starvation.methods import Method
from starvation.networks import Network


def unsupported_reason(network: Network) -> str | None:
    """Why `network` cannot be stacked (None when it can): only Flatten/Linear/ReLU stacks are batched."""
    for name, layer in network.features.named_children():
        if isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return f"layer features.{name} flattens dims {layer.start_dim}..{layer.end_dim}"
        elif not isinstance(layer, (nn.Linear, nn.ReLU)):
            return f"layer features.{name} is a {type(layer).__name__}; only MLPs (Linear/ReLU) are batched"
    return None


class StackedMLP(nn.Module):
    """S MLPs of one shape. forward: [S, B, *input_shape] -> [S, B, outputs], seed s through network s."""

    def __init__(self, networks: Sequence[Network]) -> None:
        super().__init__()
        template = networks[0]
        reason = unsupported_reason(template)
        if reason is not None:
            raise ValueError(f"cannot stack this network: {reason}")
        self.names = [name for name, _ in template.named_parameters()]
        states = [dict(network.named_parameters()) for network in networks]
        # ParameterList, not ParameterDict: parameter names hold dots. .detach() keeps the seeds' modules apart.
        self.stacked = nn.ParameterList(
            nn.Parameter(torch.stack([state[name].detach() for state in states]).contiguous()) for name in self.names)
        layers = [(kind, f"features.{index}") for index, kind in _kinds(template.features)] + [("linear", "head")]
        # (kind, index of the weight in `stacked`, index of the bias); -1 for layers without parameters
        self.plan = [(kind, self.names.index(f"{prefix}.weight") if kind == "linear" else -1,
                      self.names.index(f"{prefix}.bias") if kind == "linear" else -1) for kind, prefix in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for kind, weight, bias in self.plan:
            if kind == "flatten":
                h = h.flatten(2)
            elif kind == "relu":
                h = torch.relu(h)
            else:
                h = torch.baddbmm(self.stacked[bias].unsqueeze(1), h, self.stacked[weight].transpose(1, 2))
        return h

    @torch.no_grad()
    def network_state(self, seed_index: int) -> dict[str, torch.Tensor]:
        """Seed `seed_index`'s parameters under the `Network`'s names (copies, on the CPU)."""
        return {name: p[seed_index].detach().cpu().clone() for name, p in zip(self.names, self.stacked)}


def _kinds(features: nn.Sequential) -> list[tuple[int, str]]:
    kinds = {nn.Flatten: "flatten", nn.Linear: "linear", nn.ReLU: "relu"}
    return [(int(index), kinds[type(layer)]) for index, layer in features.named_children()]


class _SeedParameters:
    """What a method's loss sees as `model` for one seed: `.parameters()` only (WeightDecay reads the weights)."""

    def __init__(self, parameters: Sequence[torch.Tensor]) -> None:
        self.seed_parameters = parameters

    def parameters(self) -> Iterator[torch.Tensor]:
        return iter(self.seed_parameters)


class SeedLosses:
    """Each seed's own loss under `method`: [S] from logits [S, B(, k)], labels [S, B] and the stacked parameters.

    The method's `loss` runs under `torch.func.vmap`, so the meaning is the method's, with one kernel per op for
    all seeds. A loss vmap cannot batch (per-class means index with a boolean mask) runs seed by seed instead.
    """

    def __init__(self, method: Method) -> None:
        self.method = method
        self.vmapped = True

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, step: int,
                 parameters: list[torch.Tensor]) -> torch.Tensor:
        def one_seed(seed_logits: torch.Tensor, seed_y: torch.Tensor, seed_params: list[torch.Tensor]) -> torch.Tensor:
            return self.method.loss(seed_logits, seed_y, step, _SeedParameters(seed_params))

        if self.vmapped:
            try:
                return vmap(one_seed)(logits, y, parameters)
            except RuntimeError as error:
                if "vmap" not in str(error):
                    raise
                self.vmapped = False
        return torch.stack([one_seed(logits[s], y[s], [p[s] for p in parameters]) for s in range(len(logits))])
