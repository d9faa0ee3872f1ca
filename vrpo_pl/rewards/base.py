"""The reward-function protocol: what a reward sees and what it returns.

A reward is any subclass of :class:`RewardFunction`, plugged in from YAML with ``class_path`` (no registry).
It scores a batch of :class:`Completion` and returns :class:`RewardScores` with two signals:

- ``train``: what the policy is trained on (possibly corrupted by a noise model);
- ``gold``: the uncorrupted verifier verdict when one exists, logged beside ``train`` and never trained on.

Noise models wrap another reward (``SymmetricFlip(base=NumericVerifier())``) and pass the base's gold through.
Rewards that draw random numbers own a seeded ``torch.Generator`` and expose it through
``state_dict``/``load_state_dict`` so that a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Completion:
    """One sampled response with everything a reward may look at."""

    prompt: str
    """The task's prompt text, before any chat template."""
    response: str
    """The decoded response (special tokens removed)."""
    answer: str | None = None
    """The reference answer from the data set, if any."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The data set's metadata for this prompt (for reasoning-gym: its entry, used by its scorer)."""
    num_tokens: int = 0
    """Length of the response in tokens (EOS included when it was generated)."""
    truncated: bool = False
    """True when generation stopped at max_new_tokens before an EOS."""


@dataclass
class RewardScores:
    """What a reward returns for a batch of B completions."""

    train: Tensor
    """(B,) float32: the reward the policy is trained on."""
    gold: Tensor | None = None
    """(B,) float32: the uncorrupted verifier reward, or None when no verifier exists."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Extra scalars logged as ``reward/<key>`` (observed flip rates, reward-model accuracy, ...)."""


class RewardFunction(ABC):
    """Base class of every reward: verifiers, reward models and noise wrappers."""

    @abstractmethod
    def score(self, completions: list[Completion]) -> RewardScores:
        """Scores a batch for training. May draw random numbers (noise models)."""

    def gold_score(self, completions: list[Completion]) -> Tensor | None:
        """The uncorrupted reward, used for validation. Must not draw random numbers.

        The default scores with :meth:`score` and returns its gold; deterministic rewards need nothing more,
        rewards that draw random numbers override this to leave their generator untouched.
        """
        return self.score(completions).gold

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints (random generators); empty for deterministic rewards."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (deterministic rewards have no state)
        """Restores :meth:`state_dict`'s output."""

    def to(self, device: torch.device) -> RewardFunction:
        """Moves any model the reward holds to ``device``; rewards without models ignore it."""
        return self


class RewardError(RuntimeError):
    """A reward function raised, or returned what training cannot use; the message names the reward and where."""


def call_reward(reward: RewardFunction, completions: list[Completion], where: str, gold_only: bool = False):
    """Scores ``completions`` with ``reward`` and checks the result's shape.

    Args:
        reward: the reward function.
        completions: the batch.
        where: where this happens, for messages (``rollout batch 3``).
        gold_only: call :meth:`RewardFunction.gold_score` (validation) instead of :meth:`RewardFunction.score`.

    Returns:
        :class:`RewardScores` (train and gold as float32), or with ``gold_only`` the gold tensor or None.

    Raises:
        RewardError: the reward raised (its exception chained), returned a number of scores other than the
            number of completions, or a gold score that is not finite (a non-finite training score is the caller's
            to handle: ``--model.rewards.on_nonfinite``).
    """
    name, first = type(reward).__name__, completions[0].prompt[:80] if completions else ""
    try:
        result = reward.gold_score(completions) if gold_only else reward.score(completions)
    except Exception as error:
        raise RewardError(f"the reward {name} raised on {where} (first prompt: {first!r}): {type(error).__name__}: "
                          f"{error}; fix {name} (VRPO_DEBUG=1 shows where it raised)") from error
    tensors = {"gold": result} if gold_only else {"train": result.train, "gold": result.gold}
    for field_name, scores in tensors.items():
        if scores is not None and tuple(scores.shape) != (len(completions),):
            raise RewardError(
                f"the reward {name} returned {field_name} scores of shape {tuple(scores.shape)} for {len(completions)} "
                f"completions on {where}; a reward must return one score per completion, shape ({len(completions)},)"
            )
    gold = result if gold_only else result.gold
    bad_gold = None if gold is None else nonfinite_message(reward, gold.float(), completions, where)
    if bad_gold is not None:
        raise RewardError(f"the gold score is not finite: {bad_gold}; validation accuracy and reward/gold need a "
                          f"finite gold (a verifier's 0 or 1): fix {name}'s gold, or make it None where it has none")
    if gold_only:
        return None if result is None else result.float()
    return RewardScores(result.train.float(), None if result.gold is None else result.gold.float(), result.metrics)


def nonfinite_message(reward: RewardFunction, train: Tensor, completions: list[Completion], where: str) -> str | None:
    """None when every training score is finite, else a message naming the first bad sample."""
    bad = (~torch.isfinite(train)).nonzero().flatten().tolist()
    if not bad:
        return None
    i = bad[0]
    return (f"the reward {type(reward).__name__} returned {train[i].item()} for sample {i} of {where} (prompt "
            f"{completions[i].prompt[:60]!r}, response {completions[i].response[:60]!r}); {len(bad)} non-finite in "
            "the batch")


def answer_reader(reward: object) -> RewardFunction | None:
    """The reward, ``reward`` itself or one it wraps (``base``) or scores its gold with (``gold``), that reads
    ``Completion.answer`` for every completion (a ``needs_answers`` attribute, as NumericVerifier's); None if none."""
    if not isinstance(reward, RewardFunction):
        return None
    if getattr(reward, "needs_answers", False):
        return reward
    inner = (answer_reader(getattr(reward, name, None)) for name in ("base", "gold"))
    return next((r for r in inner if r is not None), None)


def needs_groups(reward: object) -> bool:
    """Whether ``reward`` (or a reward it wraps, through ``base``) compares the G responses to one prompt."""
    while reward is not None:
        if getattr(reward, "needs_groups", False):
            return True
        reward = getattr(reward, "base", None)
    return False
