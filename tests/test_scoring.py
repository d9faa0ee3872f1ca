"""Phase 2's pure pieces: the streak of batches skipped for a non-finite reward, and the scores the advantages see."""

from __future__ import annotations

import pytest
import torch

from vrpo_pl.advantages import RunningMoments
from vrpo_pl.rewards import NumericVerifier
from vrpo_pl.rewards.base import RewardError
from vrpo_pl.scoring import count_skipped, training_scores
from vrpo_pl.settings import RewardSettings


def test_a_scored_batch_resets_the_streak_and_the_limit_stops_the_run():
    in_row = {"policy": 0, "critic": 0}
    count_skipped(in_row, True, NumericVerifier(), limit=3, rollout=0)
    count_skipped(in_row, True, NumericVerifier(), limit=3, rollout=1)
    assert in_row == {"policy": 0, "critic": 0, "reward": 2}
    count_skipped(in_row, False, NumericVerifier(), limit=3, rollout=2)
    assert in_row["reward"] == 0, "a batch with finite rewards ends the streak"
    for rollout in (3, 4):
        count_skipped(in_row, True, NumericVerifier(), limit=3, rollout=rollout)
    with pytest.raises(RewardError, match=r"3 rollout batches in a row .*NumericVerifier.*rollout batch 5"):
        count_skipped(in_row, True, NumericVerifier(), limit=3, rollout=5)


def test_training_scores_standardize_by_every_batch_so_far_then_clip():
    moments = RunningMoments()
    first = training_scores(torch.tensor([0.0, 1.0, 0.0, 1.0]), moments, RewardSettings(normalize=True, clip=None))
    assert torch.allclose(first.mean(), torch.tensor(0.0), atol=1e-6) and moments.count == 4
    # The second batch is standardized by the statistics of all 8 rewards, not its own.
    second = training_scores(torch.tensor([1.0, 1.0, 1.0, 1.0]), moments, RewardSettings(normalize=True, clip=0.5))
    assert moments.count == 8 and torch.equal(second, torch.full((4,), 0.5)), second
    raw = torch.tensor([3.0, -3.0])
    plain = RunningMoments()
    assert torch.equal(training_scores(raw, plain, RewardSettings(normalize=False, clip=None)), raw)
    assert plain.count == 0, "without --model.rewards.normalize the statistics are not touched"
