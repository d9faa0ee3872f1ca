"""Noise models: empirical rates on seeded draws, reproducibility, gold pass-through and the flip correction."""

from __future__ import annotations

import pytest
import torch

from vrpo_pl.rewards import (
    AsymmetricFlip,
    Completion,
    FlipRateCorrection,
    GaussianNoise,
    LengthBias,
    NumericVerifier,
    RewardFunction,
    RewardScores,
    SymmetricFlip,
    observed_flip_rates,
)
from vrpo_pl.rewards.noise import flip_corrected_reward

N = 20_000
TOL = 0.015  # ~3 standard errors of a rate estimated from 10k samples


class LabelReward(RewardFunction):
    """Test reward: returns ``metadata['label']`` as train and (unless ``with_gold`` is False) as gold."""

    def __init__(self, with_gold: bool = True):
        self.with_gold = with_gold

    def score(self, completions: list[Completion]) -> RewardScores:
        labels = torch.tensor([c.metadata["label"] for c in completions], dtype=torch.float32)
        return RewardScores(labels, labels.clone() if self.with_gold else None, {"base_metric": 1.0})


def labelled(labels: list[float]) -> list[Completion]:
    return [Completion(prompt="", response="", metadata={"label": x}) for x in labels]


@pytest.fixture(scope="module")
def half_half() -> tuple[list[Completion], torch.Tensor]:
    """N completions, the first half labelled 0 and the second 1."""
    labels = [0.0] * (N // 2) + [1.0] * (N // 2)
    return labelled(labels), torch.tensor(labels)


def test_observed_flip_rates_by_hand():
    rates = observed_flip_rates(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.7]), torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    assert rates == pytest.approx({"flip_rate": 0.4, "false_positive_rate": 0.5, "false_negative_rate": 1 / 3})
    assert observed_flip_rates(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == {
        "flip_rate": 0.0,
        "false_negative_rate": 0.0,
    }
    assert set(observed_flip_rates(torch.tensor([1.0]), torch.tensor([0.0]))) == {"flip_rate", "false_positive_rate"}


def test_symmetric_flip_rate(half_half):
    completions, gold = half_half
    scores = SymmetricFlip(LabelReward(), p=0.2, seed=1).score(completions)
    flips = (scores.train != gold).float()
    assert abs(flips.mean().item() - 0.2) < TOL
    assert abs(flips[gold == 0].mean().item() - 0.2) < TOL and abs(flips[gold == 1].mean().item() - 0.2) < TOL
    assert set(scores.train.unique().tolist()) == {0.0, 1.0}
    assert scores.metrics["flip_rate"] == pytest.approx(flips.mean().item())
    assert scores.metrics["base_metric"] == 1.0  # the base's metrics are merged in
    assert torch.equal(scores.gold, gold)


def test_asymmetric_flip_rates(half_half):
    completions, gold = half_half
    scores = AsymmetricFlip(LabelReward(), false_positive_rate=0.3, false_negative_rate=0.1, seed=2).score(completions)
    assert abs(scores.train[gold == 0].mean().item() - 0.3) < TOL  # P(noisy=1 | true=0)
    assert abs(1 - scores.train[gold == 1].mean().item() - 0.1) < TOL  # P(noisy=0 | true=1)
    assert scores.metrics["false_positive_rate"] == pytest.approx(scores.train[gold == 0].mean().item())
    assert scores.metrics["false_negative_rate"] == pytest.approx(1 - scores.train[gold == 1].mean().item())
    assert torch.equal(scores.gold, gold)


def test_gaussian_noise_moments(half_half):
    completions, gold = half_half
    scores = GaussianNoise(LabelReward(), sigma=0.5, seed=3).score(completions)
    noise = scores.train - gold
    assert abs(noise.mean().item()) < TOL and abs(noise.std().item() - 0.5) < TOL
    assert abs(scores.metrics["flip_rate"] - 0.1587) < TOL  # P(N(0, 0.25) crosses 0.5) = Phi(-1)
    assert torch.equal(scores.gold, gold)
    assert torch.equal(GaussianNoise(LabelReward(), sigma=0.0).score(completions).train, gold)


def test_length_bias_tokens_and_chars():
    completions = [
        Completion(prompt="q", response="abc", num_tokens=2, metadata={"label": 1.0}),
        Completion(prompt="q", response="", num_tokens=0, metadata={"label": 0.0}),
        Completion(prompt="q", response="abcdefgh", num_tokens=5, metadata={"label": 0.0}),
    ]
    tokens = LengthBias(LabelReward(), coef=0.1).score(completions)
    assert torch.allclose(tokens.train, torch.tensor([1.2, 0.0, 0.5]))
    chars = LengthBias(LabelReward(), coef=-0.01, unit="chars").score(completions)
    assert torch.allclose(chars.train, torch.tensor([0.97, 0.0, -0.08]))
    assert torch.allclose(tokens.gold, torch.tensor([1.0, 0.0, 0.0]))
    assert tokens.metrics["flip_rate"] == pytest.approx(1 / 3)  # 0.5 reads as a positive verdict
    missing = [Completion(prompt="q", response="text", num_tokens=0, metadata={"label": 1.0})]
    with pytest.raises(ValueError, match="num_tokens=0"):
        LengthBias(LabelReward(), coef=0.1).score(missing)


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: SymmetricFlip(LabelReward(), p=0.3, seed=seed),
        lambda seed: AsymmetricFlip(LabelReward(), false_positive_rate=0.2, false_negative_rate=0.4, seed=seed),
        lambda seed: GaussianNoise(LabelReward(), sigma=1.0, seed=seed),
    ],
    ids=["symmetric", "asymmetric", "gaussian"],
)
def test_seeded_determinism_and_resume(make):
    completions = labelled([0.0, 1.0] * 64)
    assert torch.equal(make(5).score(completions).train, make(5).score(completions).train)
    assert not torch.equal(make(5).score(completions).train, make(6).score(completions).train)

    noise = make(5)
    noise.score(completions)
    state = noise.state_dict()
    expected = [noise.score(completions).train for _ in range(2)]
    resumed = make(99)  # a fresh run, other seed: the loaded state decides the draws
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.score(completions).train, e) for e in expected)


def test_gold_score_draws_nothing(half_half):
    completions, gold = half_half
    untouched, probed = SymmetricFlip(LabelReward(), p=0.5, seed=7), SymmetricFlip(LabelReward(), p=0.5, seed=7)
    assert torch.equal(probed.gold_score(completions), gold)
    assert torch.equal(probed.score(completions).train, untouched.score(completions).train)
    assert SymmetricFlip(LabelReward(with_gold=False), p=0.1).gold_score(completions) is None


def test_no_flip_metrics_without_binary_gold():
    scores = SymmetricFlip(LabelReward(with_gold=False), p=0.1).score(labelled([0.0, 1.0]))
    assert scores.gold is None and "flip_rate" not in scores.metrics
    scores = GaussianNoise(LabelReward(), sigma=0.1).score(labelled([0.2, 0.9]))
    assert "flip_rate" not in scores.metrics


def test_flip_corrected_reward_by_hand():
    corrected = flip_corrected_reward(torch.tensor([0.0, 1.0]), 0.1, 0.3)
    assert torch.allclose(corrected, torch.tensor([-0.1 / 0.6, 0.9 / 0.6]))
    assert torch.allclose(flip_corrected_reward(torch.tensor([0.0, 1.0]), 0.0, 0.0), torch.tensor([0.0, 1.0]))


def test_flip_rate_correction_is_unbiased(half_half):
    completions, gold = half_half
    noisy = AsymmetricFlip(LabelReward(), false_positive_rate=0.2, false_negative_rate=0.1, seed=4)
    corrected = FlipRateCorrection(noisy, false_positive_rate=0.2, false_negative_rate=0.1).score(completions)
    # Corrected values are 1.143 or -0.286: std ~0.57 per class, so the conditional means have SE ~0.006.
    for label in (0.0, 1.0):
        assert abs(corrected.train[gold == label].mean().item() - label) < 0.03
    assert torch.equal(corrected.gold, gold)
    # Without the correction the conditional means are off by rho+ and rho-.
    raw = AsymmetricFlip(LabelReward(), false_positive_rate=0.2, false_negative_rate=0.1, seed=4).score(completions)
    assert abs(raw.train[gold == 0].mean().item() - 0.2) < TOL
    assert abs(raw.train[gold == 1].mean().item() - 0.9) < TOL


def test_composition_with_a_verifier():
    texts = ["The answer is 7.", "It is 8", "I don't know", "7"]
    completions = [Completion(prompt="3 + 4 =", response=t, answer="7") for t in texts]
    reward = LengthBias(SymmetricFlip(NumericVerifier(), p=0.5, seed=0), coef=0.01, unit="chars")
    scores = reward.score(completions)
    gold = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.equal(scores.gold, gold)
    flipped = SymmetricFlip(NumericVerifier(), p=0.5, seed=0).score(completions).train
    assert torch.allclose(scores.train, flipped + 0.01 * torch.tensor([float(len(t)) for t in texts]))
    assert set(scores.metrics) >= {"answer_found_rate", "flip_rate"}
    # The nested generator's state travels with the outer model's state.
    state = reward.state_dict()
    assert "generator" in state["base"]
    first = reward.score(completions).train
    reward.load_state_dict(state)
    assert torch.equal(reward.score(completions).train, first)
    assert torch.equal(reward.gold_score(completions), gold)
    assert reward.to(torch.device("cpu")) is reward


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SymmetricFlip(LabelReward(), p=1.3), r"SymmetricFlip: p=1.3 must be in \[0, 1\]"),
        (lambda: AsymmetricFlip(LabelReward(), -0.1, 0.2), "AsymmetricFlip: false_positive_rate=-0.1"),
        (lambda: AsymmetricFlip(LabelReward(), 0.1, 2.0), "AsymmetricFlip: false_negative_rate=2.0"),
        (lambda: GaussianNoise(LabelReward(), sigma=-1.0), "GaussianNoise: sigma=-1.0"),
        (lambda: LengthBias(LabelReward(), coef=float("nan")), "LengthBias: coef=nan"),
        (lambda: LengthBias(LabelReward(), coef=0.1, unit="words"), "LengthBias: unit='words'"),
        (lambda: FlipRateCorrection(LabelReward(), 0.6, 0.4), "false_positive_rate \\+ false_negative_rate"),
        (lambda: FlipRateCorrection(LabelReward(), 0.7, 0.5), "no correction can make learning possible"),
    ],
)
def test_bad_arguments_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_base_must_be_a_reward_instance():
    with pytest.raises(TypeError, match="SymmetricFlip: base must be a RewardFunction instance"):
        SymmetricFlip(NumericVerifier, p=0.1)


def test_flip_needs_binary_base():
    with pytest.raises(ValueError, match="SymmetricFlip: the base reward must be binary .* but 0.5 was seen"):
        SymmetricFlip(LabelReward(), p=0.1).score(labelled([1.0, 0.5]))
    with pytest.raises(ValueError, match="FlipRateCorrection: the base reward must be binary"):
        FlipRateCorrection(GaussianNoise(LabelReward(), sigma=1.0), 0.1, 0.1).score(labelled([1.0, 0.0]))


def test_built_from_yaml_with_jsonargparse():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--reward", type=RewardFunction)
    config = parser.parse_string(
        """
        reward:
          class_path: vrpo_pl.rewards.FlipRateCorrection
          init_args:
            false_positive_rate: 0.1
            false_negative_rate: 0.2
            base:
              class_path: vrpo_pl.rewards.AsymmetricFlip
              init_args: {false_positive_rate: 0.1, false_negative_rate: 0.2, seed: 3,
                          base: {class_path: vrpo_pl.rewards.NumericVerifier, init_args: {tolerance: 0.01}}}
        """
    )
    reward = parser.instantiate(config).reward
    assert isinstance(reward, FlipRateCorrection) and isinstance(reward.base, AsymmetricFlip)
    assert reward.base.base.tolerance == 0.01
    help_text = parser.parse_args.__self__.format_help()  # the Args sections become --help text
    assert "--reward" in help_text
