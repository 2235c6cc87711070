"""Sweeps (starvation/training/sweep.py): each setting's models are its train job's models; the choice under
train_domain_validation cannot see the test split; bad grids are refused naming the field."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from starvation import datasets
from starvation.errors import SpecError
from starvation.training import train
from starvation.training.resolved import ResolvedTrainSpec
from starvation.training.sweep import member_params, resolve_sweep_spec, stacks, sweep

# SD without the CMNIST recipe's loss scale, on 800 digits: settings that differ visibly within a few seconds.
BASE = {"dataset": {"name": "colored_mnist", "params": {"n_train": 800}}, "method": {"name": "sd"},
        "steps": 60, "eval_every": 30, "seeds": [0, 1], "audit": False}
GRID = {"method.sd_lambda": [0.0, 3.0], "method.sd_gamma": [0.0, [2.0, -1.0]]}


def test_each_setting_is_its_own_train_job(tmp_path):
    """oracle: nothing is held out, so a plain train job of the setting is its twin (acceptance: within 0.01)."""
    outcome = sweep({**BASE, "grid": GRID, "selection": "oracle"}, out_dir=tmp_path / "sweep")
    assert [run["used"] for run in outcome.result["execution"]] == ["batched", "batched"]  # 4 settings a stack
    tests = [s["test"]["accuracy"]["mean"] for s in outcome.result["settings"]]
    assert len({round(t, 4) for t in tests}) > 1, "the settings should train different models"
    for index, setting in enumerate(outcome.result["settings"]):
        spec = {**BASE, "method": {"name": "sd", "sd_lambda": setting["params"]["method.sd_lambda"],
                                   "sd_gamma": setting["params"]["method.sd_gamma"]}}
        twin = train(spec, out_dir=tmp_path / f"twin{index}")
        assert setting["test"]["accuracy"]["mean"] == pytest.approx(twin.result["splits"]["test"]["accuracy"]["mean"],
                                                                   abs=0.01)
        for seed, checkpoint in zip(BASE["seeds"], outcome.checkpoints[index]):
            assert checkpoint.seed == seed and checkpoint.safetensors_path.exists()
    assert outcome.result["leaks_test"] is True and outcome.result["scored_on"] == "test"
    assert outcome.result["chosen"] == max(range(4), key=lambda i: outcome.result["settings"][i]["test"]
                                           ["worst_group_accuracy"]["mean"])


def test_hold_out_twin_names_the_same_rows(tmp_path):
    """train_domain_validation holds out part of the training data; a train spec with the same holdout trains on
    the same rows, so its numbers equal the setting's."""
    outcome = sweep({**BASE, "seeds": [3], "grid": {"method.sd_lambda": [0.0, 3.0]}}, out_dir=tmp_path / "sweep")
    assert outcome.result["holdout"] == 0.2
    setting = outcome.result["settings"][1]
    twin = train({**BASE, "seeds": [3], "holdout": 0.2, "method": {"name": "sd", "sd_lambda": 3.0}},
                 out_dir=tmp_path / "twin")
    assert setting["test"]["accuracy"]["mean"] == pytest.approx(twin.result["splits"]["test"]["accuracy"]["mean"],
                                                               abs=1e-6)
    assert twin.result["dataset"]["holdout"]["examples"] == round(400 * 0.2) * 2  # 20% of each environment


def test_the_test_split_cannot_change_the_choice(tmp_path):
    """The same training data with the test labels turned over: the same choice and validation numbers."""
    data = datasets.build("colored_mnist", {"n_train": 800}, seed=0, data_dir=None)
    test = data.splits["test"]
    turned = dataclasses.replace(data, splits={**data.splits, "test": dataclasses.replace(test, y=1 - test.y)})
    spec = {**BASE, "seeds": [0], "dataset": {"name": "mine"}, "grid": GRID}
    outcomes = [sweep(spec, out_dir=tmp_path / str(i), dataset=d, user_datasets=["mine"])
                for i, d in enumerate((data, turned))]
    first, second = (o.result for o in outcomes)
    assert first["chosen"] == second["chosen"] and first["scored_on"] == "validation"
    assert [s["validation"] for s in first["settings"]] == [s["validation"] for s in second["settings"]]
    assert [s["test"] for s in first["settings"]] != [s["test"] for s in second["settings"]]


def test_settings_stack_unless_they_change_the_optimizer_or_a_branch():
    spec = resolve_sweep_spec({**BASE, "grid": {"method.sd_lambda": [0.1, 1.0], "optimizer.lr": [1e-3, 1e-2],
                                                "method.warmup_steps": [0, 10]}})
    groups = stacks(spec["settings"])
    assert sorted(len(g) for g in groups) == [2, 2, 2, 2]  # lambda rides in a stack; lr and warm-up do not
    for group in groups:
        assert len({spec["settings"][i]["params"]["method.sd_lambda"] for i in group}) == 2
    values = member_params([ResolvedTrainSpec.of(spec["settings"][i]["spec"]) for i in groups[0]], num_classes=2)
    assert set(values) == {"sd_lambda"} and values["sd_lambda"].tolist() == pytest.approx([0.1, 1.0])
    gammas = member_params([ResolvedTrainSpec.of(resolve_sweep_spec({**BASE, "grid": {"method.sd_gamma": [0.5, [1.0, 2.0]]}})
                            ["settings"][i]["spec"]) for i in (0, 1)], num_classes=2)
    assert gammas["sd_gamma"].tolist() == [[0.5, 0.5], [1.0, 2.0]]


def test_member_params_train_as_the_method_with_those_values():
    """One stacked loss with per-member lambdas equals each member's own loss."""
    from starvation.methods import build_method

    logits, y = torch.randn(3, 16), torch.randint(0, 2, (3, 16))
    method = build_method({"name": "sd", "sd_lambda": 1.0})
    lambdas = torch.tensor([0.0, 1.0, 5.0])
    from starvation.ensemble import seed_losses

    stacked = seed_losses(method, logits, y, 5, [torch.zeros(3, 1)], member_params={"sd_lambda": lambdas})
    for member, value in enumerate(lambdas.tolist()):
        alone = build_method({"name": "sd", "sd_lambda": value}).loss(logits[member], y[member], 5, None)
        assert stacked[member].item() == pytest.approx(alone.item(), rel=1e-6)


@pytest.mark.parametrize("grid, field", [
    ({}, "grid"),
    ({"method.sd_lambda": []}, "grid.method.sd_lambda"),
    ({"method.no_such": [1]}, "grid.method.no_such"),
    ({"optimizer.momentum": [0.9]}, "grid.optimizer.momentum"),
    ({"method.sd_lambda": [-1.0]}, "grid"),
    ({"method.sd_lambda": list(range(16)), "method.sd_gamma": list(range(5))}, "grid"),
    ("lambda", "grid"),
])
def test_bad_grids_name_the_field(grid, field):
    with pytest.raises(SpecError) as caught:
        resolve_sweep_spec({**BASE, "grid": grid})
    assert caught.value.field == field


def test_validation_needs_a_hold_out():
    with pytest.raises(SpecError, match="holdout must be above 0"):
        resolve_sweep_spec({**BASE, "grid": GRID, "holdout": 0})
    with pytest.raises(SpecError, match="selection"):
        resolve_sweep_spec({**BASE, "grid": GRID, "selection": "peek"})


def test_a_grid_over_the_networks_shape_trains_each_shape_in_turn_as_its_train_job_would(tmp_path):
    spec = {**BASE, "method": {"name": "sd", "sd_lambda": 1.0}, "seeds": [0], "selection": "oracle",
            "grid": {"model.hidden": [[8], [32, 32]], "method.sd_lambda": [0.5, 2.0]}}
    resolved = resolve_sweep_spec(spec)
    assert sorted(len(group) for group in stacks(resolved["settings"])) == [2, 2]  # one stack per shape
    outcome = sweep(spec, out_dir=tmp_path / "sweep")
    settings = outcome.result["settings"]
    assert [s["params"]["model.hidden"] for s in settings] == [[8], [8], [32, 32], [32, 32]]
    assert outcome.checkpoints[2][0].arch_params["hidden"] == [32, 32]
    twin = train({**BASE, "seeds": [0], "model": {"arch": "mlp", "hidden": [32, 32]},
                  "method": {"name": "sd", "sd_lambda": 2.0}}, out_dir=tmp_path / "twin")
    assert settings[3]["test"]["accuracy"]["mean"] == pytest.approx(
        twin.result["splits"]["test"]["accuracy"]["mean"], abs=0.01)
    assert 0 <= outcome.result["chosen"] < 4


@pytest.mark.parametrize("grid", [{"method.sd_lambda": [0.0, 3.0]}, {"optimizer.lr": [1e-3, 1e-2]}],
                         ids=["stacked", "in-turn"])
def test_every_setting_starts_from_the_initial_weights(tmp_path, grid):
    """A sweep fine-tunes from `init_weights` as a train job does, stacked or not (a pretrained backbone's study)."""
    from safetensors.torch import load_file

    from starvation.networks import build_network

    base = {**BASE, "seeds": [0], "steps": 3, "eval_every": 3, "model": {"arch": "mlp", "hidden": [64]},
            "dataset": {"name": "colored_mnist", "params": {"n_train": 200}}}
    torch.manual_seed(123)
    given = build_network("mlp", {"hidden": [64]}, (2, 14, 14), 1).state_dict()
    given = {name: value * 3 for name, value in given.items()}  # far from any seed's own initialisation
    found = sweep({**base, "grid": grid, "selection": "oracle"}, out_dir=tmp_path / "s", init_weights=given)
    fresh = sweep({**base, "grid": grid, "selection": "oracle"}, out_dir=tmp_path / "f")
    assert found.result["init"]["head"] == "loaded" and "init" not in fresh.result
    for index, setting in enumerate(found.result["settings"]):
        key, value = next(iter(setting["params"].items()))
        part, field = key.split(".")
        spec = {**base, part: {**base.get(part, {"name": "adam"} if part == "optimizer" else {}), field: value}}
        twin = train(spec, out_dir=tmp_path / f"t{index}", init_weights=given).checkpoints[0]
        weights = load_file(str(found.checkpoints[index][0].safetensors_path))
        expected = load_file(str(twin.safetensors_path))
        other = load_file(str(fresh.checkpoints[index][0].safetensors_path))
        for name, tensor in expected.items():
            assert torch.allclose(weights[name], tensor, atol=1e-5), name
        assert max(float((other[name] - expected[name]).abs().max()) for name in expected) > 0.1
