"""A reward that returns NaN or raises never trains the policy: the batch is skipped (counted) or the run stops
with a message naming the sample."""

from __future__ import annotations

import pytest
import torch

from vrpo_pl.rewards import NumericVerifier, RewardFunction, RewardScores


class NaNOnFirstSample(RewardFunction):
    """The verifier's scores with NaN for the first sample of every batch."""

    def score(self, completions):
        scores = NumericVerifier().score(completions)
        train = scores.train.clone()
        train[0] = float("nan")
        return RewardScores(train=train, gold=scores.gold)


class Raising(RewardFunction):
    """A reward whose scorer crashes."""

    def score(self, completions):
        raise KeyError("scorer lost its table")


def _with_reward(cli, reward: RewardFunction):
    cli.model.reward = reward
    return cli


def test_nan_reward_skips_the_batch_and_leaves_the_policy_untouched(run_cli, read_events, tmp_path):
    cli = _with_reward(run_cli(tmp_path, run=False, max_steps=2), NaNOnFirstSample())
    cli.model.configure_model()
    before = {n: p.detach().clone() for n, p in cli.model.policy.named_parameters()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2, "skipped batches still count as rollout batches"
    assert all(torch.equal(p, before[n]) for n, p in cli.model.policy.named_parameters())
    assert "reward/train" not in read_events(tmp_path).Tags()["scalars"], "nothing was trained or logged as trained"


def test_nan_reward_with_on_nonfinite_error_names_the_sample(run_cli, tmp_path):
    cli = _with_reward(run_cli(tmp_path, "--model.rewards.on_nonfinite", "error", run=False, max_steps=1),
                       NaNOnFirstSample())
    with pytest.raises(RuntimeError, match=r"returned nan for sample 0 .*--model.rewards.on_nonfinite error"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_raising_reward_stops_with_the_reward_named(run_cli, tmp_path):
    cli = _with_reward(run_cli(tmp_path, "--model.validate_at_start", "false", "--model.algorithm", "ppo",
                               "--trainer.callbacks", "[]",
                               run=False, max_steps=1), Raising())
    with pytest.raises(RuntimeError, match=r"the reward Raising raised on rollout batch 0 .*scorer lost its table"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_raising_reward_during_validation_is_named_too(run_cli, tmp_path):
    cli = _with_reward(run_cli(tmp_path, run=False, max_steps=1), Raising())
    with pytest.raises(RuntimeError, match=r"the reward Raising raised on .*validation.*KeyError"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


class OneScoreShort(RewardFunction):
    """A reward that drops the last completion's score."""

    def score(self, completions):
        return RewardScores(train=torch.zeros(len(completions) - 1))


def test_call_reward_refuses_the_wrong_number_of_scores():
    from vrpo_pl.rewards.base import Completion, RewardError, call_reward

    batch = [Completion(prompt="1+1=", response="2", answer="2"), Completion(prompt="2+2=", response="5", answer="4")]
    with pytest.raises(RewardError, match=r"OneScoreShort returned train scores of shape \(1,\) for 2 completions"):
        call_reward(OneScoreShort(), batch, "rollout batch 0")
    with pytest.raises(RewardError, match="the reward Raising raised on rollout batch 0 .*KeyError"):
        call_reward(Raising(), batch, "rollout batch 0")
    result = call_reward(NumericVerifier(), batch, "rollout batch 0")
    assert result.train.tolist() == [1.0, 0.0] and result.train.dtype == torch.float32
    assert call_reward(NumericVerifier(), batch, "validation", gold_only=True).tolist() == [1.0, 0.0]
