"""Confidence intervals for the audit's numbers (docs/audit.md, "Uncertainty").

A share of examples (an accuracy, a flip rate) gets a Wilson score interval. A score built from
several shares (the net flip rate, aligned minus conflicting accuracy) gets a bootstrap over the
audited examples with a fixed seed: such a score depends only on how many examples fall in each
outcome category, so the draws are of the category shares. They come from a Dirichlet with half a
pseudo-count per category (a Bayesian bootstrap with the Jeffreys prior): a plain percentile
bootstrap collapses to zero width when a category is empty (every example flips: [1, 1]). A mean
of a continuous quantity gets a plain percentile bootstrap.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch

CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 2_000

Interval = list[float]  # [low, high], JSON-friendly


def z_value(confidence: float = CONFIDENCE) -> float:
    """The two-sided standard normal quantile: 1.96 for 95%."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval | None:
    """Wilson score interval for a share `successes / n`; None when there are no examples."""
    if n <= 0:
        return None
    z, p = z_value(confidence), successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at 0 or n successes the bound is exactly 0 or 1; say so rather than 0.9999999999999999
    return [0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half)]


def share_interval(outcomes: torch.Tensor, confidence: float = CONFIDENCE) -> Interval | None:
    """Wilson interval of the share of true values in a boolean tensor."""
    return wilson_interval(int(outcomes.sum()), int(outcomes.numel()), confidence)


def percentile_interval(draws: np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return [float(low), float(high)]


JEFFREYS = 0.5  # pseudo-count per outcome category


def net_share_interval(
    towards: int, against: int, n: int, *, seed: int, confidence: float = CONFIDENCE, draws: int = BOOTSTRAP_DRAWS
) -> Interval | None:
    """Bootstrap interval of (towards - against) / n, each example being towards, against or neither."""
    if n <= 0:
        return None
    rng = np.random.default_rng(seed)
    counts = np.array([towards, against, n - towards - against], dtype=float)
    shares = rng.dirichlet(counts + JEFFREYS, size=draws)
    return _including(percentile_interval(shares[:, 0] - shares[:, 1], confidence), (towards - against) / n)


def difference_of_shares_interval(
    successes_a: int,
    n_a: int,
    successes_b: int,
    n_b: int,
    *,
    seed: int,
    confidence: float = CONFIDENCE,
    draws: int = BOOTSTRAP_DRAWS,
) -> Interval | None:
    """Bootstrap interval of successes_a / n_a - successes_b / n_b, each group drawn on its own."""
    if n_a <= 0 or n_b <= 0:
        return None
    rng = np.random.default_rng(seed)
    share_a = rng.beta(successes_a + JEFFREYS, n_a - successes_a + JEFFREYS, size=draws)
    share_b = rng.beta(successes_b + JEFFREYS, n_b - successes_b + JEFFREYS, size=draws)
    return _including(percentile_interval(share_a - share_b, confidence), successes_a / n_a - successes_b / n_b)


def _including(interval: Interval, estimate: float) -> Interval:
    """The interval stretched to hold the estimate: the prior's half count pulls a share of exactly 0 or 1 inwards."""
    return [min(interval[0], estimate), max(interval[1], estimate)]


def mean_interval(
    values: torch.Tensor, *, seed: int, confidence: float = CONFIDENCE, draws: int = BOOTSTRAP_DRAWS
) -> Interval | None:
    """Percentile bootstrap interval of the mean of `values`, resampling examples."""
    array = values.detach().double().cpu().numpy().ravel()
    if len(array) == 0:
        return None
    rng = np.random.default_rng(seed)
    # In chunks of draws: a [draws, n] index matrix at once would be large for big test splits.
    means = np.empty(draws)
    for start in range(0, draws, 250):
        stop = min(start + 250, draws)
        index = rng.integers(0, len(array), size=(stop - start, len(array)))
        means[start:stop] = array[index].mean(axis=1)
    return percentile_interval(means, confidence)


def absolute_interval(interval: Interval) -> Interval:
    """The interval of |v| for v in `interval` (percentile intervals follow monotone maps on each side of 0)."""
    low, high = interval
    if low <= 0 <= high:
        return [0.0, max(-low, high)]
    return sorted([abs(low), abs(high)])


def clip_interval(interval: Interval, low: float = 0.0, high: float = 1.0) -> Interval:
    return [min(max(interval[0], low), high), min(max(interval[1], low), high)]


def pooled_mean_interval(
    scores: list[float], intervals: list[Interval | None], confidence: float = CONFIDENCE
) -> Interval:
    """Interval of the mean of per-seed scores: the wider of two readings.

    Between seeds: Student's t with k - 1 degrees of freedom on the seeds' standard deviation / sqrt(k)
    (training randomness and test noise, estimated from k seeds: with 3 seeds the 95% quantile is 4.30,
    not the normal 1.96). Within seeds: each seed's own interval read as +-z standard errors, combined
    for the mean. With one seed, or seeds that agree closely, the within-seed term keeps it honest.
    """
    from scipy.stats import t as student_t

    k, z = len(scores), z_value(confidence)
    if k == 1 and intervals[0]:
        return intervals[0]  # one seed: its own interval, not a normal reading of it
    mean = sum(scores) / k
    within = math.sqrt(sum(((i[1] - i[0]) / (2 * z)) ** 2 for i in intervals if i)) / k
    between = float(np.std(scores, ddof=1)) / math.sqrt(k) if k > 1 else 0.0
    t = float(student_t.ppf(0.5 + confidence / 2, k - 1)) if k > 1 else z
    half = max(z * within, t * between)
    return [max(0.0, mean - half), min(1.0, mean + half)]
