"""The training objectives against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from starvation.errors import SpecError
from starvation.methods import METHODS, build_method, cross_entropy, irm_penalty, sd_penalty

LOGITS = torch.tensor([1.0, -2.0, 3.0, 0.0])
LABELS = torch.tensor([1, 0, 1, 1])


def logistic(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The paper's moons loss, log(1 + exp(-y f)) with y in {-1, +1}, averaged."""
    signs = 2.0 * labels.double() - 1.0
    return sum(math.log1p(math.exp(-s * f)) for s, f in zip(signs.tolist(), logits.double().tolist())) / len(labels)


def test_binary_cross_entropy_is_the_logistic_loss_with_labels_mapped_to_plus_minus_one() -> None:
    assert float(cross_entropy(LOGITS, LABELS)) == pytest.approx(logistic(LOGITS, LABELS), rel=1e-6)


def test_registry_names_the_methods_and_each_cites_its_source() -> None:
    assert set(METHODS) == {"erm", "weight_decay", "sd", "irm", "group_dro", "jtt"}
    assert all("arXiv" in METHODS[name].__doc__ for name in ("irm", "group_dro", "jtt"))


def test_sd_scalar_gamma_adds_half_lambda_times_mean_squared_distance() -> None:
    # (1-.5)^2, (-2-.5)^2, (3-.5)^2, (0-.5)^2 = .25, 6.25, 6.25, .25 -> mean 3.25
    assert float(sd_penalty(LOGITS, LABELS, 0.5, per_class_mean=False)) == pytest.approx(3.25)
    method = build_method({"name": "sd", "sd_lambda": 0.3, "sd_gamma": 0.5})
    expected = logistic(LOGITS, LABELS) + 0.15 * 3.25
    assert float(method.loss(LOGITS, LABELS, 0, nn.Linear(1, 1))) == pytest.approx(expected, rel=1e-6)


def test_sd_per_class_gamma_targets_each_example_by_its_label() -> None:
    # gamma [-1, 2]: targets 2, -1, 2, 2; squared distances 1, 1, 1, 4
    assert float(sd_penalty(LOGITS, LABELS, [-1.0, 2.0], per_class_mean=False)) == pytest.approx(7 / 4)


def test_sd_per_class_mean_averages_within_each_class_then_sums() -> None:
    # class 0: (1)/1 = 1; class 1: (1 + 1 + 4)/3 = 2 -> 3
    assert float(sd_penalty(LOGITS, LABELS, [-1.0, 2.0], per_class_mean=True)) == pytest.approx(3.0)
    # a class absent from the batch adds nothing: only class 1's mean, 2
    ones = LABELS == 1
    assert float(sd_penalty(LOGITS[ones], LABELS[ones], [-1.0, 2.0], per_class_mean=True)) == pytest.approx(2.0)


def test_celeba_recipe_is_lambda_times_each_class_mean() -> None:
    # PAPER.md: 0.1 * mean_blond (f - 2.5)^2 + 0.1 * mean_non_blond (f - 0.44)^2
    method = build_method({"name": "sd", "sd_lambda": 0.2, "sd_gamma": [0.44, 2.5], "per_class_mean": True})
    blond, other = LOGITS[LABELS == 1], LOGITS[LABELS == 0]
    expected = (logistic(LOGITS, LABELS) + 0.1 * float(((blond - 2.5) ** 2).mean())
                + 0.1 * float(((other - 0.44) ** 2).mean()))
    assert float(method.loss(LOGITS, LABELS, 0, nn.Linear(1, 1))) == pytest.approx(expected, rel=1e-6)


def test_sd_multiclass_gamma_is_per_output_and_distance_is_summed_over_logits() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([2, 0])
    # scalar 1: (0 + 1 + 4) and (1 + 1 + 1) -> mean 4
    assert float(sd_penalty(logits, labels, 1.0, per_class_mean=False)) == pytest.approx(4.0)
    # per output [1, 2, 3]: (0 + 0 + 0) and (1 + 4 + 9) -> mean 7
    assert float(sd_penalty(logits, labels, [1.0, 2.0, 3.0], per_class_mean=False)) == pytest.approx(7.0)


def test_sd_gamma_with_the_wrong_number_of_classes_is_refused() -> None:
    with pytest.raises(SpecError, match="3 values"):
        sd_penalty(LOGITS, LABELS, [0.0, 1.0, 2.0], per_class_mean=False)


def test_cmnist_recipe_switches_at_step_450_and_scales_the_whole_loss() -> None:
    """PAPER.md: steps < 450: BCE + 2e-5 mean(f^2); from 450: 2e-5 (mean(f^2) + BCE)."""
    method = build_method({"name": "sd", "sd_lambda": 2.0, "warmup_steps": 450, "warmup_sd_lambda": 4e-5,
                           "post_warmup_loss_scale": 2e-5})
    bce, sd = logistic(LOGITS, LABELS), float((LOGITS ** 2).mean())
    model = nn.Linear(1, 1)
    assert float(method.loss(LOGITS, LABELS, 0, model)) == pytest.approx(bce + 2e-5 * sd, rel=1e-6)
    assert float(method.loss(LOGITS, LABELS, 449, model)) == pytest.approx(bce + 2e-5 * sd, rel=1e-6)
    assert float(method.loss(LOGITS, LABELS, 450, model)) == pytest.approx(2e-5 * (sd + bce), rel=1e-6)
    assert float(method.loss(LOGITS, LABELS, 2000, model)) == pytest.approx(2e-5 * (sd + bce), rel=1e-6)


def test_sd_penalty_acts_on_the_logits_not_the_weights() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(100.0)
    logits = torch.zeros(4)
    method = build_method({"name": "sd", "sd_lambda": 1.0})
    assert float(method.loss(logits, LABELS, 0, model)) == pytest.approx(math.log(2), rel=1e-6)


def test_weight_decay_adds_coefficient_times_squared_weights_without_biases() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
        model.bias.fill_(10.0)
    method = build_method({"name": "weight_decay", "weight_decay": 0.01})
    expected = logistic(LOGITS, LABELS) + 0.01 * 25.0
    assert float(method.loss(LOGITS, LABELS, 0, model).detach()) == pytest.approx(expected, rel=1e-6)


def test_erm_is_the_cross_entropy_for_k_classes() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 2])
    log_softmax = torch.log_softmax(logits.double(), dim=1)
    expected = -float((log_softmax[0, 0] + log_softmax[1, 2]) / 2)
    assert float(build_method({"name": "erm"}).loss(logits, labels, 0, nn.Linear(1, 1))) == pytest.approx(expected)


@pytest.mark.parametrize("spec, message", [
    ({"name": "erm", "sd_lambda": 1.0}, "no parameter 'sd_lambda'"),
    ({"name": "sd", "sd_lambda": -1.0}, "sd_lambda"),
    ({"name": "sd", "sd_gamma": []}, "sd_gamma"),
    ({"name": "sd", "warmup_steps": 1.5}, "warmup_steps"),
    ({"name": "dropout"}, "unknown method 'dropout'"),
])
def test_bad_method_specs_are_refused_with_a_message(spec: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build_method(spec)


# ---- IRM -------------------------------------------------------------------------------------

def two_environments(first: int, second: int) -> torch.Tensor:
    """One-hot environment membership [first + second, 2]: the first rows in environment 0, the rest in 1."""
    return nn.functional.one_hot(torch.tensor([0] * first + [1] * second), 2).float()


def authors_irm_penalty(logits: torch.Tensor, y: torch.Tensor, environment: torch.Tensor) -> float:
    """IRMv1 as the IRM authors compute it: autograd of each environment's BCE w.r.t. a dummy scale at 1."""
    penalties = []
    for e in range(environment.shape[1]):
        rows = environment[:, e].bool()
        scale = torch.tensor(1.0, requires_grad=True)
        risk = nn.functional.binary_cross_entropy_with_logits(logits[rows] * scale, y[rows].float())
        penalties.append(torch.autograd.grad(risk, [scale])[0] ** 2)
    return float(torch.stack(penalties).mean())


def test_irm_penalty_is_zero_for_a_classifier_optimal_in_every_environment_and_positive_otherwise() -> None:
    # Each environment: 4 examples, 1 positive. A constant logit log(1/3) predicts 1/4, the environment's rate:
    # no rescaling of it lowers either risk.
    y = torch.tensor([1, 0, 0, 0, 0, 1, 0, 0])
    calibrated = torch.full((8,), math.log(1 / 3))
    environment = two_environments(4, 4)
    assert float(irm_penalty(calibrated, y, environment)) == pytest.approx(0.0, abs=1e-12)
    # The same logits where environment 1 is half positive: optimal for environment 0 only.
    y_shifted = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0])
    assert float(irm_penalty(calibrated, y_shifted, environment)) > 1e-3
    # Over-confident logits (right sign, too large) are penalised in both environments.
    assert float(irm_penalty(4 * calibrated, y, environment)) > 1e-3


def test_irm_penalty_equals_the_authors_autograd_formulation() -> None:
    generator = torch.Generator().manual_seed(0)
    logits, y = torch.randn(30, generator=generator) * 2, torch.randint(0, 2, (30,), generator=generator)
    environment = two_environments(12, 18)
    assert float(irm_penalty(logits, y, environment)) == pytest.approx(
        authors_irm_penalty(logits, y, environment), rel=1e-5)


def test_irm_penalty_for_k_classes_is_the_gradient_wrt_a_scale_on_the_logits() -> None:
    generator = torch.Generator().manual_seed(1)
    logits, y = torch.randn(10, 3, generator=generator), torch.randint(0, 3, (10,), generator=generator)
    environment = two_environments(4, 6)
    expected = []
    for rows in (slice(0, 4), slice(4, 10)):
        scale = torch.tensor(1.0, requires_grad=True)
        expected.append(torch.autograd.grad(cross_entropy(logits[rows] * scale, y[rows]), [scale])[0] ** 2)
    assert float(irm_penalty(logits, y, environment)) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)


def test_irm_loss_anneals_the_penalty_then_rescales_the_whole_loss() -> None:
    y = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0])
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, 0.0, -0.5, 1.5])
    environment = two_environments(4, 4)
    model = nn.Linear(2, 1)
    squared = sum(float(p.detach().pow(2).sum()) for p in model.parameters())  # biases included, as the authors' script
    risks = [float(cross_entropy(logits[:4], y[:4])), float(cross_entropy(logits[4:], y[4:]))]
    penalty = float(irm_penalty(logits, y, environment))
    method = build_method({"name": "irm", "penalty_weight": 1000.0, "penalty_anneal_steps": 10, "l2_weight": 0.01})
    before = sum(risks) / 2 + penalty + 0.01 * squared
    after = (sum(risks) / 2 + 1000.0 * penalty + 0.01 * squared) / 1000.0
    assert float(method.loss(logits, y, 9, model, environment=environment).detach()) == pytest.approx(before, rel=1e-5)
    assert float(method.loss(logits, y, 10, model, environment=environment).detach()) == pytest.approx(after, rel=1e-5)
    assert method.phase(9) != method.phase(10)


def test_an_environment_absent_from_a_minibatch_adds_nothing() -> None:
    y, logits = torch.tensor([1, 0, 1]), torch.tensor([0.3, -0.2, 1.0])
    only_first = two_environments(3, 0)
    method = build_method({"name": "irm", "penalty_weight": 1.0, "penalty_anneal_steps": 0})
    alone = float(cross_entropy(logits, y)) + authors_irm_penalty(logits, y, only_first[:, :1])
    assert float(method.loss(logits, y, 0, nn.Linear(1, 1), environment=only_first)) == pytest.approx(alone, rel=1e-5)


# ---- Group DRO -------------------------------------------------------------------------------

def test_group_dro_grows_each_groups_weight_with_its_loss_and_weighs_the_loss_by_it() -> None:
    y, logits = torch.tensor([1, 1, 0, 0]), torch.tensor([2.0, 1.0, 3.0, -1.0])  # group 1 (rows 2, 3) fits worse
    group = nn.functional.one_hot(torch.tensor([0, 0, 1, 1]), 2).float()
    losses = torch.stack([cross_entropy(logits[:2], y[:2]), cross_entropy(logits[2:], y[2:])])
    method = build_method({"name": "group_dro", "step_size": 0.5})
    grown = 0.5 * torch.exp(0.5 * losses)
    weights = grown / grown.sum()
    assert float(method.loss(logits, y, 0, nn.Linear(1, 1), group=group)) == pytest.approx(
        float(weights @ losses), rel=1e-6)
    torch.testing.assert_close(method.group_weights, weights)
    for step in range(1, 50):  # the same losses again and again: the worse group takes (nearly) all the weight
        method.loss(logits, y, step, nn.Linear(1, 1), group=group)
    assert float(method.group_weights[1]) > 0.99


def test_group_dro_with_step_size_zero_is_the_mean_of_the_group_losses() -> None:
    y, logits = torch.tensor([1, 0, 0]), torch.tensor([0.5, 0.2, -2.0])
    group = nn.functional.one_hot(torch.tensor([0, 1, 1]), 4).float()  # groups 2 and 3 absent: loss 0 there
    method = build_method({"name": "group_dro", "step_size": 0.0})
    expected = (float(cross_entropy(logits[:1], y[:1])) + float(cross_entropy(logits[1:], y[1:]))) / 4
    assert float(method.loss(logits, y, 0, nn.Linear(1, 1), group=group)) == pytest.approx(expected, rel=1e-6)


def test_jtt_weighs_the_error_sets_cross_entropy_by_upweight() -> None:
    error_set = torch.tensor([1.0, 0.0, 0.0, 1.0])
    method = build_method({"name": "jtt", "upweight": 5.0})
    per_example = [logistic(LOGITS[i:i + 1], LABELS[i:i + 1]) for i in range(4)]
    expected = (5 * per_example[0] + per_example[1] + per_example[2] + 5 * per_example[3]) / 12
    assert float(method.loss(LOGITS, LABELS, 0, nn.Linear(1, 1), error_set=error_set)) == pytest.approx(expected)
    plain = build_method({"name": "jtt", "upweight": 1.0})
    assert float(plain.loss(LOGITS, LABELS, 0, None, error_set=error_set)) == pytest.approx(logistic(LOGITS, LABELS))


def test_jtts_error_set_is_what_erm_from_the_same_start_gets_wrong_and_its_second_model_starts_afresh(tmp_path):
    from starvation import datasets
    from starvation.checkpoints import load_checkpoint
    from starvation.training import train
    from starvation.training.loop import SeedPreparation
    from starvation.training.resolved import ResolvedTrainSpec
    from starvation.training.spec import resolve_train_spec

    spec = {"dataset": {"name": "colored_mnist", "params": {"n_train": 400}}, "model": {"arch": "mlp", "hidden": [16]},
            "steps": 8, "eval_every": 8, "seeds": [3], "audit": False}
    erm = train({**spec, "steps": 5, "eval_every": 5}, out_dir=tmp_path / "erm5").checkpoints[0]
    data = datasets.build("colored_mnist", {"n_train": 400}, seed=3, data_dir=None)
    rows = data.train_data()
    with torch.no_grad():
        wrong = ((load_checkpoint(erm.safetensors_path, "safetensors").logits(rows.x)[:, 0] > 0).long() != rows.y)
    resolved = ResolvedTrainSpec.of(resolve_train_spec({**spec, "method": {"name": "jtt", "identification_steps": 5}}))
    offered = SeedPreparation(resolved, data, 3, torch.device("cpu"), None)
    found = build_method(resolved.method.to_dict()).prepare(offered)["error_set"]  # the error set, through the hook
    assert torch.equal(found, wrong.float()) and 0 < int(found.sum()) < len(rows)

    # With upweight 1 the second model is plain ERM from the seed's initialisation: the same run, step for step (up
    # to the rounding of a weighted mean against a mean).
    def run(method: dict) -> dict[tuple[int, str, str], float]:
        metrics = []
        train({**spec, "method": method}, out_dir=tmp_path / method["name"], on_metrics=metrics.extend)
        return {(m.step, m.split, m.name): m.value for m in metrics}
    erm_run = run({"name": "erm"})
    assert run({"name": "jtt", "upweight": 1.0, "identification_steps": 5}) == pytest.approx(erm_run, rel=1e-5)
    assert run({"name": "jtt", "upweight": 8.0, "identification_steps": 5}) != pytest.approx(erm_run, rel=1e-3)
