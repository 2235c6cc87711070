"""The CUDA path of training: runs where a GPU is (bench/gpu_check.sh on a lent machine), skipped elsewhere.

The CPU tests check the same loops; these check what only a GPU shows: that the step loop never makes the host
wait for the device (CUDA's own sync detector, not a patch of Python methods), that batched and sequential agree
there too, and that TF32 and bf16 stay close to float32.
"""
from __future__ import annotations

import contextlib
import functools
import pathlib

import pytest
import torch

from starvation import training
from starvation.datasets import build
from starvation.checkpoints.save import load_builtin
from starvation.methods import cross_entropy
from starvation.training import loop
from tests.science.test_batched import IRM_WITH_ANNEAL, SD_WITH_WARMUP, SMALL, assert_same_training, by_key, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

PER_CLASS_SD = {"name": "sd", "sd_lambda": 0.1, "sd_gamma": [0.4, 2.5], "per_class_mean": True}


@contextlib.contextmanager
def sync_is_an_error():
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def guarded(function):
    @functools.wraps(function)
    def call(*args, **kwargs):
        with sync_is_an_error():
            return function(*args, **kwargs)
    return call


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_the_step_loop_never_waits_for_the_device(tmp_path: pathlib.Path, monkeypatch, execution: str) -> None:
    """Every update and minibatch draw runs under CUDA's sync debug mode "error" (evaluation may sync, once)."""
    monkeypatch.setattr(loop, "train_step", guarded(loop.train_step))  # where the loops call them
    monkeypatch.setattr(loop, "stacked_train_step", guarded(loop.stacked_train_step))
    monkeypatch.setattr(training.Batches, "next", guarded(training.Batches.next))
    for index, method in enumerate(({"name": "erm"}, SD_WITH_WARMUP, PER_CLASS_SD)):
        for batch_size in (None, 64):
            outcome = training.train({**SMALL, "method": method, "batch_size": batch_size, "execution": execution,
                                      "steps": 25}, out_dir=tmp_path / f"{index}-{batch_size}", device="cuda")
            assert outcome.result["execution"]["used"] == execution


@pytest.mark.parametrize("method", [{"name": "erm"}, SD_WITH_WARMUP, PER_CLASS_SD], ids=["erm", "sd", "per_class"])
def test_batched_and_sequential_agree_on_cuda_and_with_the_cpu(tmp_path: pathlib.Path, method: dict) -> None:
    spec = {**SMALL, "method": method, "precision": "fp32"}
    on_cpu, _ = run(spec, tmp_path / "cpu", "sequential")
    sequential, _ = run(spec, tmp_path / "cuda", "sequential", device="cuda")
    batched, outcome = run(spec, tmp_path / "cuda", "batched", device="cuda")
    assert outcome.result["execution"]["per_seed_matmuls"] is False  # one batched matmul per layer on a GPU
    assert_same_training(sequential, batched)
    assert_same_training(on_cpu, sequential)
    c = outcome.checkpoints[0]  # saved from the GPU, loaded on the CPU: the final test loss again
    model = load_builtin(c.safetensors_path, c.arch, c.arch_params, c.input_shape, c.num_outputs)
    test = build("colored_mnist", {"n_train": 400}, seed=c.seed, data_dir=None).splits["test"]
    with torch.no_grad():
        loss = float(cross_entropy(model(test.x).squeeze(1), test.y))
    assert loss == pytest.approx(by_key(batched)[(c.seed, SMALL["steps"], "test", "loss")], abs=1e-5)


@pytest.mark.parametrize("execution", ["batched", "sequential"])
@pytest.mark.parametrize("batch_size", [None, 64], ids=["full_batch", "minibatch"])
def test_updates_replayed_from_cuda_graphs_train_as_eager_ones(tmp_path: pathlib.Path, execution: str,
                                                               batch_size: int | None) -> None:
    """Across SD's warm-up switch (one graph per phase) and with minibatch rows copied into the captured ones."""
    spec = {**SMALL, "method": SD_WITH_WARMUP, "batch_size": batch_size}
    eager, _ = run(spec, tmp_path / "eager", execution, device="cuda")
    graphed, outcome = run({**spec, "cuda_graphs": True}, tmp_path / "graphs", execution, device="cuda")
    assert outcome.result["execution"]["cuda_graphs"] is True
    assert_same_training(eager, graphed, loss=1e-5)


@pytest.mark.parametrize("method", [IRM_WITH_ANNEAL, {"name": "group_dro", "step_size": 0.1}],
                         ids=["irm", "group_dro"])
def test_methods_given_memberships_replay_from_cuda_graphs_as_eagerly(tmp_path: pathlib.Path, method: dict) -> None:
    """IRM's environments and Group DRO's groups (its weights updated in place) through captured minibatch rows."""
    spec = {**SMALL, "method": method, "batch_size": 64, "seeds": [0]}
    eager, _ = run(spec, tmp_path / "eager", "sequential", device="cuda")
    graphed, _ = run({**spec, "cuda_graphs": True}, tmp_path / "graphs", "sequential", device="cuda")
    assert_same_training(eager, graphed, loss=1e-5)


def test_cuda_graphs_make_no_sync_in_the_step_loop_either(tmp_path: pathlib.Path, monkeypatch) -> None:
    """A replayed step never syncs (a capture may: it happens once per phase)."""
    original = training.GraphedUpdates._step

    def replay_guarded(self, rows, step):
        replaying = self.method.phase(step) in self.graphs
        with sync_is_an_error() if replaying else contextlib.nullcontext():
            return original(self, rows, step)

    monkeypatch.setattr(training.GraphedUpdates, "_step", replay_guarded)
    monkeypatch.setattr(training.Batches, "next", guarded(training.Batches.next))
    spec = {**SMALL, "method": SD_WITH_WARMUP, "batch_size": 64, "cuda_graphs": True, "execution": "batched"}
    steps = training.GraphedUpdates.WARMUP + 30  # a capture, replays, the warm-up's end at 20 and a second capture
    training.train({**spec, "steps": steps}, out_dir=tmp_path, device="cuda")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_trains_close_to_float32(tmp_path: pathlib.Path, precision: str) -> None:
    spec = {**SMALL, "method": SD_WITH_WARMUP}
    reference, _ = run({**spec, "precision": "fp32"}, tmp_path / "fp32", "batched", device="cuda")
    reduced, outcome = run({**spec, "precision": precision}, tmp_path / precision, "batched", device="cuda")
    assert outcome.result["execution"]["precision"] == precision
    assert_same_training(reference, reduced, loss=2e-2, accuracy=5e-2, other=5e-2)
