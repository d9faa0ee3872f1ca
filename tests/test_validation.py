"""The validation's read-back (vrpo_pl.validation) on a hand-built greedy rollout."""

from __future__ import annotations

import pytest
import torch
from torchmetrics import MeanMetric

from vrpo_pl import validation
from vrpo_pl.rollout import Rollout


class DigitTokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(str(i) for i in ids)


def _rollout(values: bool) -> Rollout:
    """Two responses of 2 and 3 tokens (A = 3); the policy equals the reference, so the KL penalty is 0."""
    responses = torch.tensor([[4, 5, 0], [6, 7, 8]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    sequences = torch.cat([torch.ones(2, 1, dtype=torch.long), responses], dim=1)
    attention = torch.cat([torch.ones(2, 1), mask], dim=1).long()
    logp = torch.full((2, 3), -0.5) * mask
    guide = torch.stack([torch.arange(6.0).view(2, 3), -torch.arange(6.0).view(2, 3)], dim=-1)
    return Rollout(sequences, attention, attention.cumsum(1) - 1, responses, mask, torch.tensor([False, False]),
                   prompt_width=1, logp=logp, ref_logp=logp.clone(), guide_raw=guide,
                   values=torch.zeros(2, 3) if values else None)


def test_token_view_trims_each_response_and_takes_gae_against_the_gold_reward():
    views = validation.token_view(_rollout(values=True), torch.tensor([1.0, 0.0]), ["p0", "p1"], DigitTokenizer(),
                                  kl_estimator="k1", kl_coef=0.1, gamma=1.0, lam=1.0)
    assert [v["tokens"] for v in views] == [["4", "5"], ["6", "7", "8"]]
    # Values 0, gamma = lam = 1, no KL: every token's advantage is the response's reward-to-go, its gold reward.
    assert views[0]["advantage"] == pytest.approx([1.0, 1.0]) and views[1]["advantage"] == pytest.approx([0.0] * 3)
    assert views[0]["value"] == [0.0, 0.0] and views[1]["entropy"] == [3.0, 4.0, 5.0]
    assert views[0]["surprisal"] == [-0.0, -1.0] and [v["prompt"] for v in views] == ["p0", "p1"]


def test_token_view_without_critic_or_verifier():
    (view, _) = validation.token_view(_rollout(values=False), None, ["p0", "p1"], DigitTokenizer(),
                                      kl_estimator="k3", kl_coef=0.1, gamma=1.0, lam=0.95)
    assert view["advantage"] is None and view["value"] is None and view["gold"] == 0.0


def test_outcome_records_and_reduced_metrics():
    r = _rollout(values=False)
    records = validation.outcome_records({"id": ["a", "b"]}, r, torch.tensor([1.0, 0.0]), ["x", "yz"])
    assert records == [{"id": "a", "gold": 1.0, "length": 2, "response": "x"},
                       {"id": "b", "gold": 0.0, "length": 3, "response": "yz"}]
    accuracy, length = MeanMetric(), MeanMetric()
    length.update(r.mask.sum(1))
    assert validation.reduce_metrics(accuracy, length) == {"val/response_length": 2.5}  # no verifier: no accuracy
    accuracy.update(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    length.update(torch.tensor([4.0]))
    assert validation.reduce_metrics(accuracy, length) == {"val/response_length": 4.0, "val/accuracy": 0.5}
    assert not accuracy.update_count and not length.update_count  # reset for the next validation

