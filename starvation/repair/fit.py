"""Fitting a new head on penultimate features of the training data, and choosing it on a
validation part carved from the same training data. Nothing here sees the test split: the
caller hands over the training splits' features only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from starvation.errors import SpecError
from starvation.methods import cross_entropy
from starvation.repair.heads import LinearHead


@dataclass
class TrainingFeatures:
    """Penultimate features of the pooled training splits, with their labels and attribute."""

    features: torch.Tensor  # [N, d]
    y: torch.Tensor  # [N] class index
    attribute: torch.Tensor  # [N] value of the spurious attribute
    splits: list[str] = field(default_factory=list)  # which splits they came from, for the record

    def __post_init__(self) -> None:
        n = len(self.y)
        if self.features.dim() != 2 or len(self.features) != n or len(self.attribute) != n:
            raise SpecError("features, labels and attribute must have one row per training example")
        if n == 0:
            raise SpecError("the training splits hold no examples to fit a head on")
        if not torch.isfinite(self.features).all():
            raise SpecError("the model's feature layer gave non-finite values on the training data")

    def subset(self, index: np.ndarray) -> TrainingFeatures:
        rows = torch.from_numpy(index)
        return TrainingFeatures(self.features[rows], self.y[rows], self.attribute[rows], self.splits)


def carve_validation(
    y: torch.Tensor, attribute: torch.Tensor, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): `fraction` of every (label, attribute) group, drawn with
    `seed`, so that each group the training data has is in both parts where it has 2+ members."""
    rng = np.random.default_rng(seed)
    y_np, a_np = y.numpy(), attribute.numpy()
    fit, validation = [], []
    for label in np.unique(y_np):
        for value in np.unique(a_np[y_np == label]):
            members = rng.permutation(np.flatnonzero((y_np == label) & (a_np == value)))
            n_val = 0 if len(members) < 2 else min(max(int(round(fraction * len(members))), 1), len(members) - 1)
            validation.append(members[:n_val])
            fit.append(members[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(validation))


def predicted_class(logits: torch.Tensor) -> torch.Tensor:
    """One logit: class 1 where positive; k logits: the argmax (as the audit predicts)."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


def score(head: LinearHead, data: TrainingFeatures) -> dict[str, Any]:
    """Accuracy, worst-group accuracy and per-group accuracy of `head` on `data`."""
    correct = predicted_class(head.logits(data.features.to(head.weight.dtype))) == data.y
    groups = []
    for label in torch.unique(data.y).tolist():
        for value in torch.unique(data.attribute[data.y == label]).tolist():
            members = (data.y == label) & (data.attribute == value)
            groups.append(
                {
                    "label": int(label),
                    "attribute": int(value),
                    "n": int(members.sum()),
                    "accuracy": float(correct[members].double().mean()),
                }
            )
    return {
        "accuracy": float(correct.double().mean()) if len(correct) else None,
        "worst_group_accuracy": min((g["accuracy"] for g in groups), default=None),
        "groups": groups,
    }


class Standardiser:
    """Features scaled to mean 0, std 1 on the fit part; a head fitted on scaled features is
    folded back into one on the raw features, which is what the model's head reads."""

    def __init__(self, features: torch.Tensor) -> None:
        x = features.double()
        self.mean = x.mean(0)
        self.std = x.std(0, unbiased=False)
        self.std[self.std < 1e-8] = 1.0  # a constant feature (e.g. a dead ReLU) is left as it is

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features.double() - self.mean) / self.std

    def fold(self, weight: torch.Tensor, bias: torch.Tensor) -> LinearHead:
        raw_weight = weight.double() / self.std
        return LinearHead(raw_weight, bias.double() - raw_weight @ self.mean)


def to_output_shape(weight: torch.Tensor, bias: torch.Tensor, num_outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A binary classifier's one row ([1, d]) as the model's head shape: as is for one logit;
    for two logits split in halves, so that logit1 - logit0 is the fitted score."""
    if weight.shape[0] == num_outputs:
        return weight, bias
    if weight.shape[0] == 1 and num_outputs == 2:
        return torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    raise SpecError(f"a head of {weight.shape[0]} row(s) cannot be written into a model with {num_outputs} outputs")


def check_labels(data: TrainingFeatures, num_outputs: int) -> list[int]:
    labels = sorted(int(v) for v in torch.unique(data.y).tolist())
    num_classes = 2 if num_outputs == 1 else num_outputs
    if len(labels) < 2:
        raise SpecError("the training data hold a single label, so no head can be fitted")
    if labels[0] < 0 or labels[-1] >= num_classes:
        raise SpecError(f"labels {labels} do not fit a model with {num_outputs} output(s)")
    if num_outputs > 2 and len(labels) != num_outputs:
        raise SpecError(
            f"the training data hold {len(labels)} of the model's {num_outputs} classes; a refitted "
            "head needs examples of every class"
        )
    return labels


def group_balanced_weights(y: torch.Tensor, attribute: torch.Tensor) -> np.ndarray:
    """Per-example weights giving every (label, attribute) group the same total weight."""
    y_np, a_np = y.numpy(), attribute.numpy()
    keys = y_np.astype(np.int64) * (int(a_np.max()) + 1 if len(a_np) else 1) + a_np.astype(np.int64)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return weights * (len(weights) / weights.sum())


def fit_logistic(
    data: TrainingFeatures, num_outputs: int, inverse_strength: float, *, balanced: bool, max_iter: int = 200
) -> LinearHead:
    """(Group-balanced) L2 logistic regression on standardised features, folded to a raw head.

    `inverse_strength` is C as scikit-learn means it: minimise C * sum_i w_i * loss_i + ||W||^2 / 2,
    with the example weights w_i averaging 1. A binary task fits one score s and writes it as the
    model's one logit, or as logits (-s/2, s/2) for a two-logit head."""
    check_labels(data, num_outputs)
    weights = torch.from_numpy(group_balanced_weights(data.y, data.attribute)) if balanced else None
    outputs = 1 if num_outputs == 2 else num_outputs
    l2 = 1.0 / (inverse_strength * len(data.y))  # C * sum == C * N * mean: divide through by C * N
    head = _fit_linear(data, outputs, weights=weights, l2=l2, sd_lambda=0.0, max_iter=max_iter)
    return LinearHead(*to_output_shape(head.weight, head.bias, num_outputs))


def fit_sd(data: TrainingFeatures, num_outputs: int, sd_lambda: float, *, max_iter: int) -> LinearHead:
    """Cross-entropy + sd_lambda/2 * mean(squared logits) over the head's weights and bias, on
    standardised features; no group labels. The objective is convex."""
    check_labels(data, num_outputs)
    return _fit_linear(data, num_outputs, weights=None, l2=0.0, sd_lambda=sd_lambda, max_iter=max_iter)


def _fit_linear(
    data: TrainingFeatures,
    num_outputs: int,
    *,
    weights: torch.Tensor | None,
    l2: float,
    sd_lambda: float,
    max_iter: int,
) -> LinearHead:
    """Full-batch L-BFGS in float64 of: weighted mean cross-entropy + l2/2 * ||W||^2 +
    sd_lambda/2 * mean(squared logits), on standardised features (bias unpenalised by l2)."""
    scale = Standardiser(data.features)
    x, y = scale(data.features), data.y
    weight = torch.zeros(num_outputs, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_outputs, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight.T + bias
        if weights is None:
            data_term = cross_entropy(logits[:, 0] if num_outputs == 1 else logits, y)
        elif num_outputs == 1:
            data_term = (
                torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.double(), reduction="none")
                * weights
            ).mean()
        else:
            data_term = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * weights).mean()
        loss = data_term + l2 / 2 * (weight**2).sum() + sd_lambda / 2 * (logits**2).sum(dim=1).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return scale.fold(weight.detach(), bias.detach())
