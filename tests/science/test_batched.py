"""Seeds trained as one stacked model: the same metrics and checkpoints as training them one after another."""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
import torch

from starvation import SpecError
from starvation.datasets import build, load_npz
from starvation.ensemble import StackedMLP, seed_losses
from starvation.checkpoints.save import load_builtin
from starvation.methods import build_method
from starvation.networks import build_network
from starvation.training import (Metric, TrainingStopped, build_optimizer, choose_execution, evaluate,
                                 evaluate_stacked, evaluation_splits, per_seed_matmuls, resolve_train_spec,
                                 stacked_splits, stacked_train_step, train, train_step)
from starvation.training.acceleration import PhaseOrder
from starvation.training.evaluation import pooled_slices
from starvation.training.resolved import ResolvedTrainSpec
from starvation.training.update import update_inputs
from starvation.training import execution, loop

# A small Colored MNIST run: 400 training digits, a narrow MLP, three seeds.
SMALL = {
    "dataset": {"name": "colored_mnist", "params": {"n_train": 400}},
    "model": {"arch": "mlp", "hidden": [32, 16]},
    "optimizer": {"name": "adam", "lr": 1e-3},
    "steps": 40,
    "eval_every": 15,
    "seeds": [0, 1, 2],
}
SD_WITH_WARMUP = {"name": "sd", "sd_lambda": 2.0, "warmup_steps": 20, "warmup_sd_lambda": 4e-5,
                  "post_warmup_loss_scale": 2e-5}  # the paper's CMNIST recipe, warm-up shortened


def run(spec: dict, tmp_path: pathlib.Path, execution: str, **kwargs) -> tuple[list[Metric], object]:
    metrics: list[Metric] = []
    outcome = train({**spec, "execution": execution}, out_dir=tmp_path / execution, on_metrics=metrics.extend,
                    **kwargs)
    assert outcome.result["execution"]["used"] == execution
    return metrics, outcome


def by_key(metrics: list[Metric]) -> dict[tuple, float]:
    return {(m.seed, m.step, m.split, m.name): m.value for m in metrics}


def assert_same_training(sequential: list[Metric], batched: list[Metric], *, loss: float = 1e-4,
                         accuracy: float = 1e-2, other: float = 1e-3) -> None:
    """Same seeds, steps, splits and names; values within float tolerance (accuracies: within a point)."""
    reference, candidate = by_key(sequential), by_key(batched)
    assert len(sequential) == len(batched) and set(reference) == set(candidate)
    tolerances = {"loss": loss, "accuracy": accuracy}
    for key, value in reference.items():
        assert candidate[key] == pytest.approx(value, abs=tolerances.get(key[3], other)), key


IRM_WITH_ANNEAL = {"name": "irm", "penalty_weight": 1e3, "penalty_anneal_steps": 20, "l2_weight": 1e-3}


@pytest.mark.parametrize("method", [{"name": "erm"}, SD_WITH_WARMUP, {"name": "weight_decay", "weight_decay": 1e-3},
                                    IRM_WITH_ANNEAL], ids=["erm", "sd_warmup", "weight_decay", "irm"])
def test_batched_seeds_train_as_they_do_one_after_another(tmp_path: pathlib.Path, method: dict) -> None:
    spec = {**SMALL, "method": method}
    sequential, seq_outcome = run(spec, tmp_path, "sequential")
    batched, outcome = run(spec, tmp_path, "batched")
    assert_same_training(sequential, batched)
    assert outcome.result["splits"]["test"]["loss"]["mean"] == pytest.approx(
        seq_outcome.result["splits"]["test"]["loss"]["mean"], abs=1e-4)
    assert {m.seed for m in batched if m.step == 0} == {0, 1, 2}


def test_after_hundreds_of_steps_of_the_papers_sd_recipe_losses_agree_within_1e_4(tmp_path: pathlib.Path) -> None:
    method = {**SD_WITH_WARMUP, "warmup_steps": 150}
    spec = {**SMALL, "method": method, "optimizer": {"name": "adam", "lr": 1e-4}, "steps": 300, "eval_every": 100,
            "seeds": [0, 1]}
    assert_same_training(run(spec, tmp_path, "sequential")[0], run(spec, tmp_path, "batched")[0])


def test_minibatches_are_each_seeds_own_as_in_sequential_training(tmp_path: pathlib.Path) -> None:
    spec = {**SMALL, "method": SD_WITH_WARMUP, "batch_size": 64, "steps": 30}  # several epochs of 6 batches
    sequential, _ = run(spec, tmp_path, "sequential")
    batched, _ = run(spec, tmp_path, "batched")
    assert_same_training(sequential, batched)


def test_irm_minibatches_carry_their_rows_environments_in_both_paths(tmp_path: pathlib.Path) -> None:
    spec = {**SMALL, "method": {**IRM_WITH_ANNEAL, "penalty_anneal_steps": 10}, "batch_size": 64, "steps": 20}
    assert_same_training(run(spec, tmp_path, "sequential")[0], run(spec, tmp_path, "batched")[0])


def test_each_metrics_batch_is_one_evaluation_of_every_seed_and_progress_rises_to_one(tmp_path: pathlib.Path) -> None:
    batches: list[list[Metric]] = []
    progress: list[float] = []
    train({**SMALL, "execution": "batched"}, out_dir=tmp_path, on_metrics=batches.append,
          on_progress=progress.append)
    assert [batch[0].step for batch in batches] == [0, 15, 30, 40]
    for batch in batches:
        assert len({m.step for m in batch}) == 1 and {m.seed for m in batch} == set(SMALL["seeds"])
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    assert len(progress) > 2 * 4  # between evaluations too: about as often as the sequential path reports


def test_checkpoints_per_seed_reload_to_the_batched_models_logits(tmp_path: pathlib.Path) -> None:
    metrics, outcome = run(SMALL, tmp_path, "batched")
    final = by_key(metrics)
    reloaded = []
    for checkpoint in outcome.checkpoints:
        model = load_builtin(checkpoint.safetensors_path, "mlp", {"hidden": [32, 16]}, (2, 14, 14), 1)
        test = build("colored_mnist", {"n_train": 400}, seed=checkpoint.seed, data_dir=None).splits["test"]
        with torch.no_grad():
            logits = model(test.x).squeeze(1)
        accuracy = float(((logits > 0).long() == test.y).float().mean())
        assert accuracy == final[(checkpoint.seed, 40, "test", "accuracy")]
        assert float(logits.abs().mean()) == pytest.approx(final[(checkpoint.seed, 40, "test", "mean_abs_logit")],
                                                           rel=1e-5)
        reloaded.append((model, test.x))
    stacked = StackedMLP([model for model, _ in reloaded])  # and the stack of the reloaded seeds is the same model
    with torch.no_grad():
        stacked_logits = stacked(torch.stack([x for _, x in reloaded]))
    for index, (model, x) in enumerate(reloaded):
        assert all(torch.equal(value, model.state_dict()[name]) for name, value in stacked.network_state(index).items())
        torch.testing.assert_close(stacked_logits[index], model(x).detach(), rtol=1e-5, atol=1e-6)


def test_the_batched_path_is_deterministic(tmp_path: pathlib.Path) -> None:
    spec = {**SMALL, "method": SD_WITH_WARMUP, "batch_size": 64, "execution": "batched"}
    first: list[Metric] = []
    second: list[Metric] = []
    torch.manual_seed(1)  # the global RNG's state must not matter
    train(spec, out_dir=tmp_path / "a", on_metrics=first.extend)
    torch.manual_seed(2)
    train(spec, out_dir=tmp_path / "b", on_metrics=second.extend)
    assert first == second


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_the_step_loop_never_reads_a_tensor_back_outside_evaluation(tmp_path: pathlib.Path, monkeypatch,
                                                                     execution: str) -> None:
    """On a GPU each read (.item(), float(t), .tolist(), if t) would make the host wait for the device."""
    # One read per evaluation, by design; and once per run, before the loop: the core-only corner's grey level and
    # which training examples conflict with the attribute's majority.
    allowed = {"evaluate", "evaluate_stacked", "four_corners", "bias_conflicting"}

    def guarded(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args):
            caller = sys._getframe(1).f_code
            if "starvation" in caller.co_filename and caller.co_name not in allowed:
                raise AssertionError(f"Tensor.{name} in {caller.co_name} ({caller.co_filename})")
            return original(self, *args)
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, guarded(name))
    for method in ({"name": "erm"}, SD_WITH_WARMUP, {"name": "weight_decay"}):
        train({**SMALL, "method": method, "batch_size": 64, "execution": execution, "steps": 25},
              out_dir=tmp_path / method["name"])


def test_an_architecture_that_cannot_be_stacked_falls_back_to_sequential(tmp_path: pathlib.Path) -> None:
    spec = {**SMALL, "model": {"arch": "cnn", "channels": [4]}, "steps": 3, "eval_every": 3, "seeds": [0, 1],
            "execution": "batched"}
    outcome = train(spec, out_dir=tmp_path)
    execution = outcome.result["execution"]
    assert execution["requested"] == "batched" and execution["used"] == "sequential"
    assert "Conv2d" in execution["why"]
    assert [c.seed for c in outcome.checkpoints] == [0, 1]


def test_per_class_sd_batches_over_seeds_and_matches_seed_by_seed(tmp_path: pathlib.Path) -> None:
    method = build_method({"name": "sd", "sd_lambda": 0.1, "sd_gamma": [0.4, 2.5], "per_class_mean": True})
    logits, y = torch.randn(3, 8), torch.randint(0, 2, (3, 8))
    y[1] = 1  # seed 1's batch lacks class 0: it adds nothing, as seed by seed
    torch.testing.assert_close(seed_losses(method, logits, y, 0, []),
                               torch.stack([method.loss(logits[s], y[s], 0, None) for s in range(3)]))
    spec = {**SMALL, "method": {"name": "sd", "sd_lambda": 0.1, "sd_gamma": [0.4, 2.5], "per_class_mean": True},
            "steps": 20}
    assert_same_training(run(spec, tmp_path, "sequential")[0], run(spec, tmp_path, "batched")[0])


def test_a_registered_multiclass_dataset_serves_every_seed_of_the_batch(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=200)
    x = np.eye(3, dtype=np.float32)[y] + 0.5 * rng.normal(size=(200, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y, attribute=np.zeros(200, np.int64),
             split=np.array(["train"] * 150 + ["test"] * 50))
    dataset = load_npz(tmp_path / "d.npz", "three")
    spec = {"dataset": {"name": "three"}, "model": {"arch": "mlp", "hidden": [16]}, "steps": 40, "eval_every": 20,
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "seeds": [0, 1], "batch_size": 32,
            "method": {"name": "sd", "sd_lambda": 0.01, "sd_gamma": [0.0, 0.5, 1.0]}}
    sequential, _ = run(spec, tmp_path, "sequential", dataset=dataset)
    batched, outcome = run(spec, tmp_path, "batched", dataset=dataset)
    assert_same_training(sequential, batched)
    assert outcome.result["splits"]["test"]["accuracy"]["mean"] > 0.8
    assert outcome.checkpoints[1].num_outputs == 3


def test_should_stop_is_asked_once_per_step_for_all_seeds(tmp_path: pathlib.Path) -> None:
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) >= 4

    with pytest.raises(TrainingStopped, match="seeds 0, 1, 2"):
        train({**SMALL, "execution": "batched"}, out_dir=tmp_path, should_stop=should_stop)
    assert len(calls) == 4


def test_precision_is_a_spec_option_and_bf16_trains_close_to_fp32(tmp_path: pathlib.Path) -> None:
    spec = {**SMALL, "seeds": [0, 1], "execution": "batched", "steps": 30}
    fp32, _ = run(spec, tmp_path / "fp32", "batched")
    tf32, _ = run({**spec, "precision": "tf32"}, tmp_path / "tf32", "batched")
    bf16, outcome = run({**spec, "precision": "bf16"}, tmp_path / "bf16", "batched")
    assert tf32 == fp32  # TF32 is a CUDA mode: on the CPU matmuls stay float32
    assert outcome.result["execution"]["precision"] == "bf16"
    assert_same_training(fp32, bf16, loss=2e-2, accuracy=3e-2, other=2e-2)  # bfloat16: ~3 significant digits
    assert not torch.backends.cuda.matmul.allow_tf32  # the global switches are restored


def test_the_result_reports_how_the_seeds_ran_and_the_step_time(tmp_path: pathlib.Path) -> None:
    outcome = train({**SMALL, "steps": 5, "eval_every": 5}, out_dir=tmp_path)
    execution = outcome.result["execution"]
    assert (execution["requested"], execution["used"], execution["precision"]) == ("auto", "batched", "fp32")
    timing = outcome.result["timing"]
    assert set(timing) == {"step_ms", "train_s", "eval_s", "compile_s", "total_s"}
    assert 0 < timing["step_ms"] and timing["train_s"] + timing["eval_s"] <= timing["total_s"]
    assert timing["compile_s"] == 0 and execution["compile"] is False


def test_auto_batches_several_seeds_of_an_mlp_and_large_cpu_updates_use_per_seed_matmuls() -> None:
    cmnist = ResolvedTrainSpec.of(resolve_train_spec({"preset": "paper_cmnist_sd", "seeds": [0, 1]}))
    with torch.device("meta"):
        mlp = build_network("mlp", {"hidden": [300, 300]}, (2, 14, 14), 1)
        cnn = build_network("cnn", {"channels": [8]}, (2, 14, 14), 1)
    assert choose_execution(cmnist, mlp) == ("batched", "auto: several seeds")
    assert choose_execution(cmnist.replace(seeds=[0]), mlp) == ("sequential", "auto: one seed")
    assert choose_execution(cmnist, cnn)[0] == "sequential"
    assert choose_execution(cmnist.replace(execution="batched"), mlp) == ("batched", "requested")
    assert choose_execution(cmnist.replace(execution="sequential"), mlp) == ("sequential", "requested")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert per_seed_matmuls(mlp, 4000, cpu)  # 830M multiply-adds per seed and step
    assert not per_seed_matmuls(mlp, 64, cpu)
    assert not per_seed_matmuls(mlp, 4000, cuda)


def test_per_seed_matmuls_train_as_one_after_another(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setattr(execution, "CPU_PER_SEED_MATMUL_MACS", 0)  # where per_seed_matmuls reads it
    spec = {**SMALL, "method": SD_WITH_WARMUP}
    sequential, _ = run(spec, tmp_path, "sequential")
    batched, outcome = run(spec, tmp_path, "batched")
    assert outcome.result["execution"]["per_seed_matmuls"] is True
    assert_same_training(sequential, batched)


@pytest.mark.parametrize("field, value", [("execution", "parallel"), ("precision", "fp16"), ("cuda_graphs", "yes")])
def test_execution_precision_and_cuda_graphs_are_checked(field: str, value: str) -> None:
    with pytest.raises(SpecError, match=field):
        resolve_train_spec({"preset": "paper_cmnist_erm", field: value})
    resolved = resolve_train_spec({"preset": "paper_cmnist_erm"})
    assert (resolved["execution"], resolved["precision"], resolved["cuda_graphs"]) == ("auto", "fp32", False)


def test_cuda_graphs_on_the_cpu_change_nothing_and_the_result_says_so(tmp_path: pathlib.Path) -> None:
    plain, _ = run(SMALL, tmp_path / "plain", "batched")
    asked, outcome = run({**SMALL, "cuda_graphs": True}, tmp_path / "graphs", "batched")
    assert outcome.result["execution"]["cuda_graphs"] is False
    assert by_key(asked) == by_key(plain)


@pytest.mark.parametrize("per_seed", [False, True], ids=["stacked_matmuls", "per_seed_matmuls"])
def test_a_stacked_network_gives_each_seeds_own_output(per_seed: bool) -> None:
    torch.manual_seed(0)
    networks = [build_network("mlp", {"hidden": [8, 8]}, (3, 2), 4) for _ in range(3)]
    stacked = StackedMLP(networks, per_seed_matmuls=per_seed)
    x = torch.randn(3, 5, 3, 2)
    with torch.no_grad():
        out = stacked(x)
        for index, network in enumerate(networks):
            torch.testing.assert_close(out[index], network(x[index]))


@pytest.mark.parametrize("per_seed", [False, True], ids=["stacked_matmuls", "per_seed_matmuls"])
def test_one_adam_over_the_stacked_seeds_is_one_adam_per_seed(per_seed: bool) -> None:
    """The seeds' losses are summed, so each seed's gradient, moments and step are its own."""
    method = build_method(SD_WITH_WARMUP)
    adam = {"name": "adam", "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8}
    torch.manual_seed(0)
    networks = [build_network("mlp", {"hidden": [8]}, (6,), 1) for _ in range(3)]
    x, y = torch.randn(3, 20, 6), torch.randint(0, 2, (3, 20))
    stacked = StackedMLP(networks, per_seed_matmuls=per_seed)
    stacked_adam = build_optimizer(adam, stacked.parameters())
    alone = [build_optimizer(adam, network.parameters()) for network in networks]
    for step in range(25):  # across the warm-up's end at step 20
        stacked_train_step(stacked, stacked_adam, method, x, y, step)
        for index, network in enumerate(networks):
            train_step(network, alone[index], method, x[index], y[index], step)
    for index, network in enumerate(networks):
        for name, value in stacked.network_state(index).items():
            torch.testing.assert_close(value, network.state_dict()[name], rtol=1e-5, atol=1e-6)
        seed_state = alone[index].state
        for stacked_param, param in zip(stacked.parameters(), network.parameters()):
            for moment in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(stacked_adam.state[stacked_param][moment][index], seed_state[param][moment],
                                           rtol=1e-5, atol=1e-9)
            assert float(stacked_adam.state[stacked_param]["step"]) == float(seed_state[param]["step"]) == 25


@pytest.mark.parametrize("method", [SD_WITH_WARMUP, {"name": "weight_decay", "weight_decay": 1e-2}],
                         ids=["sd", "weight_decay"])
def test_padded_hidden_units_stay_zero_and_change_no_real_unit(method: dict) -> None:
    """StackedMLP's pad_to (on a GPU: aligned rows for cuBLAS): widths 13 and 7 padded to 16 and 8 train as unpadded."""
    adam = {"name": "adam", "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8}
    torch.manual_seed(0)
    networks = [build_network("mlp", {"hidden": [13, 7]}, (6,), 1) for _ in range(3)]
    x, y = torch.randn(3, 20, 6), torch.randint(0, 2, (3, 20))
    plain, padded = StackedMLP(networks), StackedMLP(networks, pad_to=8)
    assert [tuple(p.shape[1:]) for p in padded.stacked] == [(16, 6), (16,), (8, 16), (8,), (1, 8), (1,)]
    method = build_method(method)
    optimizers = [build_optimizer(adam, model.parameters()) for model in (plain, padded)]
    for step in range(25):  # across SD's warm-up end at step 20
        for model, optimizer in zip((plain, padded), optimizers):
            stacked_train_step(model, optimizer, method, x, y, step)
    for index in range(3):
        for name, value in padded.network_state(index).items():
            torch.testing.assert_close(value, plain.network_state(index)[name], rtol=1e-5, atol=1e-6)
    first, second, head = padded.stacked[0], padded.stacked[2], padded.stacked[4]
    assert not first[:, 13:].any() and not padded.stacked[1][:, 13:].any()  # padded units: no weights in, no bias
    assert not second[:, :, 13:].any() and not second[:, 7:].any() and not head[:, :, 7:].any()  # none out


def test_evaluation_slices_the_training_environments_from_the_pooled_logits(tmp_path: pathlib.Path) -> None:
    """train1/train2's metrics, sliced from the pooled 'train' logits, are those of their own forward pass."""
    data = build("colored_mnist", {"n_train": 400}, seed=0, data_dir=None)
    torch.manual_seed(0)
    network = build_network("mlp", {"hidden": [16]}, data.input_shape, 1)
    splits = evaluation_splits(data)
    sliced, recomputed = evaluate(network, splits, pooled_slices(data)), evaluate(network, splits)
    assert set(sliced) == set(recomputed) and ("train1", "accuracy") in sliced
    for key, value in recomputed.items():
        assert sliced[key] == pytest.approx(value, abs=1e-6), key
    stacked = StackedMLP([network, network])
    stacked_data = stacked_splits([data, data], torch.device("cpu"))
    for seed_values in evaluate_stacked(stacked, stacked_data, pooled_slices(data)):
        for key, value in recomputed.items():
            assert seed_values[key] == pytest.approx(value, abs=1e-5), key


def test_bf16_updates_read_inputs_stored_once_in_bf16_and_train_close_to_float32(tmp_path: pathlib.Path) -> None:
    """The stored copy is what autocast would cast to at every update; bf16 stays within 2e-2 of fp32 on loss."""
    x = torch.rand(3, 5)
    assert update_inputs(x, "bf16").dtype == torch.bfloat16 and update_inputs(x, "fp32") is x
    shared = update_inputs(x.unsqueeze(0).expand(4, 3, 5), "bf16")  # a registered dataset's: one copy, not four
    assert shared.shape == (4, 3, 5) and shared.stride(0) == 0 and torch.equal(shared[3], update_inputs(x, "bf16"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(torch.nn.functional.linear(x, torch.eye(5)), torch.nn.functional.linear(
            update_inputs(x, "bf16"), torch.eye(5)))
    spec = {**SMALL, "method": SD_WITH_WARMUP}
    reference, _ = run({**spec, "precision": "fp32"}, tmp_path / "fp32", "batched")
    reduced, _ = run({**spec, "precision": "bf16"}, tmp_path / "bf16", "batched")
    assert_same_training(reference, reduced, loss=2e-2, accuracy=5e-2, other=5e-2)


def test_a_compiled_stacked_update_trains_as_the_eager_one(tmp_path: pathlib.Path) -> None:
    """torch.compile per phase (SD's warm-up ends at step 20 of 40), compiled before the clock: same metrics."""
    spec = {**SMALL, "method": SD_WITH_WARMUP, "seeds": [0, 1], "batch_size": 64}
    eager, _ = run(spec, tmp_path / "eager", "batched")
    compiled, outcome = run({**spec, "compile": True}, tmp_path / "compiled", "batched")
    assert outcome.result["execution"]["compile"] is True and outcome.result["timing"]["compile_s"] > 0
    assert_same_training(eager, compiled, loss=1e-5)


def test_a_phase_that_comes_back_is_refused_where_updates_are_made_once_per_phase() -> None:
    class Cycling(build_method({"name": "erm"}).__class__):
        def phase(self, step: int) -> int:
            return (step // 10) % 2

    order = PhaseOrder(Cycling())
    assert [order.at(step) for step in (0, 9, 10, 19)] == [0, 0, 1, 1]
    with pytest.raises(AssertionError, match="went back to phase 0 at step 20"):
        order.at(20)
