"""The CLI's report tables: intervals beside the numbers, per-seed verdicts beside the pooled one."""
from __future__ import annotations

from rich.console import Console

from cli import render


def text_of(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_the_report_table_shows_intervals_direction_and_an_uncertain_verdicts_two_sides():
    report = {
        "spurious_attribute": "color",
        "summary": {"reliance_score": 0.51, "interval": [0.479, 0.541], "verdict": "uncertain",
                    "possible_verdicts": ["partial", "high"], "basis": "counterfactual", "direction": "towards"},
        "counterfactual": {"flip_rate": 0.6, "flip_rate_interval": [0.569, 0.63], "flip_rate_towards": 0.555,
                           "flip_rate_against": 0.045, "flip_rate_net": 0.51, "mean_abs_logit_change": 2.5,
                           "accuracy": 0.5, "accuracy_intervened": 0.5},
        "linear_probe": {"core_accuracy": 0.726, "core_accuracy_interval": [0.672, 0.774], "label_accuracy": 0.51,
                         "spurious_accuracy": 1.0, "random_network": {"core_accuracy": 0.716}},
        "pooled_summary": {"reliance_score": {"mean": 0.467, "std": 0.118}, "interval": [0.3, 0.63],
                           "verdict": "uncertain", "possible_verdicts": ["partial", "high"],
                           "per_seed": [{"seed": 0, "reliance_score": 0.55, "interval": [0.52, 0.58], "verdict": "high"},
                                        {"seed": 2, "reliance_score": 0.3, "interval": [0.27, 0.33],
                                         "verdict": "partial"}]},
    }
    text = text_of(render.report_table(report))
    assert "0.510 [0.479, 0.541]" in text and "uncertain (partial or high)" in text
    assert "towards the attribute's training association" in text
    assert "flips against it" in text and "0.045" in text and "mean |Δ logit|" in text
    assert "0.726 [0.672, 0.774] (random copy 0.716)" in text
    seeds = text_of(render.seeds_table(report))
    assert "0.550 [0.520, 0.580]" in seeds and "partial" in seeds and "pooled" in seeds
