"""`finetune_sd`: the whole network trained on from its weights with SD, once per candidate sd_lambda, the candidate
chosen on rows held out of the training splits. What a repair job runs (worker/repair_job.py) and what
bench/repair.py measures, from one place.

Our own networks train through `train` (a train spec per candidate: metrics, devices, image folders). A TorchScript
program trains in its jail with `Finetuning`: the same loss, optimizer and minibatch order, on the same rows.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from starvation import datasets
from starvation.checkpoints import AuditableModel, load_checkpoint
from starvation.checkpoints.save import CheckpointFile
from starvation.errors import SpecError
from starvation.methods import build_method
from starvation.repair.methods import FinetuneSD
from starvation.training import train
from starvation.training.state import Batches
from starvation.training.sweep import split_scores
from starvation.training.update import train_step

Kept = TypeVar("Kept")
# One candidate's run: (the training data less the held-out rows, sd_lambda, progress in [0, 1]) ->
# (the trained network's logits function, what to keep of it should it be chosen).
CandidateRun = Callable[
    [datasets.Dataset, float, Callable[[float], None]], tuple[Callable[[torch.Tensor], torch.Tensor], Kept]
]


@dataclass
class Finetuned(Generic[Kept]):
    kept: Kept  # what the chosen candidate's run kept (its checkpoint files and network, or its TorchScript bytes)
    candidates: list[dict[str, Any]]  # {"sd_lambda", "validation": scores} per candidate, in the method's order
    chosen: int  # the index of the kept candidate
    validation: datasets.Split  # the held-out rows that chose
    original_validation: dict[str, float | None]  # the network as it was, scored there (reference only)


def finetune_sd(
    method: FinetuneSD,
    dataset: datasets.Dataset,
    run: CandidateRun,
    *,
    original: Callable[[torch.Tensor], torch.Tensor],
    on_progress: Callable[[float], None] | None = None,
) -> Finetuned:
    """Each candidate run on `dataset` less its held-out rows (`datasets.hold_out`: the rows `train`'s `holdout`
    holds out), scored there right after its run; the best by the method's criterion (then accuracy) kept.
    `original`: the logits of the network as it was, scored there first, for reference."""
    held = datasets.hold_out(dataset, method.params["validation_fraction"])
    holdout = held.splits[datasets.HOLDOUT_SPLIT]
    original_validation = scored(original, holdout)
    lambdas, criterion = method.params["sd_lambdas"], method.params["criterion"]
    candidates, best = [], None  # best: (key, index, kept)
    for index, sd_lambda in enumerate(lambdas):

        def progress(fraction: float, index: int = index) -> None:
            if on_progress is not None:
                on_progress((index + fraction) / len(lambdas))

        logits, kept = run(held, sd_lambda, progress)
        scores = scored(logits, holdout)
        candidates.append({"sd_lambda": sd_lambda, "validation": scores})
        key = (scores[criterion] or 0.0, scores["accuracy"] or 0.0)
        if best is None or key > best[0]:  # ties go to the first
            best = (key, index, kept)
    if best is None:
        raise ValueError("no sd_lambda to try")
    _, chosen, kept = best
    return Finetuned(
        kept=kept, candidates=candidates, chosen=chosen, validation=holdout, original_validation=original_validation
    )


def train_candidates(
    method: FinetuneSD,
    dataset_spec: dict[str, Any],
    dataset: datasets.Dataset,
    model_info: dict[str, Any],
    weights: Mapping[str, torch.Tensor],
    seed: int,
    *,
    out_dir: pathlib.Path,
    device: str = "cpu",
    data_dir: str | None = None,
    registered: bool,
    should_stop: Callable[[], bool] | None = None,
) -> CandidateRun:
    """Candidate runs of one of our own networks: a `train` run from `weights` per candidate, keeping (network,
    checkpoint files). `registered`: `dataset` is a user's, passed to `train` as it is (a built-in is drawn again by
    its seed); `train`'s `holdout` holds out the very rows `finetune_sd` scores on, so the run ignores `held`."""
    runs = iter(range(len(method.params["sd_lambdas"])))

    def run(
        held: datasets.Dataset, sd_lambda: float, progress: Callable[[float], None]
    ) -> tuple[Callable, tuple[AuditableModel, CheckpointFile]]:
        trained = train(
            method.train_spec(dataset_spec, model_info, sd_lambda, seed),
            out_dir=out_dir / f"sd_lambda{next(runs)}",
            device=device,
            data_dir=data_dir,
            on_progress=progress,
            should_stop=should_stop,
            dataset=dataset if registered else None,
            init_weights=weights,
        )
        checkpoint = trained.checkpoints[0]
        model = load_checkpoint(checkpoint.safetensors_path, "safetensors").to(device)
        return model.logits, (model, checkpoint)

    return run


class Finetuning:
    """One candidate's run on a network in memory (a TorchScript program, in its jail), from the weights it holds:
    the updates of a `train` run of `FinetuneSD.train_spec` (`train_step` with the `sd` method's loss, Adam with
    the engine's defaults, minibatches drawn by `Batches` with the seed), `steps` at a time."""

    def __init__(
        self,
        module: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        sd_lambda: float,
        lr: float,
        batch_size: int | None,
        seed: int,
    ) -> None:
        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise SpecError("the model has no trainable parameters: there is nothing to fine-tune")
        torch.manual_seed(seed)
        self.module, self.x, self.y = module, x, y
        self.method = build_method({"name": "sd", "sd_lambda": sd_lambda})
        self.optimizer = torch.optim.Adam(trainable, lr=lr)
        self.batches = Batches(len(x), batch_size, seeds=[seed], device=x.device)
        self.step = 0

    def run(self, steps: int) -> float:
        """The next `steps` updates; the last one's loss. The module is left in eval mode."""
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            rows = self.batches.next()
            x, y = (self.x, self.y) if rows is None else (self.x[rows[0]], self.y[rows[0]])
            loss = train_step(self.module, self.optimizer, self.method, x, y, self.step)
            self.step += 1
        self.module.eval()
        return float(loss)


def scored(logits: Callable[[torch.Tensor], torch.Tensor], split: datasets.Split) -> dict[str, float | None]:
    """Accuracy and worst-group accuracy on `split` of the network whose logits function is `logits`."""
    with torch.no_grad():
        return split_scores(logits, split, torch.device("cpu"), with_groups=True)
