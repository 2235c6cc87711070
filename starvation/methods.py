"""Training objectives by name: a method is a small class whose `loss(logits, y, step, model)` is minimised.

Logits are [N] for a binary task (one logit; y in {0, 1}) and [N, k] for k classes. The data term is the
cross-entropy: binary cross-entropy with logits, which equals the paper's logistic loss log(1 + exp(-y*f))
with y mapped to +-1.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from starvation import params as P
from starvation.errors import SpecError


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: BCE-with-logits for one logit, softmax cross-entropy for k."""
    if logits.ndim == 1:
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
    return F.cross_entropy(logits, y)


def sd_penalty(logits: torch.Tensor, y: torch.Tensor, gamma: float | list[float] | torch.Tensor, *,
               per_class_mean: bool) -> torch.Tensor:
    """mean((logit - gamma_y)^2), the squared logit distance from its target (per example: squared L2 over logits).

    Binary: the one logit of an example of class c targets gamma[c] (a scalar targets every class).
    k classes: logit j targets gamma[j]. per_class_mean: averaged within each class present, then summed over
    classes (the paper's CelebA recipe), so a rare class weighs as much as a common one; a class absent from the
    batch adds nothing. No step reads a value back from the device, and every step batches under `vmap`.
    """
    binary = logits.ndim == 1
    num_classes = 2 if binary else logits.shape[1]
    if isinstance(gamma, (list, torch.Tensor)):
        if len(gamma) != num_classes:
            raise SpecError(f"sd_gamma has {len(gamma)} values but the task has {num_classes} classes")
        targets = torch.as_tensor(gamma, dtype=logits.dtype, device=logits.device)  # a tensor: no copy
        target = targets[y] if binary else targets
    else:
        target = gamma
    squared = (logits - target) ** 2
    if not binary:
        squared = squared.sum(dim=1)
    if not per_class_mean:
        return squared.mean()
    members = F.one_hot(y, num_classes).to(squared.dtype)  # a matmul, not index_add: deterministic on CUDA too
    sums, counts = members.T @ squared, members.sum(dim=0)
    return (sums / counts.clamp(min=1)).sum()  # an absent class: 0 / 1 (a mask would sync and not vmap)


class Method:
    """A named training objective with declared hyper-parameters."""

    NAME: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    PARAMS: ClassVar[dict[str, P.Param]] = {}

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = P.resolve(f"method {self.NAME!r}", self.PARAMS, params)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, step: int, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def phase(self, step: int) -> Any:
        """What the loss's computation at `step` depends on besides its tensors: equal phases, equal code path.

        A CUDA graph captured at one step is replayed at every step of the same phase (training.GraphedUpdates).
        """
        return None


class ERM(Method):
    NAME: ClassVar[str] = "erm"
    DESCRIPTION: ClassVar[str] = "empirical risk minimisation: the cross-entropy alone"

    def loss(self, logits: torch.Tensor, y: torch.Tensor, step: int, model: nn.Module) -> torch.Tensor:
        return cross_entropy(logits, y)


class WeightDecay(Method):
    NAME: ClassVar[str] = "weight_decay"
    DESCRIPTION: ClassVar[str] = "cross-entropy + weight_decay * sum of squared weights (biases excluded)"
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "weight_decay": P.Param(1e-3, "coefficient of the squared L2 norm of the weight matrices/kernels",
                                P.non_negative),
    }

    def loss(self, logits: torch.Tensor, y: torch.Tensor, step: int, model: nn.Module) -> torch.Tensor:
        squared_norm = sum(w.pow(2).sum() for w in model.parameters() if w.ndim > 1)
        return cross_entropy(logits, y) + self.params["weight_decay"] * squared_norm


class SpectralDecoupling(Method):
    NAME: ClassVar[str] = "sd"
    DESCRIPTION: ClassVar[str] = ("Spectral Decoupling: cross-entropy + sd_lambda/2 * mean((logit - gamma_y)^2), "
                                  "with an optional warm-up and post-warm-up loss scale")
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "sd_lambda": P.Param(0.1, "coefficient lambda of lambda/2 * mean((logit - gamma_y)^2) after warm-up",
                             P.non_negative),
        "sd_gamma": P.Param(0.0, "logit target: a scalar for every class or one value per class",
                            P.number_or_list),
        "per_class_mean": P.Param(False, "average the penalty within each class, then sum over classes (CelebA)",
                                  P.boolean),
        "warmup_steps": P.Param(0, "steps before sd_lambda and the loss scale apply", P.non_negative_int),
        "warmup_sd_lambda": P.Param(0.0, "lambda during warm-up", P.non_negative),
        "post_warmup_loss_scale": P.Param(1.0, "factor on the whole loss after warm-up (the CMNIST recipe: 2e-5; "
                                               "not a no-op with Adam's epsilon)", P.positive),
    }

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self._targets: torch.Tensor | None = None  # a list sd_gamma on the logits' device, made once

    def loss(self, logits: torch.Tensor, y: torch.Tensor, step: int, model: nn.Module) -> torch.Tensor:
        p = self.params
        penalty = sd_penalty(logits, y, self._gamma(logits), per_class_mean=p["per_class_mean"])
        if step < p["warmup_steps"]:
            return cross_entropy(logits, y) + p["warmup_sd_lambda"] / 2 * penalty
        return p["post_warmup_loss_scale"] * (cross_entropy(logits, y) + p["sd_lambda"] / 2 * penalty)

    def phase(self, step: int) -> Any:
        return step < self.params["warmup_steps"]  # the warm-up's lambda, or the post-warm-up lambda and scale

    def _gamma(self, logits: torch.Tensor) -> float | torch.Tensor:
        """sd_gamma; a list as a tensor on the logits' device, made once (not a host-to-device copy per step)."""
        gamma = self.params["sd_gamma"]
        if not isinstance(gamma, list):
            return gamma
        if self._targets is None or (self._targets.device, self._targets.dtype) != (logits.device, logits.dtype):
            targets = torch.tensor(gamma, dtype=logits.dtype)
            if logits.device.type == "cuda":  # from pinned memory, so the host does not wait for the device
                targets = targets.pin_memory()
            self._targets = targets.to(logits.device, non_blocking=True)
        return self._targets


METHODS: dict[str, type[Method]] = {cls.NAME: cls for cls in (ERM, WeightDecay, SpectralDecoupling)}


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise SpecError(f"unknown method {name!r}; methods: {', '.join(sorted(METHODS))}") from None


def build_method(spec: dict[str, Any]) -> Method:
    """A method from its spec section {"name": ..., **params}."""
    params = {k: v for k, v in spec.items() if k != "name"}
    return method_class(spec.get("name"))(params)


def describe_all() -> list[dict]:
    return [{"name": cls.NAME, "description": cls.DESCRIPTION, "params": P.describe(cls.PARAMS)}
            for cls in METHODS.values()]
