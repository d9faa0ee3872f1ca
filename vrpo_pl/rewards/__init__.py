"""Rewards: verifiers, noise models and reward models, all behind the :class:`RewardFunction` protocol."""

from vrpo_pl.rewards.base import Completion, RewardFunction, RewardScores
from vrpo_pl.rewards.noise import (
    AsymmetricFlip,
    FlipRateCorrection,
    GaussianNoise,
    LengthBias,
    SymmetricFlip,
    observed_flip_rates,
)
from vrpo_pl.rewards.pseudo_labels import MajorityVote
from vrpo_pl.rewards.reward_model import RewardModel
from vrpo_pl.rewards.verifiers import NumericVerifier, ReasoningGymVerifier, extract_answer, parse_number

__all__ = [
    "AsymmetricFlip",
    "Completion",
    "FlipRateCorrection",
    "GaussianNoise",
    "LengthBias",
    "MajorityVote",
    "NumericVerifier",
    "ReasoningGymVerifier",
    "RewardFunction",
    "RewardModel",
    "RewardScores",
    "SymmetricFlip",
    "extract_answer",
    "observed_flip_rates",
    "parse_number",
]
