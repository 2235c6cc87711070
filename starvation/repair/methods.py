"""Repair methods by name: each fits candidate heads on the fit part of the training data and
lets the validation part choose among them.

The original head is scored on the validation part too, but only for reference: the network was
trained on those very examples, so its head's score there is biased upwards (a model that
memorised its training set scores near 1) and cannot be compared with heads that never saw them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from starvation import params as P
from starvation.errors import SpecError
from starvation.repair.fit import TrainingFeatures, carve_validation, fit_logistic, fit_sd, score
from starvation.repair.heads import LinearHead

CRITERIA = ("worst_group_accuracy", "accuracy")


@dataclass
class HeadRepair:
    """What a repair method returns: the head to write, whether it differs from the old one,
    the resolved method and how the choice was made."""

    head: LinearHead
    changed: bool
    method: dict[str, Any]
    selection: dict[str, Any]


class RepairMethod:
    NAME: ClassVar[str]
    DESCRIPTION: ClassVar[str]
    WHOLE_NETWORK: ClassVar[bool] = False  # refits the head (False) or trains the whole network (FinetuneSD)
    STRENGTH: ClassVar[str]  # the spec's list of candidate values, e.g. "sd_lambdas"
    CANDIDATE: ClassVar[str]  # one candidate's name in `selection`, e.g. "sd_lambda"
    PARAMS: ClassVar[dict[str, P.Param]] = {}
    COMMON: ClassVar[dict[str, P.Param]] = {
        "validation_fraction": P.Param(
            0.2, "share of every (label, attribute) group of the training data held out to choose on", P.probability
        ),
    }

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = P.resolve(f"repair method {self.NAME!r}", {**self.COMMON, **self.PARAMS}, params, field="method")
        if not 0 < self.params["validation_fraction"] < 1:
            raise P.ParamError(
                "method.validation_fraction must be between 0 and 1 (exclusive)", field="method.validation_fraction"
            )

    def resolved(self) -> dict[str, Any]:
        return {"name": self.NAME, **self.params}

    def criterion(self, data: TrainingFeatures) -> str:
        return "worst_group_accuracy"

    def fit(self, data: TrainingFeatures, num_outputs: int, strength: float) -> LinearHead:
        raise NotImplementedError

    def repair(self, data: TrainingFeatures, old_head: LinearHead, *, seed: int) -> HeadRepair:
        """Carve the validation part (seeded), fit one head per strength on the rest, choose on
        the validation part. `data` must be training data only: nothing else is looked at."""
        fit_rows, val_rows = carve_validation(data.y, data.attribute, self.params["validation_fraction"], seed)
        if len(val_rows) == 0:
            raise SpecError("the training data are too small to hold out a validation part")
        fit_part, validation = data.subset(fit_rows), data.subset(val_rows)
        criterion = self.criterion(validation)

        def key(scores: dict[str, Any]) -> tuple[float, float]:
            return (scores[criterion] or 0.0, scores["accuracy"] or 0.0)

        candidates, heads = [], []
        for strength in self.params[self.STRENGTH]:
            head = self.fit(fit_part, old_head.num_outputs, strength)
            heads.append(head)
            candidates.append(
                {
                    self.CANDIDATE: strength,
                    "fit": _brief(score(head, fit_part)),
                    "validation": _brief(score(head, validation)),
                }
            )
        best = max(range(len(heads)), key=lambda i: key(candidates[i]["validation"]))
        chosen = candidates[best]
        selection = {
            "fitted_on": {
                "data": "training splits less the validation part",
                "splits": data.splits,
                "n": int(len(fit_rows)),
            },
            "chosen_on": {
                "data": "validation part carved from the training splits",
                "splits": data.splits,
                "n": int(len(val_rows)),
                "fraction": self.params["validation_fraction"],
                "seed": seed,
                "stratified_by": "label x attribute",
                "criterion": criterion,
            },
            "test_split_used": False,
            "candidates": candidates,
            "chosen": {k: v for k, v in chosen.items() if k not in ("fit", "validation")},
            "chosen_validation": chosen["validation"],
            "original_head": {
                "validation": _brief(score(old_head, validation)),
                "note": "for reference only, not a candidate: the network was trained on these examples",
            },
            "changed": True,
        }
        return HeadRepair(head=heads[best], changed=True, method=self.resolved(), selection=selection)


class LastLayer(RepairMethod):
    NAME: ClassVar[str] = "last_layer"
    DESCRIPTION: ClassVar[str] = (
        "group-balanced L2 logistic regression refit of the last linear layer on the penultimate features "
        "(Kirichenko et al. 2023, DFR); its strength chosen by worst-group accuracy on the validation part"
    )
    STRENGTH: ClassVar[str] = "inverse_strengths"
    CANDIDATE: ClassVar[str] = "inverse_strength"
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "inverse_strengths": P.Param(
            [0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
            "candidate C (inverse L2 strength) of the logistic regression on standardised features",
            P.list_of(P.positive, min_length=1, max_length=20),
        ),
        "group_balanced": P.Param(True, "weight the (label, attribute) groups equally in the fit", P.boolean),
        "max_iter": P.Param(200, "L-BFGS iterations per candidate", P.int_between(1, 10_000)),
    }

    def fit(self, data: TrainingFeatures, num_outputs: int, strength: float) -> LinearHead:
        return fit_logistic(
            data, num_outputs, strength, balanced=self.params["group_balanced"], max_iter=self.params["max_iter"]
        )


class LastLayerSD(RepairMethod):
    NAME: ClassVar[str] = "last_layer_sd"
    DESCRIPTION: ClassVar[str] = (
        "refit of the last linear layer with cross-entropy + sd_lambda/2 * mean(squared logits) (Spectral "
        "Decoupling), no group labels in the fit; sd_lambda chosen on the validation part"
    )
    STRENGTH: ClassVar[str] = "sd_lambdas"
    CANDIDATE: ClassVar[str] = "sd_lambda"
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "sd_lambdas": P.Param(
            [0.01, 0.1, 1.0, 10.0],
            "candidate SD coefficients lambda",
            P.list_of(P.positive, min_length=1, max_length=20),
        ),
        "max_iter": P.Param(200, "L-BFGS iterations per candidate", P.int_between(1, 10_000)),
        "criterion": P.Param(
            "worst_group_accuracy",
            "what the validation part chooses by: worst_group_accuracy (needs the attribute) or accuracy",
            P.one_of(*CRITERIA),
        ),
    }

    def criterion(self, data: TrainingFeatures) -> str:
        return self.params["criterion"]

    def fit(self, data: TrainingFeatures, num_outputs: int, strength: float) -> LinearHead:
        return fit_sd(data, num_outputs, strength, max_iter=self.params["max_iter"])


class FinetuneSD(RepairMethod):
    """The whole network trained on from the checkpoint with Spectral Decoupling (the paper's fix, from where the
    model is rather than from scratch), once per candidate sd_lambda; the candidate whose network scores best on
    a validation part held out of the training splits (`train` spec `holdout`) is kept. No group labels in the
    training; the validation part's groups choose. Our own networks (a safetensors checkpoint, a train job's seed)
    train through `train`; a TorchScript program trains in its jail (`starvation.repair.finetune.Finetuning`); an
    ONNX graph is not trained."""

    NAME: ClassVar[str] = "finetune_sd"
    DESCRIPTION: ClassVar[str] = (
        "the whole network fine-tuned from the checkpoint with cross-entropy + sd_lambda/2 * mean(squared logits) "
        "(Spectral Decoupling) on the training splits less a validation part, one run per candidate sd_lambda, "
        "chosen on the validation part; TorchScript and safetensors checkpoints (not ONNX)"
    )
    WHOLE_NETWORK: ClassVar[bool] = True
    STRENGTH: ClassVar[str] = "sd_lambdas"
    CANDIDATE: ClassVar[str] = "sd_lambda"
    PARAMS: ClassVar[dict[str, P.Param]] = {
        "sd_lambdas": P.Param(
            [1.0],
            "candidate SD coefficients lambda (one fine-tuning run each)",
            P.list_of(P.positive, min_length=1, max_length=8),
        ),
        "steps": P.Param(500, "updates of each fine-tuning run", P.int_between(1, 100_000)),
        "lr": P.Param(1e-4, "Adam's learning rate", P.positive),
        "batch_size": P.Param(
            None,
            "examples per update; null: every training example (full batch; an image folder needs a number)",
            P.optional(P.positive_int),
        ),
        "criterion": P.Param(
            "worst_group_accuracy",
            "what the validation part chooses by: worst_group_accuracy or accuracy",
            P.one_of(*CRITERIA),
        ),
    }

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        if self.params["validation_fraction"] > 0.5:
            raise P.ParamError(
                "method.validation_fraction is held out of the training splits by the fine-tuning runs: at most 0.5",
                field="method.validation_fraction",
            )

    def train_spec(
        self, dataset: dict[str, Any], model_info: dict[str, Any], sd_lambda: float, seed: int
    ) -> dict[str, Any]:
        """The train spec of one candidate's run: the checkpoint's arch, SD, the validation part held out."""
        return {
            "dataset": dataset,
            "model": {"arch": model_info["arch"], **(model_info.get("arch_params") or {})},
            "method": {"name": "sd", "sd_lambda": sd_lambda},
            "optimizer": {"name": "adam", "lr": self.params["lr"]},
            "steps": self.params["steps"],
            "batch_size": self.params["batch_size"],
            "eval_every": self.params["steps"],
            "seeds": [seed],
            "holdout": self.params["validation_fraction"],
            "audit": False,
        }


REPAIR_METHODS: dict[str, type[RepairMethod]] = {cls.NAME: cls for cls in (LastLayer, LastLayerSD, FinetuneSD)}


def build_repair_method(spec: dict[str, Any] | None) -> RepairMethod:
    """A repair method from its spec section {"name": ..., **params}; default last_layer."""
    spec = dict(spec or {})
    name = spec.pop("name", None) or "last_layer"
    if name not in REPAIR_METHODS:
        raise P.ParamError(
            f"unknown repair method {name!r}; methods: {', '.join(sorted(REPAIR_METHODS))}", field="method.name"
        )
    return REPAIR_METHODS[name](spec)


def _brief(scores: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": scores["accuracy"], "worst_group_accuracy": scores["worst_group_accuracy"]}
