"""Advantage estimation and normalization: pure functions of tensors (torch only, no Lightning).

:func:`compute_advantages` is the one entry point from rewards to advantages for every algorithm (PPO/VRPO: KL in
the reward, GAE, whitening; GRPO: group normalization); the training step and the key-token view both call it.

Shapes use the project's letters: B rollout batch (sequences), A response tokens. ``mask`` is (B, A) with 1 on
response tokens and 0 on padding after the end of a response.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

AdvantageEstimator = Literal["gae", "group"]


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is 1."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 where the mask is empty).

    >>> masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0]))
    tensor(2.)
    """
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over masked positions (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Standardizes ``x`` to unit variance over masked positions; padding is returned as 0.

    Args:
        x: (B, A) values to whiten.
        mask: (B, A) 1 on response tokens.
        shift_mean: subtract the mean (True) or only divide by the standard deviation (False).
        eps: added to the variance.
        reduce: sums a (3,) tensor of moments over data-parallel ranks (e.g.
            :func:`vrpo_pl.distributed.all_reduce_sum`), so that the mean and variance are the global batch's;
            None: this batch's.

    Returns:
        (B, A) whitened values.
    """
    if reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        moments = reduce(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
        n = moments[2].clamp(min=2)
        mean = moments[0] / n
        var = (moments[1] / n - mean**2).clamp(min=0) * n / (n - 1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero after the
    last response token, so each response bootstraps from nothing past its end (terminal reward lives in r).

    Args:
        rewards: (B, A) per-token rewards (KL penalty and the terminal score).
        values: (B, A) value estimates V(s_t).
        mask: (B, A) 1 on response tokens; responses are contiguous from position 0.
        gamma: discount (1.0 in every anchor).
        lam: GAE lambda (0.95 in TRL/MOSS/NeMo, 1.0 in OpenRLHF/verl).

    Returns:
        ``(advantages, returns)``, each (B, A), zero on padding; returns = advantages + values.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def group_normalize(scores: Tensor, group: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages: each score minus its group's mean, divided by the group's std (optional).

    Groups hold the G responses to one prompt. A group whose scores are all equal gets advantage 0 (no signal);
    with ``scale_by_std=False`` this is Dr. GRPO's unscaled variant (Liu et al. 2025).

    Args:
        scores: (B,) scalar rewards.
        group: (B,) integer group ids (any values; groups may differ in size).
        scale_by_std: divide by the group's unbiased standard deviation plus ``eps``.
        eps: numerical floor of the denominator.

    Returns:
        (B,) advantages.

    >>> group_normalize(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    """
    _, inverse = torch.unique(group, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    counts = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    counts.index_add_(0, inverse, torch.ones_like(scores))
    sums = torch.zeros_like(counts).index_add_(0, inverse, scores)
    means = sums / counts
    centered = scores - means[inverse]
    # A group whose scores are all equal carries no signal: make its advantages exactly 0 (rounding in the mean
    # would otherwise leave ~1e-8, which the std division below blows up).
    amax = torch.full_like(counts, -torch.inf).scatter_reduce(0, inverse, scores, "amax")
    amin = torch.full_like(counts, torch.inf).scatter_reduce(0, inverse, scores, "amin")
    centered = torch.where((amax == amin)[inverse], torch.zeros_like(centered), centered)
    if not scale_by_std:
        return centered
    sq = torch.zeros_like(counts).index_add_(0, inverse, centered**2)
    std = (sq / (counts - 1).clamp(min=1)).sqrt()
    return centered / (std[inverse] + eps)


def token_rewards(
    scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float
) -> Tensor:
    """Per-token rewards with the KL penalty "in the reward" (Ziegler et al. 2019; Ouyang et al. 2022).

    r_t = -kl_coef * kl_t on every response token, plus the sequence score on the last response token.

    Args:
        scores: (B,) terminal rewards.
        kl: (B, A) per-token KL estimate between policy and reference.
        mask: (B, A) 1 on response tokens (each row has at least one).
        kl_coef: KL penalty coefficient.

    Returns:
        (B, A) rewards, zero on padding.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def transform_scores(scores: Tensor, moments: RunningMoments | None = None, clip: float | None = None) -> Tensor:
    """The training reward as advantages see it: standardized with running ``moments`` (already updated with this
    batch; None: as is), then clipped to [-clip, clip] (None: not clipped). Shape: (B,).

    >>> transform_scores(torch.tensor([3.0, -3.0]), clip=1.0)
    tensor([ 1., -1.])
    """
    if moments is not None:
        scores = (scores - moments.mean) / max(moments.std, 1e-6)
    return scores if clip is None else scores.clamp(-clip, clip)


def compute_advantages(
    estimator: AdvantageEstimator, scores: Tensor, kl: Tensor, mask: Tensor, *, kl_coef: float,
    kl_in_reward: bool = True, values: Tensor | None = None, group: Tensor | None = None, gamma: float = 1.0,
    lam: float = 0.95, whiten: bool = True, scale_by_std: bool = True,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Rewards to advantages, for every algorithm.

    - ``gae`` (PPO, VRPO): per-token rewards r_t = -kl_coef * kl_t (when ``kl_in_reward``) plus the score at the
      last token, GAE against ``values``, then (``whiten``) standardization over the batch.
    - ``group`` (GRPO): each sequence's score minus kl_coef times its summed KL (when ``kl_in_reward``), normalized
      within its prompt's ``group`` once, broadcast to every response token.

    Args:
        estimator: ``gae`` or ``group``.
        scores: (B,) training rewards (after any normalization and clipping).
        kl: (B, A) per-token KL estimates to the reference (zero on padding).
        mask: (B, A) response mask.
        kl_coef: KL coefficient.
        kl_in_reward: subtract the KL from the rewards (False: it is a loss term instead).
        values: (B, A) V(s_t), for ``gae``.
        group: (B,) prompt ids, for ``group``.
        gamma: GAE discount.
        lam: GAE lambda.
        whiten: standardize GAE advantages (``gae`` only).
        scale_by_std: divide by the group's std (``group``; False is Dr. GRPO).
        reduce: sums moments over ranks for the whitening (see :func:`masked_whiten`).

    Returns:
        ``(advantages, returns)``: (B, A) each; returns are None for ``group`` (no critic).
    """
    if estimator == "group":
        if group is None:
            raise ValueError("compute_advantages('group', ...) needs the prompt ids `group`")
        per_seq = scores - kl_coef * kl.sum(1) if kl_in_reward else scores
        return group_normalize(per_seq, group, scale_by_std=scale_by_std)[:, None] * mask, None
    if estimator != "gae":
        raise ValueError(f"unknown advantage estimator {estimator!r}; use 'gae' or 'group'")
    if values is None:
        raise ValueError("compute_advantages('gae', ...) needs the critic's `values`")
    rewards = token_rewards(scores, kl if kl_in_reward else torch.zeros_like(kl), mask, kl_coef)
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask, reduce=reduce)
    return advantages, returns


class RunningMoments:
    """Running mean and variance of scalar rewards (Chan et al. parallel update), for reward normalization.

    PPO-max (Secrets of RLHF I) normalizes rewards with running statistics. The state is a few floats saved in
    checkpoints through :meth:`state_dict`.
    """

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, x: Tensor) -> None:
        """Folds the batch ``x`` (any shape) into the running statistics."""
        x = x.detach().double().flatten()
        if x.numel():
            self.update_stats(x.numel(), x.mean().item(), x.var(unbiased=False).item())

    def update_stats(self, n: float, batch_mean: float, batch_var: float) -> None:
        """Folds a batch given by its size, mean and (population) variance in, e.g. one summed over ranks."""
        if n <= 0:
            return
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return max(self.var, 0.0) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
