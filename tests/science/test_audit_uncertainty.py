"""Reliance with uncertainty and direction: intervals that cover, verdicts that say when they cannot tell."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from starvation.audit import pool_reliance, run_audit, verdict
from starvation.audit.intervals import (
    difference_of_shares_interval,
    mean_interval,
    net_share_interval,
    pooled_mean_interval,
    wilson_interval,
)
from starvation.checkpoints import wrap_module
from tests.science.audit_fixtures import FollowsAttribute, SwappableToy


@pytest.fixture(scope="module")
def toy():
    return SwappableToy.build(n_test=1_000)


def audit(module, dataset, tmp_path, seed=0):
    return run_audit(wrap_module(module), dataset, probes=["counterfactual"], spurious_attribute="shade", seed=seed,
                     out_dir=tmp_path)


def overlap(a, b) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


# ---- two models closer than the interval --------------------------------------------------------

def test_two_models_closer_than_their_intervals_overlap_and_read_uncertain_at_the_threshold(toy, tmp_path):
    below, above = audit(FollowsAttribute(0.49), toy, tmp_path), audit(FollowsAttribute(0.51), toy, tmp_path)
    assert below["summary"]["reliance_score"] == pytest.approx(0.49)
    assert above["summary"]["reliance_score"] == pytest.approx(0.51)
    # a hard cut at 0.5 would call them partial and high
    assert (verdict(0.49), verdict(0.51)) == ("partial", "high")
    assert overlap(below["summary"]["interval"], above["summary"]["interval"])
    assert overlap(below["counterfactual"]["flip_rate_interval"], above["counterfactual"]["flip_rate_interval"])
    for report in (below, above):
        assert report["summary"]["verdict"] == "uncertain"
        assert report["summary"]["possible_verdicts"] == ["partial", "high"]


def test_a_score_far_from_the_thresholds_keeps_a_plain_verdict(toy, tmp_path):
    report = audit(FollowsAttribute(0.8), toy, tmp_path)
    low, high = report["summary"]["interval"]
    assert 0.5 < low < 0.8 < high < 0.85
    assert report["summary"]["verdict"] == "high" and report["summary"]["possible_verdicts"] == ["high"]


# ---- direction ----------------------------------------------------------------------------------

def test_a_model_sensitive_to_the_attribute_both_ways_is_not_read_as_reliant(toy, tmp_path):
    report = audit(FollowsAttribute(0.25, against=0.25), toy, tmp_path)
    counterfactual = report["counterfactual"]
    assert counterfactual["flip_rate"] == pytest.approx(0.5)
    assert counterfactual["flip_rate_towards"] == pytest.approx(0.25)
    assert counterfactual["flip_rate_against"] == pytest.approx(0.25)
    assert counterfactual["flip_rate_net"] == pytest.approx(0.0)
    assert report["summary"]["reliance_score"] == pytest.approx(0.0)
    assert report["summary"]["verdict"] == "low" and report["summary"]["direction"] is None


def test_a_model_that_follows_the_attribute_backwards_is_reliant_against_it(toy, tmp_path):
    report = audit(FollowsAttribute(0.0, against=0.6), toy, tmp_path)
    assert report["counterfactual"]["flip_rate_against"] == pytest.approx(0.6)
    assert report["counterfactual"]["flip_rate_net"] == pytest.approx(-0.6)
    assert report["summary"]["reliance_score"] == pytest.approx(0.6)
    assert (report["summary"]["direction"], report["summary"]["verdict"]) == ("against", "high")


def test_the_logit_and_probability_changes_measure_how_far_the_swap_moves_the_model(toy, tmp_path):
    model = FollowsAttribute(0.3, k=4.0)
    report = audit(model, toy, tmp_path)["counterfactual"]
    test = toy.splits["test"]
    with torch.no_grad():
        before, after = model(test.x)[:, 0].double(), model(toy.intervene(test).x)[:, 0].double()
    assert report["mean_abs_logit_change"] == pytest.approx(float((after - before).abs().mean()))
    assert report["mean_abs_probability_change"] == pytest.approx(
        float((torch.sigmoid(after) - torch.sigmoid(before)).abs().mean()))
    low, high = report["mean_abs_logit_change_interval"]
    assert low < report["mean_abs_logit_change"] < high


# ---- seeds --------------------------------------------------------------------------------------

def test_seeds_keep_their_own_verdicts_beside_a_pooled_one_that_admits_their_spread(toy, tmp_path):
    reports = [{"seed": seed, **audit(FollowsAttribute(share), toy, tmp_path / str(seed), seed=seed)}
               for seed, share in enumerate((0.55, 0.55, 0.30))]
    pooled = pool_reliance(reports)
    assert [s["verdict"] for s in pooled["per_seed"]] == ["high", "high", "partial"]
    assert [s["seed"] for s in pooled["per_seed"]] == [0, 1, 2]
    assert pooled["reliance_score"]["mean"] == pytest.approx(0.4667, abs=1e-3)
    assert pooled["interval"][0] < 0.4667 < 0.5 < pooled["interval"][1]
    assert pooled["verdict"] == "uncertain"


def test_one_seed_pooled_keeps_its_own_interval():
    assert pooled_mean_interval([0.015], [[0.0, 0.058]]) == [0.0, 0.058]


def test_pooling_seeds_that_agree_keeps_each_seeds_own_uncertainty():
    interval = pooled_mean_interval([0.8, 0.8], [[0.77, 0.83], [0.77, 0.83]])
    assert 0.76 < interval[0] < 0.8 < interval[1] < 0.84  # not [0.8, 0.8]


def test_the_pooled_interval_of_a_few_seeds_covers_their_true_mean_95_percent_of_the_time():
    """Seeds' scores spread around a true reliance: with 3 seeds, a normal quantile would cover ~88%."""
    rng = np.random.default_rng(3)
    draws = rng.normal(0.5, 0.08, size=(4_000, 3))
    tight = [[0.49, 0.51]] * 3  # each seed's own interval: narrow, so the spread between seeds decides
    found = coverage([pooled_mean_interval(list(row), tight) for row in draws], 0.5)
    assert 0.93 <= found <= 0.97
    assert pooled_mean_interval([0.5, 0.6, 0.7], tight) == pytest.approx([0.6 - 0.2484, 0.6 + 0.2484], abs=1e-3)


# ---- coverage on synthetic data with a known rate ---------------------------------------------

def coverage(intervals, truth) -> float:
    return float(np.mean([low <= truth <= high for low, high in intervals]))


@pytest.mark.parametrize("rate, n", [(0.3, 200), (0.05, 400), (0.5, 1000)])
def test_the_share_interval_covers_a_known_rate_95_percent_of_the_time(rate, n):
    rng = np.random.default_rng(7)
    found = coverage([wilson_interval(int(k), n) for k in rng.binomial(n, rate, size=4_000)], rate)
    assert 0.93 <= found <= 0.97  # 4,000 draws: the standard error of the coverage is 0.0035


def test_the_net_flip_interval_covers_a_known_net_rate():
    rng = np.random.default_rng(8)
    counts = rng.multinomial(300, [0.3, 0.25, 0.45], size=600)
    found = coverage([net_share_interval(int(t), int(a), 300, seed=i) for i, (t, a, _) in enumerate(counts)], 0.05)
    assert 0.92 <= found <= 0.975  # 600 draws: standard error 0.009


def test_the_net_flip_interval_keeps_its_width_when_every_example_flips():
    low, high = net_share_interval(1_000, 0, 1_000, seed=0)
    assert 0.99 < low < high <= 1.0


def test_the_accuracy_gap_interval_covers_a_known_gap():
    rng = np.random.default_rng(9)
    aligned, conflicting = rng.binomial(120, 0.8, size=600), rng.binomial(80, 0.6, size=600)
    found = coverage([difference_of_shares_interval(int(a), 120, int(c), 80, seed=i)
                      for i, (a, c) in enumerate(zip(aligned, conflicting))], 0.2)
    assert 0.92 <= found <= 0.975


def test_the_mean_interval_covers_a_known_mean():
    rng = np.random.default_rng(10)
    found = coverage([mean_interval(torch.from_numpy(rng.normal(1.0, 2.0, size=200)), seed=i, draws=500)
                      for i in range(300)], 1.0)
    assert 0.90 <= found <= 0.98  # 300 draws: standard error 0.013


def test_the_same_seed_gives_the_same_intervals(toy, tmp_path):
    first = audit(FollowsAttribute(0.4), toy, tmp_path / "a")
    assert audit(FollowsAttribute(0.4), toy, tmp_path / "b") == first


def test_the_report_page_shows_the_interval_and_names_both_verdicts_when_uncertain(toy, tmp_path):
    from starvation.audit import render_report_html

    report = audit(FollowsAttribute(0.51), toy, tmp_path)
    page = render_report_html(report, {}, title="t")
    low, high = report["summary"]["interval"]
    assert f"0.510 [{low:.3f}, {high:.3f}]" in page  # every number at three decimals, as on the dashboard
    assert "uncertain (between partial and high)" in page and 'class="verdict-uncertain"' in page
    assert "flips towards the training association" in page and "mean |Δ logit|" in page
