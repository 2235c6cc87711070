"""The audit: hand-built models whose reliance on colour is known, uploaded as TorchScript and ONNX."""
from __future__ import annotations

import json
import math

import pytest
import torch

from starvation.audit import PROBES, render_report_html, run_audit, supported_probes
from starvation.checkpoints import load_checkpoint, wrap_module
from starvation.datasets import build
from starvation.errors import SpecError
from tests.science.audit_fixtures import (
    AttributeReader,
    ColourBlind,
    ColourReader,
    LabelReader,
    save_onnx,
    save_torchscript,
    toy_dataset,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_KEYS = {"spurious_attribute", "summary", "groups", "average_accuracy", "worst_group_accuracy",
               "counterfactual", "four_corners", "linear_probe", "plots"}


@pytest.fixture(scope="module")
def cmnist():
    return build("colored_mnist", {}, seed=0, data_dir=None)


@pytest.fixture(scope="module")
def uploaded(cmnist, tmp_path_factory):
    """{(model name, format): AuditableModel} loaded back from files, as an upload would be."""
    root = tmp_path_factory.mktemp("uploads")
    example = cmnist.splits["test"].x[:4]
    originals = {"colour_reader": ColourReader(), "colour_blind": ColourBlind.fit_template(cmnist.train_data())}
    models = {}
    for name, module in originals.items():
        models[name, "torchscript"] = load_checkpoint(
            save_torchscript(module, root / f"{name}.pt"), "torchscript", input_shape=cmnist.input_shape)
        onnx_path = save_onnx(module, root / f"{name}.onnx", example)
        models[name, "onnx"] = load_checkpoint(onnx_path, "onnx", feature_layer=_features_output(onnx_path))
    return models


def _features_output(onnx_path) -> str:
    """The tensor the exported `features` submodule produces last (what the head reads)."""
    import onnx

    nodes = onnx.load(str(onnx_path)).graph.node
    return [node.output[0] for node in nodes if node.name.startswith("/features/")][-1]


def audit(model, dataset, tmp_path, **kwargs):
    kwargs = {"probes": None, "spurious_attribute": dataset.attribute_name or "none", "seed": 0,
              "out_dir": tmp_path, **kwargs}
    return run_audit(model, dataset, **kwargs)


# ---- the verdict on models whose reliance is known ------------------------------------------

@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_model_that_reads_only_colour_flips_under_a_colour_swap(cmnist, uploaded, tmp_path, fmt):
    report = audit(uploaded["colour_reader", fmt], cmnist, tmp_path)
    assert report["counterfactual"]["flip_rate"] >= 0.95
    assert report["summary"]["reliance_score"] == report["counterfactual"]["flip_rate"]  # every flip follows colour
    assert report["counterfactual"]["flip_rate_towards"] == report["counterfactual"]["flip_rate"]
    assert (report["summary"]["verdict"], report["summary"]["basis"]) == ("high", "counterfactual")
    assert report["summary"]["direction"] == "towards"
    # colour disagrees with the label on 90% of the test split
    assert report["counterfactual"]["accuracy"] < 0.2 < 0.8 < report["counterfactual"]["accuracy_intervened"]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_colour_blind_model_does_not_flip(cmnist, uploaded, tmp_path, fmt):
    report = audit(uploaded["colour_blind", fmt], cmnist, tmp_path)
    assert report["counterfactual"]["flip_rate"] <= 0.02
    assert report["summary"]["verdict"] == "low"
    assert report["counterfactual"]["accuracy"] == report["counterfactual"]["accuracy_intervened"]
    assert report["average_accuracy"] > 0.6  # it reads digits (25% label noise caps it at 0.75)


def test_four_corners_show_the_colour_reader_certain_with_colour_and_clueless_without(cmnist, uploaded, tmp_path):
    report = audit(uploaded["colour_reader", "torchscript"], cmnist, tmp_path, probes=["four_corners"])
    corners = report["four_corners"]
    assert set(corners) == {"core_and_spurious", "core_only", "spurious_only", "neither"}
    # both channels equal: the logit is exactly 0, the binary entropy exactly ln 2
    assert corners["core_only"]["entropy"] == pytest.approx(math.log(2), abs=1e-6)
    assert corners["neither"]["entropy"] == pytest.approx(math.log(2), abs=1e-6)
    assert corners["spurious_only"]["entropy"] < 0.1
    assert corners["spurious_only"]["accuracy"] == pytest.approx(corners["core_and_spurious"]["accuracy"])
    assert report["four_corners_entropy"] == {"of": "sigmoid(logit)", "unit": "nats", "max": math.log(2)}


def test_linear_probe_decodes_colour_from_the_reader_and_digits_from_the_blind_model(cmnist, uploaded, tmp_path):
    reader = audit(uploaded["colour_reader", "torchscript"], cmnist, tmp_path, probes=["linear_probe"])["linear_probe"]
    blind = audit(uploaded["colour_blind", "onnx"], cmnist, tmp_path, probes=["linear_probe"])["linear_probe"]
    assert reader["layer"] == "features"
    assert reader["spurious_accuracy"] >= 0.95 and reader["core_accuracy"] < 0.7
    assert blind["layer"].startswith("/features/")
    assert blind["spurious_accuracy"] <= 0.6 and blind["core_accuracy"] > 0.6


def test_linear_probe_reads_colour_off_a_random_copy_too_so_its_baseline_is_shown(cmnist, uploaded, tmp_path):
    probe = audit(uploaded["colour_reader", "torchscript"], cmnist, tmp_path, probes=["linear_probe"])["linear_probe"]
    # the reader's feature layer (channel means) has no weights: any copy of it decodes colour as well
    assert probe["random_network"]["spurious_accuracy"] == probe["spurious_accuracy"] >= 0.95
    assert probe["core_label"].startswith("clean") and probe["data"].startswith("test")
    onnx = audit(uploaded["colour_reader", "onnx"], cmnist, tmp_path, probes=["linear_probe"])["linear_probe"]
    assert onnx["random_network"] == {"reason": onnx["random_network"]["reason"]} and onnx["spurious_accuracy"] >= 0.95


def test_linear_probe_fits_and_scores_on_held_out_examples_only(tmp_path):
    many_training_examples = {(0, 0): 400, (0, 1): 100, (1, 0): 100, (1, 1): 400}
    dataset = toy_dataset(many_training_examples, {(0, 0): 100, (0, 1): 100, (1, 0): 100, (1, 1): 100})
    test = dataset.splits["test"]
    # the test labels no longer match the inputs; the training ones still do
    shuffled = test.y[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))]
    dataset.splits["test"] = type(test)(name="test", x=test.x, y=shuffled, attribute=test.attribute)
    probe = audit(wrap_module(LabelReader()), dataset, tmp_path, probes=["linear_probe"])["linear_probe"]
    assert probe["core_accuracy"] < 0.65  # chance: no training example (all decodable) was fitted or scored
    assert probe["spurious_accuracy"] >= 0.95


def test_linear_probe_reads_the_clean_digit_label_off_an_erm_model_better_than_the_noisy_one(cmnist, tmp_path):
    from starvation.training import train

    spec = {"preset": "paper_cmnist_erm", "dataset": {"name": "colored_mnist", "params": {"n_train": 1_000}},
            "model": {"arch": "mlp", "hidden": [32]}, "optimizer": {"name": "adam", "lr": 1e-3}, "steps": 100,
            "eval_every": 100, "seeds": [0]}  # a small ERM MLP on the shipped digits: 2 s on a CPU
    checkpoint = train(spec, out_dir=tmp_path / "train").checkpoints[0]
    model = load_checkpoint(checkpoint.safetensors_path, "safetensors", arch=checkpoint.arch,
                            arch_params=checkpoint.arch_params, num_outputs=checkpoint.num_outputs)
    probe = audit(model, cmnist, tmp_path / "audit", probes=["linear_probe"])["linear_probe"]
    # the label noise is not in the digit: a reading of the digit scores lower against the noisy label
    assert probe["core_accuracy"] > probe["label_accuracy"]
    assert probe["core_label"].startswith("clean")
    low, high = probe["core_accuracy_interval"]
    assert low < probe["core_accuracy"] < high
    assert set(probe["random_network"]) >= {"core_accuracy", "spurious_accuracy", "label_accuracy"}


class ScaledColourReader(ColourReader):
    """Something runs after the last linear layer: an ONNX export whose output no Gemm makes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.head(self.features(x))


def test_linear_probe_without_a_reachable_layer_says_so_instead_of_guessing(cmnist, tmp_path):
    onnx_path = save_onnx(ScaledColourReader(), tmp_path / "scaled.onnx", cmnist.splits["test"].x[:4])
    probe = audit(load_checkpoint(onnx_path, "onnx"), cmnist, tmp_path, probes=["linear_probe"])
    assert probe["linear_probe"] == {"layer": None, "core_accuracy": None, "spurious_accuracy": None,
                                     "reason": probe["linear_probe"]["reason"]}
    assert "made by a Mul node, which is not a linear map" in probe["linear_probe"]["reason"]
    assert "name an intermediate tensor" in probe["linear_probe"]["reason"]


# ---- groups and the reliance score without intervention --------------------------------------

TRAIN_COLOUR_WITH_LABEL = {(0, 0): 40, (0, 1): 10, (1, 0): 10, (1, 1): 40}
TEST_GROUPS = {(0, 0): 30, (0, 1): 10, (1, 0): 20, (1, 1): 40}


def test_groups_report_accuracy_per_label_and_attribute(tmp_path):
    dataset = toy_dataset(TRAIN_COLOUR_WITH_LABEL, TEST_GROUPS)
    report = audit(wrap_module(AttributeReader()), dataset, tmp_path, probes=["groups"])
    assert [{k: g[k] for k in ("label", "attribute", "n", "accuracy", "aligned")} for g in report["groups"]] == [
        {"label": 0, "attribute": 0, "n": 30, "accuracy": 1.0, "aligned": True},
        {"label": 0, "attribute": 1, "n": 10, "accuracy": 0.0, "aligned": False},
        {"label": 1, "attribute": 0, "n": 20, "accuracy": 0.0, "aligned": False},
        {"label": 1, "attribute": 1, "n": 40, "accuracy": 1.0, "aligned": True},
    ]
    # Wilson: a perfect score on 30 examples does not make the group's accuracy certainly 1
    assert 0.85 < report["groups"][0]["accuracy_interval"][0] < 0.9 and report["groups"][0]["accuracy_interval"][1] == 1
    assert report["average_accuracy"] == pytest.approx(0.7)
    assert report["worst_group_accuracy"] == 0.0
    assert (report["bias_aligned_accuracy"], report["bias_conflicting_accuracy"]) == (1.0, 0.0)
    assert {k: report["summary"][k] for k in ("reliance_score", "verdict", "basis")} == {
        "reliance_score": 1.0, "verdict": "high", "basis": "groups"}
    assert report["counterfactual"] is None and report["four_corners"] is None


def test_bias_alignment_comes_from_the_training_data_not_the_test_split(tmp_path):
    swapped_training = {(0, 0): 10, (0, 1): 40, (1, 0): 40, (1, 1): 10}
    report = audit(wrap_module(AttributeReader()), toy_dataset(swapped_training, TEST_GROUPS), tmp_path,
                   probes=["groups"])
    assert [g["aligned"] for g in report["groups"]] == [False, True, True, False]
    # aligned minus conflicting accuracy is -1, clipped to 0
    assert {k: report["summary"][k] for k in ("reliance_score", "verdict", "basis")} == {
        "reliance_score": 0.0, "verdict": "low", "basis": "groups"}


def test_a_model_that_reads_the_label_has_no_group_gap(tmp_path):
    report = audit(wrap_module(LabelReader()), toy_dataset(TRAIN_COLOUR_WITH_LABEL, TEST_GROUPS), tmp_path)
    assert report["worst_group_accuracy"] == 1.0
    assert report["summary"]["verdict"] == "low"


def test_two_moons_audit_draws_the_decision_boundary_and_cannot_score_reliance(tmp_path):
    moons = build("two_moons", {}, seed=0, data_dir=None)
    report = audit(wrap_module(LabelReader()), moons, tmp_path, spurious_attribute="none")
    assert report["probes"] == ["groups", "linear_probe"] == supported_probes(moons)
    assert "decision_boundary.png" in report["plots"]
    assert report["summary"]["reliance_score"] is None and report["summary"]["reason"]
    assert report["linear_probe"]["spurious_accuracy"] is None


# ---- the report as a whole --------------------------------------------------------------------

def test_report_has_the_api_shape_and_plots_are_pngs(cmnist, uploaded, tmp_path):
    report = audit(uploaded["colour_blind", "torchscript"], cmnist, tmp_path)
    json.loads(json.dumps(report))  # plain JSON types only
    assert REPORT_KEYS <= set(report)
    assert report["probes"] == [name for name, probe in PROBES.items() if probe.by_default]  # ntk: only by name
    assert report["spurious_attribute"] == "color"
    assert set(report["summary"]) >= {"reliance_score", "verdict", "basis", "interval", "possible_verdicts"}
    assert {"label", "attribute", "n", "accuracy"} <= set(report["groups"][0])
    assert sum(g["n"] for g in report["groups"]) == len(cmnist.splits["test"])
    assert set(report["counterfactual"]) >= {"flip_rate", "accuracy", "accuracy_intervened"}
    assert all(set(c) >= {"accuracy", "entropy"} for c in report["four_corners"].values())
    assert set(report["linear_probe"]) >= {"layer", "core_accuracy", "spurious_accuracy"}
    assert report["plots"] == ["group_accuracy.png", "four_corners.png"]
    for name in report["plots"]:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_the_summary_probe_always_runs(cmnist, uploaded, tmp_path):
    report = audit(uploaded["colour_reader", "onnx"], cmnist, tmp_path, probes=["groups"])
    assert report["probes"] == ["groups", "counterfactual"]
    assert report["summary"]["basis"] == "counterfactual"
    assert report["four_corners"] is None and report["linear_probe"] is None


def test_the_same_seed_gives_the_same_report(cmnist, uploaded, tmp_path):
    model = uploaded["colour_blind", "onnx"]
    first = audit(model, cmnist, tmp_path / "a")
    assert audit(model, cmnist, tmp_path / "b") == first


@pytest.mark.parametrize("probes, message", [
    (["groups", "saliency"], "unknown probe"),
    (["counterfactual"], "does not support"),
])
def test_unknown_or_unsupported_probes_are_spec_errors(tmp_path, probes, message):
    dataset = toy_dataset(TRAIN_COLOUR_WITH_LABEL, TEST_GROUPS)
    with pytest.raises(SpecError, match=message):
        audit(wrap_module(LabelReader()), dataset, tmp_path, probes=probes)


def test_a_spurious_attribute_the_dataset_lacks_is_a_spec_error(cmnist, uploaded, tmp_path):
    with pytest.raises(SpecError, match="color"):
        audit(uploaded["colour_reader", "onnx"], cmnist, tmp_path, spurious_attribute="background")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_audit_runs_a_model_on_the_gpu(cmnist, tmp_path):
    on_cpu = audit(wrap_module(ColourBlind.fit_template(cmnist.train_data())), cmnist, tmp_path / "cpu")
    on_gpu = audit(wrap_module(ColourBlind.fit_template(cmnist.train_data())).to("cuda"), cmnist, tmp_path / "gpu")
    assert on_gpu["counterfactual"] == on_cpu["counterfactual"]
    assert on_gpu["linear_probe"]["spurious_accuracy"] == pytest.approx(on_cpu["linear_probe"]["spurious_accuracy"],
                                                                        abs=0.02)


# ---- the HTML page ----------------------------------------------------------------------------

def test_report_page_shows_numbers_and_plots_and_escapes_text(tmp_path):
    report = audit(wrap_module(AttributeReader()), toy_dataset(TRAIN_COLOUR_WITH_LABEL, TEST_GROUPS), tmp_path,
                   spurious_attribute="shade")
    report["spurious_attribute"] = "<script>alert(1)</script>"
    page = render_report_html(report, {"group_accuracy.png": "/v1/jobs/j1/artifacts/group_accuracy.png?a=1&b=2"},
                              title='Audit of "m" <b>')
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<title>Audit of &quot;m&quot; &lt;b&gt;</title>" in page
    assert '<img src="/v1/jobs/j1/artifacts/group_accuracy.png?a=1&amp;b=2"' in page
    assert "decision_boundary.png" not in page  # no URL given for it
    assert "high" in page and "0.7" in page


def test_a_registered_dataset_takes_the_spec_name_for_its_one_attribute(tmp_path):
    report = audit(wrap_module(LabelReader()), toy_dataset(TRAIN_COLOUR_WITH_LABEL, TEST_GROUPS), tmp_path,
                   spurious_attribute="background")
    assert report["spurious_attribute"] == "background"


@pytest.mark.parametrize("score, expected", [(0.0, "low"), (0.0999, "low"), (0.1, "partial"), (0.4999, "partial"),
                                             (0.5, "high"), (1.0, "high")])
def test_verdict_thresholds_follow_the_api(score, expected):
    from starvation.audit import verdict

    assert verdict(score) == expected


def test_an_in_memory_sequential_is_probed_at_its_second_to_last_layer(cmnist, tmp_path):
    from torch import nn

    torch.manual_seed(0)
    network = nn.Sequential(nn.Flatten(), nn.Linear(392, 6), nn.ReLU(), nn.Linear(6, 1))
    report = audit(wrap_module(network), cmnist, tmp_path, probes=["linear_probe"])
    assert report["linear_probe"]["layer"] == "2"
