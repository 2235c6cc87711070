"""Training objectives by name: a method is a small class whose `loss(logits, y, step, model)` is minimised.

Logits are [N] for a binary task (one logit; y in {0, 1}) and [N, k] for k classes. The data term is the
cross-entropy: binary cross-entropy with logits, which equals the paper's logistic loss log(1 + exp(-y*f))
with y mapped to +-1.

A method that needs to know more about each example than its label names it in `NEEDS`; the training loop
then passes it to `loss` as a keyword, one-hot float so a loss can average within each with a matmul (no
data-dependent shapes, no read back to the host, and it batches under `vmap`):
- `environment` [N, environments]: which training split each example came from (Colored MNIST: train1, train2);
- `group` [N, classes x attribute values]: each example's (label, spurious attribute) pair, at
  label * attribute values + attribute;
- anything the method computes itself before its run (`Method.prepare`): JTT's `error_set` [N], 1 for the
  examples an identification model got wrong, 0 for the others.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from starvation import params as P
from starvation.errors import SpecError


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: BCE-with-logits for one logit, softmax cross-entropy for k."""
    if logits.ndim == 1:
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
    return F.cross_entropy(logits, y)


def sd_penalty(
    logits: torch.Tensor, y: torch.Tensor, gamma: float | list[float] | torch.Tensor, *, per_class_mean: bool
) -> torch.Tensor:
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
        target: float | torch.Tensor = targets[y] if binary else targets
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


class Parameterised(Protocol):
    """What a loss sees as `model`: its parameters (a network, or one seed's slice of a stacked model)."""

    def parameters(self) -> Iterator[torch.Tensor]: ...


class Preparation(Protocol):
    """What the training loop offers `Method.prepare` for one seed (`training.loop.SeedPreparation`)."""

    @property
    def labels(self) -> torch.Tensor:
        """[N]: the pooled training examples' labels, in the order of `Dataset.train_data()`."""
        ...

    def train_predictions(self, method: dict[str, Any], steps: int) -> torch.Tensor:
        """[N]: the class each pooled training example gets from a model of the resolved `method` section
        ({"name": ..., **params}) trained `steps` updates from the seed's initialisation (the spec's model,
        optimizer, batch size and precision)."""
        ...


class Method:
    """A named training objective with declared hyper-parameters."""

    NAME: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    PARAMS: ClassVar[dict[str, P.Param]] = {}
    NEEDS: ClassVar[tuple[str, ...]] = ()  # per-example facts `loss` takes as keywords (see the module docstring)
    SEQUENTIAL_ONLY: ClassVar[str | None] = None  # why seeds cannot train stacked (None: they can)
    # Parameters that `loss` uses only as numbers in tensor arithmetic (no branch, no shape, no `phase`): a sweep
    # may give each member of one stacked model its own value of these (`with_params`, as 0-d or [k] tensors).
    TENSOR_PARAMS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = P.resolve(f"method {self.NAME!r}", self.PARAMS, params)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, step: int, model: Parameterised) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, offered: Preparation) -> dict[str, torch.Tensor]:
        """Per-example inputs of `loss` that this method computes for a seed before its run, by name (each also in
        `NEEDS`), in the order of `Dataset.train_data()`; `offered`: what the loop can run for it. None here."""
        return {}

    def with_params(self, values: dict[str, Any]) -> Method:
        """This method with some `TENSOR_PARAMS` replaced by tensors (one member's values inside `vmap`);
        not checked again: the sweep resolved each member's setting as a spec first."""
        unknown = sorted(set(values) - set(self.TENSOR_PARAMS))
        if unknown:
            raise ValueError(f"method {self.NAME!r} cannot take {', '.join(unknown)} as tensors")
        twin = copy.copy(self)
        twin.params = {**self.params, **values}
        return twin

    def phase(self, step: int) -> Any:
        """What the loss's computation at `step` depends on besides its tensors: equal phases, equal code path.

        A CUDA graph captured at one step is replayed at every step of the same phase (training.GraphedUpdates).
        """
        return None


class ERM(Method):
    NAME: ClassVar[str] = "erm"
    DESCRIPTION: ClassVar[str] = "empirical risk minimisation: the cross-entropy alone"

    def loss(self, logits: torch.Tensor, y: torch.Tensor, step: int, model: Parameterised) -> torch.Tensor:
        return cross_entropy(logits, y)


class WeightDecay(Method):
    NAME: ClassVar[str] = "weight_decay"
    DESCRIPTION: ClassVar[str] = "cross-entropy + weight_decay * sum of squared weights (biases excluded)"
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "weight_decay": P.Param(
            1e-3, "coefficient of the squared L2 norm of the weight matrices/kernels", P.non_negative
        ),
    }
    TENSOR_PARAMS: ClassVar[tuple[str, ...]] = ("weight_decay",)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, step: int, model: Parameterised) -> torch.Tensor:
        squared_norm = sum(w.pow(2).sum() for w in model.parameters() if w.ndim > 1)
        return cross_entropy(logits, y) + self.params["weight_decay"] * squared_norm


class SpectralDecoupling(Method):
    NAME: ClassVar[str] = "sd"
    DESCRIPTION: ClassVar[str] = (
        "Spectral Decoupling: cross-entropy + sd_lambda/2 * mean((logit - gamma_y)^2), "
        "with an optional warm-up and post-warm-up loss scale"
    )
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "sd_lambda": P.Param(
            0.1,
            "coefficient lambda of lambda/2 * mean((logit - gamma_y)^2) after warm-up (a "
            "coefficient c on the plain mean, as the paper's CelebA 0.1, is sd_lambda 2c)",
            P.non_negative,
        ),
        "sd_gamma": P.Param(0.0, "logit target: a scalar for every class or one value per class", P.number_or_list),
        "per_class_mean": P.Param(
            False, "average the penalty within each class, then sum over classes (CelebA)", P.boolean
        ),
        "warmup_steps": P.Param(0, "steps before sd_lambda and the loss scale apply", P.non_negative_int),
        "warmup_sd_lambda": P.Param(0.0, "lambda during warm-up", P.non_negative),
        "post_warmup_loss_scale": P.Param(
            1.0,
            "factor on the whole loss after warm-up (the CMNIST recipe: 2e-5; not a no-op with Adam's epsilon)",
            P.positive,
        ),
    }
    # sd_gamma as a tensor is one target per class ([2] for one logit: gamma[y])
    TENSOR_PARAMS: ClassVar[tuple[str, ...]] = ("sd_lambda", "sd_gamma", "warmup_sd_lambda", "post_warmup_loss_scale")

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self._targets: torch.Tensor | None = None  # a list sd_gamma on the logits' device, made once

    def loss(self, logits: torch.Tensor, y: torch.Tensor, step: int, model: Parameterised) -> torch.Tensor:
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


def mean_within(values: torch.Tensor, membership: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of `values` [N] within each environment or group [E], which of them the batch holds [E] as 0/1).

    `membership`: one-hot [N, E]. One absent from the batch has mean 0 and presence 0.
    """
    counts = membership.sum(dim=0)
    return membership.T @ values / counts.clamp(min=1), (counts > 0).to(values.dtype)


def irm_scale_gradient(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example, d/ds of the cross-entropy of s * logits at s = 1: IRMv1's gradient w.r.t. a dummy scale.

    In closed form, (sigmoid(f) - y) * f for one logit and sum_j (softmax(f)_j - [j = y]) * f_j for k, so the
    penalty needs no nested autograd (and batches under vmap); its mean over an environment is that gradient.
    """
    if logits.ndim == 1:
        return (torch.sigmoid(logits) - y.to(logits.dtype)) * logits
    residual = torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return (residual * logits).sum(dim=1)


def per_example_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if logits.ndim == 1:
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none")
    return F.cross_entropy(logits, y, reduction="none")


def irm_penalty(logits: torch.Tensor, y: torch.Tensor, environment: torch.Tensor) -> torch.Tensor:
    """IRMv1: the squared gradient of each environment's risk w.r.t. a scale on the logits at 1, averaged over
    the environments in the batch. Zero when scaling the logits cannot lower any environment's risk."""
    gradients, present = mean_within(irm_scale_gradient(logits, y), environment)
    return (present * gradients**2).sum() / present.sum().clamp(min=1)


class IRM(Method):
    """Invariant Risk Minimization, the IRMv1 penalty: Arjovsky, Bottou, Gulrajani, Lopez-Paz 2019,
    "Invariant Risk Minimization", arXiv:1907.02893, Section 3.1 and Appendix D (the Colored MNIST code the
    Gradient Starvation authors reuse for their Table 1 IRM row: `Figure_4_and_table_1/cmnist.py`).

    loss = mean over environments of their cross-entropy + l2_weight * sum of squared parameters (weights and
    biases, as that script) + w * mean over environments of the penalty, with w = 1 before
    `penalty_anneal_steps` and `penalty_weight` from then on, when the whole loss is divided by w (the
    script's rescaling, to keep gradients in range). Defaults: DomainBed's `hparams_registry` (irm_lambda 1e2,
    irm_penalty_anneal_iters 500), no L2; the Colored MNIST recipe is the preset `paper_cmnist_irm`.
    """

    NAME: ClassVar[str] = "irm"
    DESCRIPTION: ClassVar[str] = (
        "Invariant Risk Minimization (IRMv1, Arjovsky et al. 2019): per-environment "
        "cross-entropy + penalty_weight * squared gradient of each environment's risk "
        "w.r.t. a scale on the logits, after penalty_anneal_steps (loss then divided by "
        "penalty_weight); needs the training environments"
    )
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "penalty_weight": P.Param(
            1e2,
            "weight of the IRMv1 penalty from penalty_anneal_steps on (1 before); "
            "when above 1 the whole loss is divided by it",
            P.non_negative,
        ),
        "penalty_anneal_steps": P.Param(
            500, "steps trained with penalty weight 1 before penalty_weight applies", P.non_negative_int
        ),
        "l2_weight": P.Param(0.0, "coefficient of the sum of squared parameters, biases included", P.non_negative),
    }
    NEEDS: ClassVar[tuple[str, ...]] = ("environment",)

    def loss(  # type: ignore[override]  # `environment` is in NEEDS: the loop passes it
        self, logits: torch.Tensor, y: torch.Tensor, step: int, model: Parameterised, *, environment: torch.Tensor
    ) -> torch.Tensor:
        p = self.params
        weight = p["penalty_weight"] if step >= p["penalty_anneal_steps"] else 1.0
        risks, present = mean_within(per_example_cross_entropy(logits, y), environment)
        loss = (present * risks).sum() / present.sum().clamp(min=1) + weight * irm_penalty(logits, y, environment)
        if p["l2_weight"]:
            loss = loss + p["l2_weight"] * sum(w.pow(2).sum() for w in model.parameters())
        return loss / weight if weight > 1.0 else loss

    def phase(self, step: int) -> Any:
        return step < self.params["penalty_anneal_steps"]


class GroupDRO(Method):
    """Group distributionally robust optimisation, online: Sagawa, Koh, Hashimoto, Liang 2020, "Distributionally
    Robust Neural Networks for Group Shifts" (ICLR, arXiv:1911.08731), Algorithm 1, as in their `loss.py`
    (github kohpangwei/group_DRO; the Gradient Starvation authors' Table_2 code carries the same): groups are
    (label, attribute) pairs; each update, the weights q <- q * exp(step_size * each group's mean loss),
    normalised, and the loss is sum_g q_g * group g's mean loss. q starts uniform; a group absent from a batch
    has loss 0 there. Default step_size 0.01 (their `robust_step_size`). Their generalisation adjustment
    C/sqrt(n_g) (`--generalization_adjustment`, default 0) is not implemented.

    The weights are state carried from update to update, one set per model: seeds train one after another.
    """

    NAME: ClassVar[str] = "group_dro"
    DESCRIPTION: ClassVar[str] = (
        "Group DRO (Sagawa et al. 2020): the loss of the worst (label, attribute) groups, "
        "by weights that grow exponentially with each group's loss at rate step_size; "
        "needs the attribute of every training example"
    )
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "step_size": P.Param(
            0.01, "eta: how fast a group's weight grows with its loss (q_g *= exp(eta * loss_g))", P.non_negative
        ),
    }
    NEEDS: ClassVar[tuple[str, ...]] = ("group",)
    SEQUENTIAL_ONLY: ClassVar[str | None] = "group_dro's group weights are state kept per model"

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.group_weights: torch.Tensor | None = None  # q, made on the first update on the logits' device

    def loss(  # type: ignore[override]  # `group` is in NEEDS: the loop passes it
        self, logits: torch.Tensor, y: torch.Tensor, step: int, model: Parameterised, *, group: torch.Tensor
    ) -> torch.Tensor:
        group_losses, _ = mean_within(per_example_cross_entropy(logits, y), group)
        if self.group_weights is None:
            self.group_weights = torch.full((group.shape[1],), 1 / group.shape[1], device=logits.device)
        with torch.no_grad():  # in place: a CUDA graph replays the update on the same tensor
            grown = self.group_weights * torch.exp(self.params["step_size"] * group_losses)
            self.group_weights.copy_(grown / grown.sum())
        return group_losses @ self.group_weights


class JTT(Method):
    """Just Train Twice: Liu, Haghgoo, Chen, Raghunathan, Koh, Sagawa, Liang, Finn 2021, "Just Train Twice:
    Improving Group Robustness without Training Group Information" (ICML, arXiv:2107.09044), Algorithm 1, as in
    their code (github anniesch/jtt): an identification model is trained with ERM for T steps; the training
    examples it then gets wrong (the error set) are upweighted by lambda_up in a second model trained from scratch
    (here: from the seed's own initialisation, the same data, optimizer and schedule). No group labels anywhere.

    Their code upsamples the error set lambda_up times; here each example's cross-entropy is weighted (1, or
    lambda_up in the error set) and the loss is the weighted mean: the same objective, exactly so in full batch,
    in expectation with minibatches. The authors tune T and lambda_up per dataset (CelebA: 1 epoch and 50,
    Waterbirds: 60 epochs and 100, in their scripts); the defaults here are ours for Colored MNIST's full-batch
    recipe: 100 steps (ERM has learnt the colour, not yet the digits' noise) and 6 (the error set, about the
    15 % of examples whose colour disagrees with the label, then weighs about as much as the rest).
    """

    NAME: ClassVar[str] = "jtt"
    DESCRIPTION: ClassVar[str] = (
        "Just Train Twice (Liu et al. 2021): ERM for identification_steps finds the "
        "training examples it gets wrong; a new model from the same initialisation "
        "then trains with their cross-entropy weighted by upweight; no group labels"
    )
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "identification_steps": P.Param(100, "T: ERM steps of the identification model", P.positive_int),
        "upweight": P.Param(6.0, "lambda_up: the weight of an error-set example's loss (1 for the others)", P.positive),
    }
    NEEDS: ClassVar[tuple[str, ...]] = ("error_set",)
    SEQUENTIAL_ONLY: ClassVar[str | None] = "JTT trains an identification model per seed first"

    def prepare(self, offered: Preparation) -> dict[str, torch.Tensor]:
        """The error set: what ERM, trained identification_steps from the seed's initialisation, gets wrong."""
        wrong = offered.train_predictions({"name": "erm"}, self.params["identification_steps"]) != offered.labels
        return {"error_set": wrong.float()}

    def loss(  # type: ignore[override]  # `error_set` is in NEEDS: the loop passes it
        self, logits: torch.Tensor, y: torch.Tensor, step: int, model: Parameterised, *, error_set: torch.Tensor
    ) -> torch.Tensor:
        weights = 1.0 + (self.params["upweight"] - 1.0) * error_set
        return (weights * per_example_cross_entropy(logits, y)).sum() / weights.sum()


METHODS: dict[str, type[Method]] = {cls.NAME: cls for cls in (ERM, WeightDecay, SpectralDecoupling, IRM, GroupDRO, JTT)}


def method_class(name: object) -> type[Method]:
    """The method called `name` (a spec's, unchecked: anything else is a SpecError naming it)."""
    if not isinstance(name, str) or name not in METHODS:
        raise SpecError(f"unknown method {name!r}; methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(spec: dict[str, Any]) -> Method:
    """A method from its spec section {"name": ..., **params}."""
    params = {k: v for k, v in spec.items() if k != "name"}
    return method_class(spec.get("name"))(params)
