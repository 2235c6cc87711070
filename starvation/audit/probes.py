"""The audit's probes: each a small class behind a name in `PROBES`.

A probe asks `supports(dataset)` and `run(model, dataset, ctx)`; `run` returns the keys it adds
to the report (API.md, "Report (JSON)"). Predictions are shared through `AuditContext`, so the
test split goes through the model once however many probes read it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from starvation import ntk
from starvation.audit.intervals import (
    difference_of_shares_interval,
    mean_interval,
    net_share_interval,
    share_interval,
    wilson_interval,
)
from starvation.checkpoints import AuditableModel, CheckpointError
from starvation.datasets.base import Dataset, Split
from starvation.datasets.files import batched

CORNERS = ("core_and_spurious", "core_only", "spurious_only", "neither")
PROBE_EXAMPLES_PER_GROUP = 1_000  # linear probe: at most this many per (target, other) group
MIN_PROBE_EXAMPLES_PER_GROUP = 4  # two to fit on, two to score on


@dataclass
class AuditContext:
    """What probes share in one audit: the seed, and logits cached per named split."""

    seed: int
    batch_size: int = 1024
    _logits: dict[str, torch.Tensor] = field(default_factory=dict)

    def logits(self, model: AuditableModel, split: Split, key: str) -> torch.Tensor:
        """Logits [N, k] on CPU for `split`, computed once per `key`."""
        if key not in self._logits:
            logits = batched(model.logits, split.x, model.device, self.batch_size)
            if not bool(torch.isfinite(logits).all()):  # a report must hold numbers, never NaN or infinity
                bad = int((~torch.isfinite(logits)).any(dim=-1).sum()) if logits.dim() > 1 else len(logits)
                raise CheckpointError(
                    "non_finite_output",
                    f"The model's outputs on {bad} of {len(logits)} examples "
                    "are NaN or infinite; an audit needs finite logits.",
                )
            self._logits[key] = logits
        return self._logits[key]

    def predictions(self, model: AuditableModel, split: Split, key: str) -> torch.Tensor:
        return predicted_class(self.logits(model, split, key))


def predicted_class(logits: torch.Tensor) -> torch.Tensor:
    """One logit: class 1 where it is positive; k logits: the argmax."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def predictive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the predicted distribution: Bernoulli(sigmoid) for one logit, softmax else."""
    logits = logits.double()
    if logits.shape[1] == 1:
        z = logits[:, 0]
        p = torch.sigmoid(z)
        # -log p = softplus(-z) and -log(1 - p) = softplus(z): stable for large |z|
        return p * torch.nn.functional.softplus(-z) + (1 - p) * torch.nn.functional.softplus(z)
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def predicted_class_log_odds(logits: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of class `predicted` per example: the logit itself (signed) for one logit."""
    logits = logits.double()
    if logits.shape[1] == 1:
        return torch.where(predicted == 1, logits[:, 0], -logits[:, 0])
    log_p = torch.log_softmax(logits, dim=1)
    chosen = log_p.gather(1, predicted[:, None])[:, 0]
    others = torch.logsumexp(log_p.scatter(1, predicted[:, None], float("-inf")), dim=1)
    return chosen - others


def predicted_class_probability(logits: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    logits = logits.double()
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits[:, 0])
        return torch.where(predicted == 1, p1, 1 - p1)
    return torch.softmax(logits, dim=1).gather(1, predicted[:, None])[:, 0]


def _most_common(keys: torch.Tensor, values: torch.Tensor) -> dict[int, int]:
    """For each key, the value most common with it (ties: the smallest value)."""
    common = {}
    for key in torch.unique(keys).tolist():
        found, counts = torch.unique(values[keys == key], return_counts=True)
        common[int(key)] = int(found[counts.argmax()])
    return common


def aligned_attributes(dataset: Dataset) -> dict[int, int]:
    """For each label, the attribute value most common with it in the pooled training data."""
    train = dataset.train_data()
    return _most_common(train.y, train.attribute)


def associated_labels(dataset: Dataset) -> dict[int, int]:
    """For each attribute value, the label most common with it in the pooled training data: the
    label the attribute 'points to' (colored_mnist: colour 1 points to label 1)."""
    train = dataset.train_data()
    return _most_common(train.attribute, train.y)


class Probe:
    name: ClassVar[str]
    by_default: ClassVar[bool] = True  # run when a spec names no probes

    def supports(self, dataset: Dataset) -> bool:
        return True

    def run(self, model: AuditableModel, dataset: Dataset, ctx: AuditContext) -> dict:
        raise NotImplementedError


PROBES: dict[str, type[Probe]] = {}


def register(cls: type[Probe]) -> type[Probe]:
    PROBES[cls.name] = cls
    return cls


def _group_accuracy(group: dict[str, Any]) -> float:
    return float(group["accuracy"])


@register
class GroupsProbe(Probe):
    """Accuracy per (label, attribute) group on the test split; aligned vs conflicting examples.

    A group is bias-aligned when its attribute is the one most common with its label in the
    training data; `average_accuracy` is the accuracy over all test examples.
    """

    name = "groups"

    def run(self, model: AuditableModel, dataset: Dataset, ctx: AuditContext) -> dict:
        test = dataset.splits[dataset.test_split]
        correct = ctx.predictions(model, test, "test") == test.y
        aligned = aligned_attributes(dataset)
        groups: list[dict[str, Any]] = []
        for label in torch.unique(test.y).tolist():
            for attribute in torch.unique(test.attribute[test.y == label]).tolist():
                in_group = (test.y == label) & (test.attribute == attribute)
                groups.append(
                    {
                        "label": int(label),
                        "attribute": int(attribute),
                        "n": int(in_group.sum()),
                        "accuracy": float(correct[in_group].double().mean()),
                        "accuracy_interval": share_interval(correct[in_group]),
                        "aligned": aligned.get(int(label)) == int(attribute),
                    }
                )
        known = torch.zeros_like(test.y, dtype=torch.bool)  # labels never seen in training are neither
        is_aligned = torch.zeros_like(test.y, dtype=torch.bool)
        for label, value in aligned.items():
            known |= test.y == label
            is_aligned |= (test.y == label) & (test.attribute == value)
        worst = min(groups, key=_group_accuracy, default=None)
        aligned_correct, conflicting_correct = correct[known & is_aligned], correct[known & ~is_aligned]
        return {
            "groups": groups,
            "average_accuracy": _mean_or_none(correct),
            "average_accuracy_interval": share_interval(correct),
            "worst_group_accuracy": worst["accuracy"] if worst else None,
            # the worst group's own interval: which group is worst is taken as given
            "worst_group_accuracy_interval": worst["accuracy_interval"] if worst else None,
            "bias_aligned_accuracy": _mean_or_none(aligned_correct),
            "bias_aligned_accuracy_interval": share_interval(aligned_correct),
            "bias_conflicting_accuracy": _mean_or_none(conflicting_correct),
            "bias_conflicting_accuracy_interval": share_interval(conflicting_correct),
            "accuracy_gap_interval": difference_of_shares_interval(
                int(aligned_correct.sum()),
                len(aligned_correct),
                int(conflicting_correct.sum()),
                len(conflicting_correct),
                seed=ctx.seed,
            ),
        }


@register
class CounterfactualProbe(Probe):
    """How often, which way and how far the prediction moves when only the spurious attribute is changed.

    A flip is *towards* the attribute's training association when the new prediction is the label
    the new attribute value went with in training (`associated_labels`), *against* it otherwise.
    A model that follows the attribute flips towards; one that is merely sensitive to it near its
    decision boundary flips both ways about equally (docs/audit.md, "Direction").
    """

    name = "counterfactual"

    def supports(self, dataset: Dataset) -> bool:
        return dataset.can_intervene

    def run(self, model: AuditableModel, dataset: Dataset, ctx: AuditContext) -> dict:
        test = dataset.splits[dataset.test_split]
        intervened = dataset.intervene(test)
        logits = ctx.logits(model, test, "test")
        logits_intervened = ctx.logits(model, intervened, "test_intervened")
        pred, pred_intervened = predicted_class(logits), predicted_class(logits_intervened)
        flipped = pred != pred_intervened
        points_to = associated_labels(dataset)
        known = torch.tensor([int(a) in points_to for a in intervened.attribute.tolist()], dtype=torch.bool)
        label_pointed_to = torch.tensor([points_to.get(int(a), -1) for a in intervened.attribute.tolist()])
        towards = flipped & known & (pred_intervened == label_pointed_to)
        against = flipped & known & ~towards
        # how far: the change of the originally predicted class's log-odds and probability
        logit_change = (
            predicted_class_log_odds(logits_intervened, pred) - predicted_class_log_odds(logits, pred)
        ).abs()
        probability_change = (
            predicted_class_probability(logits_intervened, pred) - predicted_class_probability(logits, pred)
        ).abs()
        correct, correct_intervened = pred == test.y, pred_intervened == intervened.y
        n = len(test)
        return {
            "counterfactual": {
                "flip_rate": _mean_or_none(flipped),
                "flip_rate_interval": share_interval(flipped),
                "flip_rate_towards": _mean_or_none(towards),
                "flip_rate_towards_interval": share_interval(towards),
                "flip_rate_against": _mean_or_none(against),
                "flip_rate_against_interval": share_interval(against),
                "flip_rate_net": (int(towards.sum()) - int(against.sum())) / n if n else None,
                "flip_rate_net_interval": net_share_interval(int(towards.sum()), int(against.sum()), n, seed=ctx.seed),
                "mean_abs_logit_change": _mean_or_none(logit_change),
                "mean_abs_logit_change_interval": mean_interval(logit_change, seed=ctx.seed),
                "mean_abs_probability_change": _mean_or_none(probability_change),
                "mean_abs_probability_change_interval": mean_interval(probability_change, seed=ctx.seed),
                "accuracy": _mean_or_none(correct),
                "accuracy_interval": share_interval(correct),
                "accuracy_intervened": _mean_or_none(correct_intervened),
                "accuracy_intervened_interval": share_interval(correct_intervened),
                "n": n,
            }
        }


@register
class FourCornersProbe(Probe):
    """The paper's four corners: accuracy and mean predictive entropy with the digit and/or colour removed."""

    name = "four_corners"

    def supports(self, dataset: Dataset) -> bool:
        return dataset.has_four_corners

    def run(self, model: AuditableModel, dataset: Dataset, ctx: AuditContext) -> dict:
        corners = dataset.four_corners(dataset.splits[dataset.test_split])
        result, num_outputs = {}, None
        for name in sorted(corners, key=lambda c: (CORNERS.index(c) if c in CORNERS else len(CORNERS), c)):
            split = corners[name]
            logits = ctx.logits(model, split, f"corner:{name}")
            num_outputs = logits.shape[1]
            correct = predicted_class(logits) == split.y
            result[name] = {
                "accuracy": _mean_or_none(correct),
                "accuracy_interval": share_interval(correct),
                "entropy": _mean_or_none(predictive_entropy(logits)),
                "n": len(split),
            }
        binary = num_outputs == 1
        return {
            "four_corners": result,
            "four_corners_entropy": {
                "of": "sigmoid(logit)" if binary else "softmax(logits)",
                "unit": "nats",
                "max": math.log(2) if binary else math.log(num_outputs or 1),
            },
        }


@register
class LinearProbe(Probe):
    """Logistic regressions reading the core label and the spurious attribute off the feature layer.

    Fitted and scored on the test split only, which the model never trained on, so examples it
    memorised do not count (half of each group fits, the other half scores). The core label is the
    clean one where the dataset knows it (colored_mnist: digit < 5 before the 25% label noise),
    else the label; `label_accuracy` decodes the noisy label beside it. Each target is decoded from
    examples balanced over (target, other) groups, so neither can be decoded by riding on the
    other; chance is 1 / (number of values). The same regressions on a randomly initialised copy
    of the network (`random_network`) say how much of that any network of this shape would give.
    """

    name = "linear_probe"

    def run(self, model: AuditableModel, dataset: Dataset, ctx: AuditContext) -> dict:
        if model.feature_layer is None:
            return self._unavailable(model.no_features_reason or "the model exposes no feature layer")
        test = dataset.splits[dataset.test_split]
        clean = test.core_label is not None
        core = (test.core_label if test.core_label is not None else test.y).numpy()
        attribute = test.attribute.numpy()
        targets = {"core": (core, attribute), "spurious": (attribute, core)}
        if clean:
            targets["label"] = (test.y.numpy(), attribute)
        if len(np.unique(core)) < 2:
            return self._unavailable("the test split holds a single label", layer=model.feature_layer)
        if len(np.unique(attribute)) < 2:
            return self._unavailable(
                "the spurious attribute takes a single value in the test split", layer=model.feature_layer
            )
        rng = np.random.default_rng(ctx.seed)
        drawn = {name: _balanced_halves(target, other, rng) for name, (target, other) in targets.items()}
        halves = {name: h for name, h in drawn.items() if h is not None}
        if len(halves) < len(drawn):
            return self._unavailable(
                f"some (label, attribute) group of the test split has fewer than {MIN_PROBE_EXAMPLES_PER_GROUP} "
                "examples, so label and attribute cannot be decoded separately",
                layer=model.feature_layer,
            )
        chosen = np.unique(np.concatenate([np.concatenate(h) for h in halves.values()]))
        x = test.x[torch.from_numpy(chosen)]

        def decode_all(features_of) -> dict:
            features = batched(features_of, x, model.device, ctx.batch_size).double().numpy()
            result: dict[str, Any] = {}
            for name, (target, _) in targets.items():
                fit, score = halves[name]
                row_fit, row_score = np.searchsorted(chosen, fit), np.searchsorted(chosen, score)
                correct = _decode(features[row_fit], target[fit], features[row_score], target[score], ctx.seed)
                result[f"{name}_accuracy"] = float(correct.mean())
                result[f"{name}_accuracy_interval"] = wilson_interval(int(correct.sum()), len(correct))
            result.setdefault("label_accuracy", None)
            result.setdefault("label_accuracy_interval", None)
            return result

        random_model = model.random_copy(ctx.seed)
        return {
            "linear_probe": {
                "layer": model.feature_layer,
                "data": f"{dataset.test_split} split only (held out from training)",
                "core_label": "clean (before label noise)" if clean else "label",
                **decode_all(model.features),
                "random_network": decode_all(random_model.features)
                if random_model is not None
                else {"reason": "the weights of this model format cannot be re-initialised here"},
                "n_fit": int(len(halves["core"][0])),
                "n_score": int(len(halves["core"][1])),
            }
        }

    @staticmethod
    def _unavailable(reason: str, layer: str | None = None) -> dict:
        return {"linear_probe": {"layer": layer, "core_accuracy": None, "spurious_accuracy": None, "reason": reason}}


def _balanced_halves(
    target: np.ndarray, other: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray] | None:
    """(fit, score) indices: the same number from every (target, other) group, split in half; None
    when some group is too small."""
    members = [np.flatnonzero((target == t) & (other == o)) for t in np.unique(target) for o in np.unique(other)]
    per_group = min(min(len(m) for m in members), PROBE_EXAMPLES_PER_GROUP)
    if per_group < MIN_PROBE_EXAMPLES_PER_GROUP:
        return None
    fit, score = [], []
    for m in members:
        picked = rng.choice(m, size=per_group, replace=False)
        fit.append(picked[: per_group // 2])
        score.append(picked[per_group // 2 :])
    return np.concatenate(fit), np.concatenate(score)


def _decode(fit_x: np.ndarray, fit_y: np.ndarray, score_x: np.ndarray, score_y: np.ndarray, seed: int) -> np.ndarray:
    """Whether each scored example is decoded right by a logistic regression fitted on the others."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2_000, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(fit_x, fit_y)
    return classifier.predict(score_x) == score_y


def _mean_or_none(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if len(values) else None


@register
class NtkProbe(Probe):
    """The empirical NTK of the binary logit on a group-balanced sample of the pooled training data (starvation/ntk.py):
    spectrum, centred alignments with label, attribute and core feature, the groups' shares of the top
    eigenvectors. Only for networks whose parameters we hold (not TorchScript or ONNX uploads); asked by name."""

    name = "ntk"
    by_default = False

    def run(self, model: AuditableModel, dataset: Dataset, ctx: AuditContext) -> dict:
        module = getattr(model, "module", None)
        if not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule):
            return {
                "ntk": {
                    "reason": "the NTK needs the network's parameters: not available for TorchScript or ONNX models"
                }
            }
        # The training data: the kernel's alignment there is what decides what training learns first.
        sample = ntk.KernelSample.of(dataset.train_data(), seed=ctx.seed, max_examples=ntk.MAX_EXAMPLES)
        try:
            gram = ntk.ntk_gram(module, sample.x.to(model.device)).cpu()
        except ValueError as exc:  # more than two logits: the probe reads one
            return {"ntk": {"reason": str(exc)}}
        return {
            "ntk": {
                "sample": {
                    "n": len(sample.indices),
                    "seed": ctx.seed,
                    "split": "train (pooled)",
                    "indices": sample.indices.tolist(),
                },
                **ntk.kernel_report(
                    gram,
                    y=sample.targets["label"],
                    attribute=sample.targets["attribute"],
                    core=sample.targets.get("core"),
                ),
            }
        }
