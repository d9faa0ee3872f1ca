"""Bootstrap intervals over seeds and questions, and paired differences."""

from __future__ import annotations

import pytest
import torch

from vrpo_pl.stats import bootstrap_mean, paired_difference


def test_interval_covers_the_mean_and_shrinks_with_more_questions():
    generator = torch.Generator().manual_seed(0)
    few = (torch.rand(3, 64, generator=generator) < 0.6).float()
    many = (torch.rand(3, 1024, generator=generator) < 0.6).float()
    small, large = bootstrap_mean(few), bootstrap_mean(many)
    assert small.low <= small.mean <= small.high and large.low <= large.mean <= large.high
    assert (large.high - large.low) < (small.high - small.low) / 2
    # A binomial mean over 3 x 1024 draws: the 95% interval is about +-1.96 * sqrt(0.24 / 3072) = +-0.017.
    assert 0.02 < large.high - large.low < 0.05


def test_interval_counts_the_spread_between_seeds():
    """Two seeds that disagree by 0.4: the interval is far wider than the questions alone would make it."""
    outcomes = torch.cat([torch.ones(1, 500), (torch.arange(500) % 5 < 3).float()[None]])  # 1.0 and 0.6
    estimate = bootstrap_mean(outcomes)
    assert estimate.mean == pytest.approx(0.8)
    assert estimate.low < 0.65 and estimate.high > 0.95


def test_paired_difference_removes_shared_question_difficulty():
    generator = torch.Generator().manual_seed(1)
    easy = torch.rand(1, 256, generator=generator) < 0.5  # half the questions are easy for both algorithms
    a = (easy | (torch.rand(3, 256, generator=generator) < 0.10)).float()
    b = (easy | (torch.rand(3, 256, generator=generator) < 0.02)).float()
    difference = paired_difference(a, b)
    assert difference.low > 0, str(difference)  # a is better, and the pairing shows it
    with pytest.raises(ValueError, match="same \\(seeds, questions\\) shape"):
        paired_difference(a, b[:, :10])


def test_intervals_are_reproducible():
    outcomes = (torch.rand(3, 50, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    assert str(bootstrap_mean(outcomes)) == str(bootstrap_mean(outcomes))
