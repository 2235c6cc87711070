"""Repair's science: the validation part, the head refits, their choice, and head surgery."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from starvation.errors import SpecError
from starvation.repair import (LinearHead, NoLinearHead, TrainingFeatures, build_repair_method,
                               carve_validation, check_head_feeds_output, read_head, replace_head, score,
                               torchscript_bytes)


def shortcut_features(n: int = 2_000, *, agree: float = 0.9, seed: int = 0, num_classes: int = 2) -> TrainingFeatures:
    """Features [core, attribute, noise...]: the core is the label with noise (right 80% of the
    time), the attribute agrees with the label `agree` of the time: a perfect shortcut for most rows."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    flip = torch.rand(n, generator=g) >= agree
    attribute = torch.where(flip, (y + 1) % num_classes, y)
    core = y.double() + 0.6 * torch.randn(n, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
    features = torch.cat([core[:, None], attribute.double()[:, None] * 3.0, noise], dim=1).float()
    return TrainingFeatures(features, y, attribute, ["train"])


def attribute_head(num_outputs: int = 1) -> LinearHead:
    """A head that reads only the attribute feature (what ERM on shortcut data ends up with)."""
    weight = torch.zeros(num_outputs, 5)
    if num_outputs == 1:
        weight[0, 1], bias = 4.0, torch.tensor([-6.0])
    else:
        weight[:, 1] = torch.arange(num_outputs).float() * 4.0
        bias = -torch.arange(num_outputs).float() ** 2 * 6.0
    return LinearHead(weight, bias)


def test_the_validation_part_is_seeded_disjoint_and_covers_every_group():
    data = shortcut_features()
    fit, validation = carve_validation(data.y, data.attribute, 0.25, seed=3)
    again = carve_validation(data.y, data.attribute, 0.25, seed=3)
    other = carve_validation(data.y, data.attribute, 0.25, seed=4)
    assert np.array_equal(fit, again[0]) and np.array_equal(validation, again[1])
    assert not np.array_equal(validation, other[1])
    assert set(fit).isdisjoint(validation) and len(fit) + len(validation) == len(data.y)
    for label in (0, 1):
        for value in (0, 1):
            members = ((data.y == label) & (data.attribute == value)).numpy()
            share = members[validation].sum() / members.sum()
            assert 0.2 < share < 0.3  # stratified: every group holds out about the fraction


def test_last_layer_trades_the_shortcut_for_the_core_feature():
    data = shortcut_features()
    old = attribute_head()
    repaired = build_repair_method(None).repair(data, old, seed=0)
    assert repaired.method["name"] == "last_layer" and repaired.changed
    assert repaired.head.weight.shape == old.weight.shape and repaired.head.bias.shape == old.bias.shape
    # the refit leans on the core feature (column 0) more than on the attribute (column 1), per unit of spread
    spread = data.features.std(0)
    assert abs(repaired.head.weight[0, 0] * spread[0]) > abs(repaired.head.weight[0, 1] * spread[1])
    held_out = shortcut_features(seed=1, agree=0.1)  # the shortcut reversed, as a test split would be
    assert score(repaired.head, held_out)["accuracy"] > 0.7 > score(old, held_out)["accuracy"]
    selection = repaired.selection
    assert selection["test_split_used"] is False and selection["chosen_on"]["criterion"] == "worst_group_accuracy"
    assert selection["fitted_on"]["n"] + selection["chosen_on"]["n"] == len(data.y)
    assert len(selection["candidates"]) == len(repaired.method["inverse_strengths"])
    assert selection["chosen"] in [{"inverse_strength": c["inverse_strength"]} for c in selection["candidates"]]


def test_the_original_head_is_scored_for_reference_but_never_chosen():
    """The network was trained on the validation examples: its own head's score there is biased
    (a memorising model's is near 1), so it is reported, not compared with the refits."""
    data = shortcut_features()
    flawless = LinearHead(torch.zeros(1, 5), torch.zeros(1))
    flawless.weight[0, 0] = 1000.0  # stands for a head that memorised: reads the label through the noise
    data.features[:, 0] = data.y.float() - 0.5 + 0.01 * data.features[:, 2]
    repaired = build_repair_method(None).repair(data, flawless, seed=0)
    assert repaired.selection["original_head"]["validation"]["worst_group_accuracy"] == 1.0
    assert repaired.head is not flawless and "original" not in str(repaired.selection["chosen"])
    assert "not a candidate" in repaired.selection["original_head"]["note"]


@pytest.mark.parametrize("num_outputs", [2, 3])
def test_a_head_of_k_logits_is_refitted_in_its_own_shape(num_outputs):
    data = shortcut_features(num_classes=max(num_outputs, 2))
    old = attribute_head(num_outputs)
    for name in ("last_layer", "last_layer_sd"):
        repaired = build_repair_method({"name": name}).repair(data, old, seed=0)
        assert repaired.head.weight.shape == (num_outputs, 5) and repaired.head.bias.shape == (num_outputs,)
        assert score(repaired.head, data)["accuracy"] > score(old, data)["accuracy"] - 0.2


def test_last_layer_sd_fits_without_group_labels_and_chooses_on_validation():
    data = shortcut_features()
    repaired = build_repair_method({"name": "last_layer_sd", "sd_lambdas": [0.1, 1.0]}).repair(
        data, LinearHead(torch.zeros(1, 5), torch.zeros(1)), seed=0)
    assert repaired.method["criterion"] == "worst_group_accuracy"
    assert repaired.selection["chosen"] in ({"sd_lambda": 0.1}, {"sd_lambda": 1.0})
    assert repaired.changed and torch.isfinite(repaired.head.weight).all()


def test_methods_refuse_what_they_cannot_do():
    with pytest.raises(SpecError, match="at most 0.5"):
        build_repair_method({"name": "finetune_sd", "validation_fraction": 0.6})
    assert build_repair_method({"name": "finetune_sd"}).WHOLE_NETWORK
    with pytest.raises(SpecError, match="unknown repair method"):
        build_repair_method({"name": "magic"})
    with pytest.raises(SpecError, match="validation_fraction"):
        build_repair_method({"name": "last_layer", "validation_fraction": 1.0})
    with pytest.raises(SpecError):
        build_repair_method({"name": "last_layer", "inverse_strengths": []})
    with pytest.raises(SpecError, match="single label"):
        one_label = TrainingFeatures(torch.randn(20, 5), torch.zeros(20, dtype=torch.long), torch.zeros(20).long())
        build_repair_method(None).repair(one_label, attribute_head(), seed=0)


class FeaturesAndHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU())
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class HeadThenScale(FeaturesAndHead):
    """Something runs after the head: replacing the head would not give the fitted logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.head(self.features(x))


def test_a_scripted_model_gets_its_head_replaced_and_nothing_else():
    torch.manual_seed(0)
    module = torch.jit.script(FeaturesAndHead().eval())
    x = torch.rand(8, 6)
    before_features = module.features(x)
    new = LinearHead(torch.randn(1, 4), torch.randn(1))
    replace_head(module, new)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        reloaded = torch.jit.load(io.BytesIO(torchscript_bytes(module)))
    assert torch.allclose(reloaded(x), new.logits(before_features), atol=1e-6)
    assert torch.equal(reloaded.features(x), before_features)
    assert torch.equal(read_head(reloaded).weight, new.weight)
    with pytest.raises(SpecError, match="new head"):
        replace_head(module, LinearHead(torch.randn(2, 4), torch.randn(2)))


def test_a_head_that_is_not_the_last_step_is_refused():
    module = HeadThenScale().eval()
    x = torch.rand(8, 6)
    with torch.no_grad():
        with pytest.raises(NoLinearHead, match="something runs between them"):
            check_head_feeds_output(read_head(module), module.features(x), module(x))
        plain = FeaturesAndHead().eval()
        assert check_head_feeds_output(read_head(plain), plain.features(x), plain(x)) < 1e-5
    with pytest.raises(NoLinearHead):
        read_head(nn.Module())


def onnx_of(module: nn.Module, tmp_path) -> bytes:
    from tests.science.audit_fixtures import save_onnx

    return save_onnx(module, tmp_path / "m.onnx", torch.zeros(1, 6)).read_bytes()


def test_an_onnx_graphs_head_is_its_last_gemm_and_only_its_constants_are_replaced(tmp_path):
    import onnx

    from starvation.checkpoints import load_checkpoint
    from starvation.repair import read_model_head, replace_model_head

    torch.manual_seed(0)
    module = FeaturesAndHead().eval()
    model = load_checkpoint(onnx_of(module, tmp_path), "onnx")  # no feature layer named: the Gemm's input
    x = torch.rand(8, 6)
    with torch.no_grad():
        assert torch.allclose(model.features(x), module.features(x), atol=1e-6)
    assert torch.allclose(read_model_head(model).weight, module.head.weight.detach())
    new = LinearHead(torch.randn(1, 4), torch.randn(1))
    nodes_before = [(n.op_type, list(n.input)) for n in model.proto.graph.node]
    repaired = load_checkpoint(replace_model_head(model, new), "onnx")
    assert torch.allclose(repaired.logits(x), new.logits(model.features(x)), atol=1e-5)
    assert [(n.op_type, list(n.input)) for n in repaired.proto.graph.node] == nodes_before
    with pytest.raises(SpecError, match="new head"):
        replace_model_head(model, LinearHead(torch.randn(2, 4), torch.randn(2)))

    # A Gemm that scales and keeps its weight untransposed is read and written in its own convention.
    gemm = next(n for n in model.proto.graph.node if n.op_type == "Gemm")
    weight = next(t for t in model.proto.graph.initializer if t.name == gemm.input[1])
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight).T.copy() / 2, weight.name))
    gemm.ClearField("attribute")
    gemm.attribute.extend([onnx.helper.make_attribute("alpha", 2.0), onnx.helper.make_attribute("transB", 0)])
    model = load_checkpoint(model.proto.SerializeToString(), "onnx")
    assert torch.allclose(read_model_head(model).weight, new.weight, atol=1e-6)
    rescaled = load_checkpoint(replace_model_head(model, LinearHead(2 * new.weight, new.bias)), "onnx")
    assert torch.allclose(rescaled.logits(x), 2 * new.logits(model.features(x)) - new.bias, atol=1e-5)

    scaled = load_checkpoint(onnx_of(HeadThenScale().eval(), tmp_path), "onnx")  # a Mul makes the output
    assert scaled.feature_layer is None and "made by a Mul node" in scaled.no_features_reason
    with pytest.raises(NoLinearHead, match="made by a Mul node"):
        read_model_head(scaled)


def test_a_scripted_network_fine_tuned_in_memory_matches_the_engines_fine_tuning(tmp_path):
    """`Finetuning` (what trains a TorchScript upload in its jail) makes exactly the updates of `train` on
    `FinetuneSD.train_spec` from the same weights: full batch and minibatches."""
    from safetensors.torch import load_file

    from starvation import datasets
    from starvation.checkpoints import load_checkpoint
    from starvation.repair.finetune import Finetuning
    from starvation.training import train

    spec = {"dataset": {"name": "colored_mnist", "params": {"n_train": 600}}, "model": {"arch": "mlp", "hidden": [32]},
            "steps": 5, "eval_every": 5, "seeds": [0], "audit": False}
    start = train(spec, out_dir=tmp_path / "start", device="cpu").checkpoints[0]
    data = datasets.build("colored_mnist", {"n_train": 600}, seed=0, data_dir=None)
    rows = datasets.hold_out(data, 0.2).train_data()
    for batch_size in (None, 64):
        method = build_repair_method({"name": "finetune_sd", "steps": 12, "batch_size": batch_size, "lr": 1e-3})
        run = method.train_spec(spec["dataset"], {"arch": "mlp", "arch_params": {"hidden": [32]}}, 2.0, 0)
        engine = train(run, out_dir=tmp_path / f"engine{batch_size}", device="cpu",
                       init_weights=load_file(start.safetensors_path)).checkpoints[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(start.torchscript_path))
        Finetuning(scripted, rows.x, rows.y, sd_lambda=2.0, lr=1e-3, batch_size=batch_size, seed=0).run(12)
        tuned = load_checkpoint(engine.safetensors_path, "safetensors").module
        x = data.splits["test"].x[:200]
        with torch.no_grad():
            assert torch.equal(scripted(x), tuned(x))
            assert not torch.equal(scripted(x), load_checkpoint(start.safetensors_path, "safetensors").module(x))
