"""Majority-vote pseudo-labels (TTRL) on hand-made groups, and the random-reward control's rates."""

from __future__ import annotations

import pytest
import torch

from vrpo_pl.rewards import MajorityVote, SymmetricFlip
from vrpo_pl.rewards.base import Completion
from vrpo_pl.rewards.pseudo_labels import majority_labels


def _group(prompt: str, answer: str, responses: list[str]) -> list[Completion]:
    return [Completion(prompt=prompt, response=r, answer=answer) for r in responses]


def test_pseudo_label_is_the_majority_and_rewards_agreement():
    # Prompt 1: the majority (7) is right. Prompt 2: the majority (5) is wrong, the one right answer (4) loses.
    batch = (_group("3 + 4 =", "7", ["It is 7.", "7", "The answer is 8", "7.0"])
             + _group("2 + 2 =", "4", ["5", "2 + 2 = 5", "4", "no idea"]))
    scores = MajorityVote().score(batch)
    assert scores.train.tolist() == [1, 1, 0, 1, 1, 1, 0, 0]
    assert scores.gold.tolist() == [1, 1, 0, 1, 0, 0, 1, 0]
    assert scores.metrics["pseudo_label_accuracy"] == 0.5
    assert scores.metrics["pseudo_label_found_rate"] == 1.0
    assert scores.metrics["false_positive_rate"] == pytest.approx(2 / 4)  # the two wrong 5s rewarded
    assert scores.metrics["false_negative_rate"] == pytest.approx(1 / 4)  # the right 4 not rewarded


def test_pseudo_label_ties_go_to_the_answer_seen_first_and_no_answer_earns_nothing():
    assert majority_labels(["3", "4", "4", "3"], [0, 0, 0, 0]) == {0: "3"}
    scores = MajorityVote().score(_group("1 + 1 =", "2", ["I cannot say", "none"]))
    assert scores.train.tolist() == [0, 0] and scores.metrics["pseudo_label_found_rate"] == 0.0


def test_validation_uses_the_gold_verifier():
    batch = _group("3 + 4 =", "7", ["8", "8", "7"])
    assert MajorityVote().gold_score(batch).tolist() == [0, 0, 1]


def test_majority_vote_needs_several_samples_per_prompt(run_cli, tmp_path):
    reward = '{"class_path": "vrpo_pl.rewards.MajorityVote"}'
    with pytest.raises(ValueError, match="MajorityVote votes among the responses to each prompt: "
                                         "--data.samples_per_prompt=1 must be >= 2"):
        run_cli(tmp_path, "--model.reward", reward, "--data.samples_per_prompt", "1", "--model.ppo.mini_batch_size",
                "2", max_steps=1)


def test_majority_vote_trains_and_logs_pseudo_label_accuracy(run_cli, read_events, tmp_path):
    run_cli(tmp_path, "--model.reward", '{"class_path": "vrpo_pl.rewards.MajorityVote"}', max_steps=1)
    tags = read_events(tmp_path).Tags()["scalars"]
    assert {"reward/pseudo_label_accuracy", "reward/train", "reward/gold"} <= set(tags)


def test_random_reward_control_flips_half_and_has_no_information():
    """SymmetricFlip(p=0.5): the training reward is independent of the gold one (Youden's J = 0)."""
    from vrpo_pl.rewards import NumericVerifier

    gold = torch.tensor([1.0, 0.0] * 2000)
    batch = [Completion(prompt="q", response=str(int(g)), answer="1") for g in gold]
    scores = SymmetricFlip(base=NumericVerifier(), p=0.5, seed=0).score(batch)
    tpr = float(scores.train[gold == 1].mean())
    fpr = float(scores.train[gold == 0].mean())
    assert abs(tpr - 0.5) < 0.03 and abs(fpr - 0.5) < 0.03 and abs(tpr - fpr) < 0.04
