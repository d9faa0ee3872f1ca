"""Phase 2 of a rollout batch: the reward function's verdicts, checked on every rank, then shaped for training.

:func:`score_batch` decodes the responses, calls the reward (training reward and, beside it, the gold one) and
applies ``--model.rewards.on_nonfinite``: a non-finite training reward on any rank skips the batch on every rank
(or stops the run), because a rank that skipped while another updated would hang the update's collectives.
:func:`count_skipped` keeps the streak of skipped batches and stops a run whose reward never recovers.
:func:`training_scores` normalizes (running statistics over every rollout batch) and clips what the advantages
see. The running statistics and the streak are the caller's state (they are checkpointed with it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from vrpo_pl import distributed
from vrpo_pl.advantages import RunningMoments, transform_scores
from vrpo_pl.rewards.base import RewardError, RewardFunction, call_reward, nonfinite_message
from vrpo_pl.rollout import Rollout, decode_completions
from vrpo_pl.settings import RewardSettings


@dataclass
class ScoredBatch:
    """A rollout batch's responses and the reward's verdicts on them."""

    texts: list[str]
    """The decoded responses."""
    train: Tensor | None
    """The training reward (B,), on the device :func:`score_batch` was given; None when a non-finite reward
    skipped the batch."""
    gold: Tensor | None = None
    """The gold reward (B,) beside it, None without a gold signal."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The reward's own metrics, as ``reward/<name>``."""


def score_batch(reward: RewardFunction, tokenizer: Any, batch: dict[str, Any], rollout: Rollout, *, where: str,
                on_nonfinite: Literal["skip", "error"], device: torch.device,
                warn: Callable[[str], None]) -> ScoredBatch:
    """The reward's verdicts on ``rollout``'s responses to ``batch``'s prompts.

    Args:
        reward: the training reward (``--model.reward``); its gold signal is read beside it.
        tokenizer: decodes the responses.
        batch: the data module's batch (prompts, answers, groups) that ``rollout`` answered.
        rollout: the sampled responses.
        where: names the batch in messages (e.g. "rollout batch 7").
        on_nonfinite: ``--model.rewards.on_nonfinite``: ``error`` raises, ``skip`` warns and returns a batch
            without training reward.
        device: where the scores go (the rollout's device); also where the ranks agree on skipping.
        warn: prints a warning (rank zero's ``print``).

    Returns:
        The decoded texts and the reward's scores; ``train`` is None when the batch is
        skipped (a non-finite reward on this or another rank).

    Raises:
        RewardError: a non-finite training reward (on any rank) with ``on_nonfinite="error"``.
    """
    texts, completions = decode_completions(tokenizer, batch, rollout)
    result = call_reward(reward, completions, where)
    bad = nonfinite_message(reward, result.train, completions, where)
    any_bad = distributed.all_reduce_max(torch.tensor(float(bad is not None), device=device)).item() > 0
    if any_bad and bad is None:
        bad = f"the reward {type(reward).__name__} was not finite on another rank at {where}"
    if bad is not None:
        if on_nonfinite == "error":
            raise RewardError(bad + "; stopping (--model.rewards.on_nonfinite error)")
        warn(f"warning: {bad}; skipping this rollout batch (--model.rewards.on_nonfinite skip)")
        return ScoredBatch(texts, None)
    gold = None if result.gold is None else result.gold.to(device)
    return ScoredBatch(texts, result.train.to(device), gold,
                       {f"reward/{k}": float(v) for k, v in result.metrics.items()})


def count_skipped(in_row: dict[str, int], skipped: bool, reward: RewardFunction, limit: int, rollout: int) -> None:
    """Counts rollout batches skipped in a row for a non-finite reward (``in_row["reward"]``; a scored batch resets
    it) and stops the run at ``limit`` (``--model.ppo.max_nonfinite_updates``) with a :class:`RewardError`."""
    in_row["reward"] = in_row.get("reward", 0) + 1 if skipped else 0
    if in_row["reward"] >= limit:
        raise RewardError(
            f"{in_row['reward']} rollout batches in a row had a non-finite reward from {type(reward).__name__} (the "
            f"last: rollout batch {rollout}), so nothing trained; stopping. Check the reward function, or raise "
            "--model.ppo.max_nonfinite_updates. Checkpoints already written are intact."
        )


def training_scores(train: Tensor, moments: RunningMoments, settings: RewardSettings) -> Tensor:
    """What the advantages see: ``train`` standardized by the running statistics of every rank's rewards so far
    (``--model.rewards.normalize``; ``moments`` is updated in place), then clipped (``--model.rewards.clip``)."""
    if settings.normalize:
        moments.update(distributed.all_gather_flat(train))
    return transform_scores(train, moments if settings.normalize else None, settings.clip)
