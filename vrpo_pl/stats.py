"""Statistics for comparing runs: accuracy over seeds and questions, with bootstrap intervals.

A study runs every algorithm on the same seeds (same prompts, same noise draws) and validates on the same held-out
questions, so results are arrays ``(seeds, questions)`` of 0/1 gold outcomes, one per algorithm. The intervals
resample both levels (seeds with replacement, then questions with replacement, the same questions for every seed
of one draw): the run-to-run spread and the finite question set both count. Paired differences are taken per seed
and question before resampling, which removes the variation the algorithms share (question difficulty, the seed's
prompts and noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Estimate:
    """A mean with its bootstrap interval."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def bootstrap_mean(outcomes: Tensor, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of a (seeds, questions) array and its percentile bootstrap interval over seeds and questions.

    Args:
        outcomes: (S, Q) per-seed, per-question values (0/1 correctness, or a difference of two).
        resamples: bootstrap draws.
        level: the interval's coverage.
        seed: the resampling generator's seed (the interval is reproducible).

    Returns:
        The mean over everything and the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled means.

    >>> bootstrap_mean(torch.ones(3, 10)).mean
    1.0
    """
    outcomes = outcomes.double()
    seeds, questions = outcomes.shape
    generator = torch.Generator().manual_seed(seed)
    s = torch.randint(0, seeds, (resamples, seeds), generator=generator)
    q = torch.randint(0, questions, (resamples, questions), generator=generator)
    # outcomes[s][:, :, q]: for draw b, the sampled seeds' rows at the sampled questions.
    means = outcomes[s[:, :, None], q[:, None, :]].mean(dim=(1, 2))
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype)).tolist()
    return Estimate(float(outcomes.mean()), low, high)


def paired_difference(a: Tensor, b: Tensor, **kwargs) -> Estimate:
    """``a - b`` per seed and question, then :func:`bootstrap_mean` (both (S, Q), same seeds and questions)."""
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have the same (seeds, questions) shape: {tuple(a.shape)} vs "
                         f"{tuple(b.shape)}")
    return bootstrap_mean(a.double() - b.double(), **kwargs)
