"""Several seeds of one network trained as one model: parameters stacked on a leading seed dimension.

Seed s of a `StackedMLP` holds the parameters of the s-th `Network` it was stacked from, under the same names;
`network_state(s)` gives them back for a module of its own (a checkpoint). The forward pass is one batched matmul
per layer over the seeds (`baddbmm`), so S small models cost one launch per layer on a GPU instead of S; with
`per_seed_matmuls` each seed's layers run as their own matmuls on slices of the stacked parameters (on the CPU,
large matmuls run faster one at a time than batched), and the rest (loss, backward, optimizer) stays batched.

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
    """S MLPs of one shape. forward: [S, B, *input_shape] -> [S, B, outputs], seed s through network s.

    `pad_to`: hidden widths rounded up to a multiple of this with units that are zero and stay zero (zero weights
    in and out, zero bias: ReLU(0) = 0 and its gradient there is 0, so no update ever moves them), which changes
    no output or gradient of the real units. On a GPU, widths like the paper's 390 leave rows that are not 16-byte
    aligned, and cuBLAS then picks slower matmul kernels (docs/performance.md has the measurement).
    `network_state` returns the real units only.
    """

    def __init__(self, networks: Sequence[Network], *, per_seed_matmuls: bool = False, pad_to: int = 1) -> None:
        super().__init__()
        self.per_seed_matmuls = per_seed_matmuls
        template = networks[0]
        reason = unsupported_reason(template)
        if reason is not None:
            raise ValueError(f"cannot stack this network: {reason}")
        self.names = [name for name, _ in template.named_parameters()]
        self.shapes = [tuple(parameter.shape) for _, parameter in template.named_parameters()]
        layers = [(kind, f"features.{index}") for index, kind in _kinds(template.features)] + [("linear", "head")]
        padded = _padded_shapes(dict(zip(self.names, self.shapes)), [p for k, p in layers if k == "linear"], pad_to)
        states = [dict(network.named_parameters()) for network in networks]
        # ParameterList, not ParameterDict: parameter names hold dots. .detach() keeps the seeds' modules apart.
        self.stacked = nn.ParameterList(
            nn.Parameter(_pad(torch.stack([state[name].detach() for state in states]), padded[name]).contiguous())
            for name in self.names
        )
        # (kind, index of the weight in `stacked`, index of the bias); -1 for layers without parameters
        self.plan = [
            (
                kind,
                self.names.index(f"{prefix}.weight") if kind == "linear" else -1,
                self.names.index(f"{prefix}.bias") if kind == "linear" else -1,
            )
            for kind, prefix in layers
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_seed_matmuls:
            seeds = [p.unbind(0) for p in self.stacked]  # unbind: its backward is one stack, not S scatters
            return torch.stack(
                [self._layers(x_s, [p[s] for p in seeds], stacked=False) for s, x_s in enumerate(x.unbind(0))]
            )
        return self._layers(x, list(self.stacked), stacked=True)

    def _layers(self, h: torch.Tensor, parameters: list[torch.Tensor], *, stacked: bool) -> torch.Tensor:
        """The network on h: [S, B, ...] with stacked parameters, or [B, ...] with one seed's."""
        for kind, weight, bias in self.plan:
            if kind == "flatten":
                h = h.flatten(2 if stacked else 1)
            elif kind == "relu":
                h = torch.relu(h)
            elif stacked:
                h = torch.baddbmm(parameters[bias].unsqueeze(1), h, parameters[weight].transpose(1, 2))
            else:
                h = torch.addmm(parameters[bias], h, parameters[weight].t())
        return h

    @torch.no_grad()
    def network_state(self, seed_index: int) -> dict[str, torch.Tensor]:
        """Seed `seed_index`'s parameters under the `Network`'s names (copies, on the CPU; padding left out)."""
        return {
            name: p[seed_index][tuple(slice(0, n) for n in shape)].detach().cpu().clone()
            for name, p, shape in zip(self.names, self.stacked, self.shapes)
        }


def _padded_shapes(shapes: dict[str, tuple[int, ...]], linears: list[str], pad_to: int) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape with every hidden width (a linear's outputs but the head's, and the next linear's
    inputs) rounded up to a multiple of `pad_to`."""
    padded = {name: list(shape) for name, shape in shapes.items()}
    for layer, following in zip(linears, linears[1:]):
        width = -(-padded[f"{layer}.weight"][0] // pad_to) * pad_to
        padded[f"{layer}.weight"][0] = padded[f"{layer}.bias"][0] = padded[f"{following}.weight"][1] = width
    return {name: tuple(shape) for name, shape in padded.items()}


def _pad(stacked: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`stacked` [S, *parameter shape] with zeros after its entries up to [S, *shape]."""
    widths = [(0, target - size) for size, target in zip(stacked.shape[1:], shape)]
    return torch.nn.functional.pad(stacked, [n for pair in reversed(widths) for n in pair])


def _kinds(features: nn.Sequential) -> list[tuple[int, str]]:
    kinds = {nn.Flatten: "flatten", nn.Linear: "linear", nn.ReLU: "relu"}
    return [(int(index), kinds[type(layer)]) for index, layer in features.named_children()]


class _SeedParameters:
    """What a method's loss sees as `model` for one seed: `.parameters()` only (WeightDecay reads the weights)."""

    def __init__(self, parameters: Sequence[torch.Tensor]) -> None:
        self.seed_parameters = parameters

    def parameters(self) -> Iterator[torch.Tensor]:
        return iter(self.seed_parameters)


def seed_losses(
    method: Method,
    logits: torch.Tensor,
    y: torch.Tensor,
    step: int,
    parameters: list[torch.Tensor],
    memberships: dict[str, torch.Tensor] | None = None,
    member_params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each seed's own loss under `method`: [S] from logits [S, B(, k)], labels [S, B] and the stacked parameters.

    `memberships`: what the method `NEEDS` of each row, stacked over the seeds ([S, B, ...]).
    `member_params`: each member's own value of some of the method's `TENSOR_PARAMS` ([S] or [S, k]): a sweep's
    settings riding in one stack (`Method.with_params`).

    The method's `loss` runs under `torch.func.vmap`, so the meaning is the method's, with one kernel per op for
    all seeds; a method's loss must therefore batch under vmap (no data-dependent shapes, no reads to the host).
    """

    def one_seed(
        seed_logits: torch.Tensor,
        seed_y: torch.Tensor,
        seed_params: list[torch.Tensor],
        seed_memberships: dict[str, torch.Tensor],
        own: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        member = method.with_params(own) if own else method
        return member.loss(seed_logits, seed_y, step, _SeedParameters(seed_params), **seed_memberships)

    return vmap(one_seed)(logits, y, parameters, memberships or {}, member_params or {})
