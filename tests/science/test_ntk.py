"""The NTK probe against kernels whose answer is known in closed form."""
from __future__ import annotations

import torch
from torch import nn

from starvation import datasets
from starvation.audit import run_audit
from starvation.ntk import balanced_sample, centred_alignment, ntk_gram
from starvation.checkpoints import wrap_module


def test_a_linear_models_kernel_is_the_inputs_gram_matrix_plus_one():
    torch.manual_seed(0)
    x = torch.randn(40, 5)
    model = nn.Linear(5, 1)
    expected = (x @ x.T + 1).double()  # d(w.x + b)/d(w, b) = (x, 1)
    assert torch.allclose(ntk_gram(model, x), expected, atol=1e-4)


def test_the_two_feature_linear_toy_matches_its_closed_form_whatever_the_memory_groups():
    """f(x) = v . W x with two features: K = |v|^2 X X^T + X W^T W X^T (gradients with respect to W, then v)."""
    torch.manual_seed(1)
    x = torch.randn(30, 2)
    model = nn.Sequential(nn.Linear(2, 7, bias=False), nn.Linear(7, 1, bias=False))
    w, v = model[0].weight.detach().double(), model[1].weight.detach().double()[0]
    xd = x.double()
    expected = (v @ v) * (xd @ xd.T) + xd @ w.T @ w @ xd.T
    assert torch.allclose(ntk_gram(model, x), expected, atol=1e-4)
    assert torch.allclose(ntk_gram(model, x, memory_bytes=1), expected, atol=1e-4)  # one tensor at a time


def test_centred_alignment_is_one_for_the_targets_own_kernel_and_near_zero_for_noise():
    y = torch.tensor([0, 1] * 50)
    own = (y.unsqueeze(1) == y.unsqueeze(0)).double() * 3 + 5
    assert abs(centred_alignment(own, y) - 1.0) < 1e-9
    noise = torch.randn(100, 100, generator=torch.Generator().manual_seed(0)).double()
    assert abs(centred_alignment(noise @ noise.T, y)) < 0.2


class Colour(nn.Module):
    """A linear read-out of each channel's share of the ink: colour only, whatever the digit's amount of ink."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ink = x.sum(dim=(2, 3))
        return self.head(ink / ink.sum(dim=1, keepdim=True).clamp_min(1e-6))


class ColourBlind(nn.Module):
    """A linear read-out of the grey image: the channels summed first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(14 * 14, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.sum(dim=1).flatten(1))


def test_on_colored_mnist_a_colour_reader_aligns_with_the_attribute_and_a_colour_blind_one_does_not(tmp_path):
    data = datasets.build("colored_mnist", {}, seed=0, data_dir=None)
    colour = run_audit(wrap_module(Colour()), data, probes=["ntk"], spurious_attribute="color", seed=0,
                       out_dir=tmp_path / "colour")["ntk"]
    blind = run_audit(wrap_module(ColourBlind()), data, probes=["ntk"], spurious_attribute="color", seed=0,
                      out_dir=tmp_path / "blind")["ntk"]
    assert colour["alignment"]["attribute"] >= 0.9 and blind["alignment"]["attribute"] <= 0.2
    assert blind["alignment"]["core"] > blind["alignment"]["attribute"]
    assert colour["sample"]["n"] == len(colour["sample"]["indices"]) <= 1024
    shares = colour["top_eigenvector_mass"]["groups"]
    assert len(shares) == 4 and abs(sum(g["top_mass_share"] for g in shares.values()) - 1.0) < 1e-6


def test_the_sample_is_balanced_over_groups():
    y = torch.tensor([0] * 90 + [1] * 10)
    attribute = torch.tensor([0] * 80 + [1] * 10 + [0] * 5 + [1] * 5)
    chosen = balanced_sample(y, attribute, seed=0)
    groups = [(int(y[i]), int(attribute[i])) for i in chosen]
    assert sorted(set(groups)) == [(0, 0), (0, 1), (1, 0), (1, 1)] and all(groups.count(g) == 5 for g in set(groups))


def test_ntk_every_follows_the_alignments_over_training_the_same_batched_or_one_seed_at_a_time(tmp_path):
    from starvation.training import train

    recorded = {}
    for execution in ("sequential", "batched"):
        rows = []
        train({"preset": "paper_cmnist_sd", "steps": 20, "eval_every": 5, "ntk_every": 10, "seeds": [0, 1],
               "execution": execution, "audit": False}, out_dir=tmp_path / execution, on_metrics=rows.extend)
        recorded[execution] = {(m.step, m.seed, m.name, m.split): m.value for m in rows if m.name.startswith("ntk")}
    sequential, batched = recorded["sequential"], recorded["batched"]
    assert {step for step, *_ in sequential} == {0, 10, 20}  # evaluations at multiples of ntk_every only
    assert {name for _, _, name, _ in sequential} == {"ntk_alignment_label", "ntk_alignment_attribute",
                                                       "ntk_alignment_core"}
    assert sequential.keys() == batched.keys()
    assert max(abs(sequential[key] - batched[key]) for key in sequential) < 1e-5
