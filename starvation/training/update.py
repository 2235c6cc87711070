"""One optimizer update, for one model (`train_step`) or every seed stacked (`stacked_train_step`), and what the
updates read: the inputs (`update_inputs`) and what a method needs of each example (`memberships`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from starvation.datasets import Dataset
from starvation.ensemble import StackedMLP, seed_losses
from starvation.methods import Method
from starvation.training.acceleration import forward_precision
from starvation.training.evaluation import as_logits, stacked_logits


def memberships(
    data: Dataset, needs: Sequence[str], prepared: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """What a method's loss needs of each pooled training example besides its label (`Method.NEEDS`), in the
    order of `Dataset.train_data()`, one-hot float: `environment` [N, training splits] (the split it came from);
    `group` [N, classes x attribute values] (its (label, attribute) pair, at label * attribute values + attribute);
    and what the method computed before its run (`Method.prepare`, as float).
    """
    prepared = prepared or {}
    known = {"environment", "group"} | set(prepared)
    unknown = sorted(set(needs) - known)
    if unknown:
        raise ValueError(f"a method needs {', '.join(unknown)}; the training loop supplies {', '.join(sorted(known))}")
    given = {name: tensor.float() for name, tensor in prepared.items() if name in needs}
    if "environment" in needs:
        sizes = torch.tensor([len(data.splits[name]) for name in data.train_splits])
        environment = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        given["environment"] = torch.nn.functional.one_hot(environment, len(sizes)).float()
    if "group" in needs:
        y, attribute = data.train_labels()
        values = int(attribute.max()) + 1
        group = y * values + attribute
        given["group"] = torch.nn.functional.one_hot(group, data.num_classes * values).float()
    return given


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: Method,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int,
    *,
    precision: str = "fp32",
    memberships: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One optimizer update on (x, y) with the method's loss at `step`; returns that loss (detached, no sync).

    `memberships`: what the method `NEEDS` of these rows (`memberships(data, method.NEEDS)`, rows selected).
    """
    model.train()
    with forward_precision(precision, x.device):
        output = model(x)
    loss = method.loss(as_logits(output).float(), y, step, model, **(memberships or {}))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def stacked_losses(
    model: StackedMLP,
    method: Method,
    x: torch.Tensor,
    y: torch.Tensor,
    memberships: dict[str, torch.Tensor] | None = None,
    *,
    step: int,
    precision: str = "fp32",
    member_params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Every seed's loss [S] on its own rows x [S, B, ...], y [S, B]: the forward pass and the method's loss
    (`member_params`: as `seed_losses` takes them)."""
    with forward_precision(precision, x.device):
        output = model(x)
    return seed_losses(
        method, stacked_logits(output).float(), y, step, list(model.parameters()), memberships, member_params
    )


def stacked_train_step(
    model: StackedMLP,
    optimizer: torch.optim.Optimizer,
    method: Method,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int,
    *,
    precision: str = "fp32",
    memberships: dict[str, torch.Tensor] | None = None,
    losses: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """One update of every seed on its own rows x [S, B, ...], y [S, B]; returns the seeds' losses [S] (no sync).

    The sum of the seeds' losses is minimised: each seed's gradient is its own (`starvation.ensemble`).
    `losses`: what computes them, called as `stacked_losses` is without its first two arguments (a
    `PhaseCompiled` of it); default `stacked_losses` itself.
    """
    model.train()
    if losses is None:
        losses = functools.partial(stacked_losses, model, method, precision=precision)
    per_seed = losses(x, y, memberships, step=step)
    optimizer.zero_grad(set_to_none=True)
    per_seed.sum().backward()
    optimizer.step()
    return per_seed.detach()


def update_inputs(x: torch.Tensor, precision: str) -> torch.Tensor:
    """The training inputs the updates read: under bf16, a bfloat16 copy made once (autocast would otherwise cast
    the inputs again at every update; it casts the float32 master weights each time, which are far smaller).
    A registered dataset's inputs, expanded over the seeds (stride 0), stay one copy, expanded again."""
    if precision != "bf16":
        return x
    if x.ndim > 1 and x.stride(0) == 0:
        return x[0].to(torch.bfloat16).unsqueeze(0).expand_as(x)
    return x.to(torch.bfloat16)
