"""`finetune_sd`: the whole network trained on from its weights with SD, once per candidate sd_lambda, the candidate
chosen on rows held out of the training splits. What a repair job runs (worker/repair_job.py) and what
bench/repair.py measures, from one place."""
from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from starvation import datasets
from starvation.checkpoints import AuditableModel, load_checkpoint
from starvation.checkpoints.save import CheckpointFile
from starvation.repair.methods import FinetuneSD


@dataclass
class Finetuned:
    model: AuditableModel  # the chosen candidate's network, loaded from its checkpoint
    checkpoint: CheckpointFile  # its files
    candidates: list[dict[str, Any]]  # {"sd_lambda", "validation": scores} per candidate, in the method's order
    chosen: int  # the index of the kept candidate
    validation: datasets.Split  # the held-out rows that chose


def finetune_sd(method: FinetuneSD, dataset_spec: dict[str, Any], dataset: datasets.Dataset,
                model_info: dict[str, Any], weights: Mapping[str, torch.Tensor], seed: int, *,
                out_dir: pathlib.Path, device: str = "cpu", data_dir: str | None = None, registered: bool,
                on_progress: Callable[[float], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> Finetuned:
    """Each candidate's run from `weights` on `dataset` less its held-out rows (`train`'s `holdout`, the same rows
    as `datasets.hold_out`), scored there; the best by the method's criterion (then accuracy) kept.
    `registered`: `dataset` is a user's, passed to `train` as it is (a built-in is drawn again by its seed)."""
    from starvation.training import train

    holdout = datasets.hold_out(dataset, method.params["validation_fraction"]).splits[datasets.HOLDOUT_SPLIT]
    lambdas, criterion = method.params["sd_lambdas"], method.params["criterion"]
    candidates, kept = [], None  # kept: (key, index, model, checkpoint) of the best so far
    for index, sd_lambda in enumerate(lambdas):
        def progress(fraction: float, index: int = index) -> None:
            if on_progress is not None:
                on_progress((index + fraction) / len(lambdas))

        trained = train(method.train_spec(dataset_spec, model_info, sd_lambda, seed),
                        out_dir=out_dir / f"sd_lambda{index}", device=device, data_dir=data_dir, on_progress=progress,
                        should_stop=should_stop, dataset=dataset if registered else None, init_weights=weights)
        checkpoint = trained.checkpoints[0]
        model = load_checkpoint(checkpoint.safetensors_path, "safetensors").to(device)
        scores = scored(model.module, holdout)
        candidates.append({"sd_lambda": sd_lambda, "validation": scores})
        key = (scores[criterion] or 0.0, scores["accuracy"] or 0.0)
        if kept is None or key > kept[0]:  # ties go to the first
            kept = (key, index, model, checkpoint)
    _, chosen, model, checkpoint = kept
    return Finetuned(model=model, checkpoint=checkpoint, candidates=candidates, chosen=chosen, validation=holdout)


def scored(network: torch.nn.Module, split: datasets.Split) -> dict[str, float | None]:
    """Accuracy and worst-group accuracy of `network` on `split`."""
    from starvation.training.sweep import split_scores

    with torch.no_grad():
        return split_scores(network.eval(), split, next(network.parameters()).device, with_groups=True)
