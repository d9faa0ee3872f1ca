"""Noise models: wrappers that corrupt another reward's training signal and pass its gold through.

Every wrapper takes ``base: RewardFunction`` and returns ``RewardScores(train=corrupted, gold=base.gold, ...)``,
so they compose (``LengthBias(base=SymmetricFlip(base=NumericVerifier()))``). Random wrappers own a seeded
``torch.Generator`` on the CPU; ``state_dict`` saves it (and the base's state, recursively) so a resumed run draws
the same noise. ``gold_score`` always delegates to the base and never draws.

Across ranks each process draws its own flips: the generator of rank r is seeded with :func:`rank_seed` (``seed``
on rank 0, so one process draws as before; offset by r * 0x9E3779B9 elsewhere), created at the first draw, when the
process group exists. ``state_dict`` then holds every rank's state (it gathers them; Lightning builds the checkpoint
on every rank and rank 0 writes it), and ``load_state_dict`` gives each rank its own back. A rank the checkpoint
has no state for (it was written by fewer processes) keeps its fresh rank seed.

The flip models follow the Bernoulli flip model of noise-corrected GRPO (arXiv 2510.18924): false-positive rate
rho+ = P(r~=1 | r*=0), false-negative rate rho- = P(r~=0 | r*=1). :class:`FlipRateCorrection` applies that paper's
unbiased estimator r^ = (r~ - rho+) / (1 - rho+ - rho-), which needs Youden's J = 1 - rho+ - rho- > 0 ("Rate or
Fate?", arXiv 2601.04411: at J <= 0 learning collapses).

When the gold is binary, each wrapper logs the flips it observes (:func:`observed_flip_rates`); a nested wrapper's
metrics are merged, and the outermost one's flip rates (train vs. gold over the whole stack) win.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from vrpo_pl.rewards.base import Completion, RewardFunction, RewardScores


def observed_flip_rates(train: Tensor, gold: Tensor) -> dict[str, float]:
    """How often the training reward disagrees with the gold, after binarizing both at 0.5.

    Args:
        train: (B,) training reward.
        gold: (B,) binary gold reward.

    Returns:
        ``flip_rate`` = mean(train != gold); ``false_positive_rate`` = P(train=1 | gold=0), present only when some
        gold is 0; ``false_negative_rate`` = P(train=0 | gold=1), present only when some gold is 1.

    >>> observed_flip_rates(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0]))
    {'flip_rate': 0.5, 'false_positive_rate': 1.0, 'false_negative_rate': 0.3333333333333333}
    """
    noisy, true = train >= 0.5, gold >= 0.5
    rates = {"flip_rate": (noisy != true).double().mean().item()}
    if (~true).any():
        rates["false_positive_rate"] = noisy[~true].double().mean().item()
    if true.any():
        rates["false_negative_rate"] = (~noisy[true]).double().mean().item()
    return rates


def is_binary(rewards: Tensor) -> bool:
    """Whether every reward is exactly 0 or 1."""
    return bool(((rewards == 0) | (rewards == 1)).all())


def check_binary(rewards: Tensor, owner: str) -> None:
    """Raises a ValueError naming ``owner`` and the first reward that is neither 0 nor 1.

    Args:
        rewards: (B,) rewards.
        owner: The noise model, for the message.
    """
    bad = rewards[(rewards != 0) & (rewards != 1)]
    if bad.numel():
        raise ValueError(
            f"{owner}: the base reward must be binary (0 or 1) but {bad[0].item():g} was seen; flip noise needs a "
            "verifier's verdicts (use GaussianNoise for continuous rewards, or binarize the reward model)"
        )


def flip_binary(
    labels: Tensor, false_positive_rate: float, false_negative_rate: float, generator: torch.Generator
) -> Tensor:
    """Flips binary labels independently: 0 -> 1 with ``false_positive_rate``, 1 -> 0 with ``false_negative_rate``.

    Draws exactly B uniforms from ``generator`` (on the CPU), whatever the labels.

    Args:
        labels: (B,) rewards in {0, 1}.
        false_positive_rate: rho+ = P(noisy=1 | true=0).
        false_negative_rate: rho- = P(noisy=0 | true=1).
        generator: A CPU generator.

    Returns:
        (B,) float32 noisy labels on ``labels``' device.
    """
    u = torch.rand(labels.shape, generator=generator).to(labels.device)
    flip_prob = torch.where(labels == 1, false_negative_rate, false_positive_rate)
    return torch.where(u < flip_prob, 1 - labels, labels).float()


def flip_corrected_reward(noisy: Tensor, false_positive_rate: float, false_negative_rate: float) -> Tensor:
    """The unbiased reward r^ = (r~ - rho+) / (1 - rho+ - rho-) of noise-corrected GRPO (arXiv 2510.18924).

    With P(r~=1 | r*) = rho+ + r* (1 - rho+ - rho-), E[r^ | r*] = r* for r* in {0, 1}.

    Args:
        noisy: (B,) noisy binary rewards r~.
        false_positive_rate: rho+.
        false_negative_rate: rho-; rho+ + rho- must be < 1.

    Returns:
        (B,) corrected rewards: (1 - rho+) / J for r~=1 and -rho+ / J for r~=0, with J = 1 - rho+ - rho-.

    >>> flip_corrected_reward(torch.tensor([0.0, 1.0]), 0.2, 0.3)
    tensor([-0.4000,  1.6000])
    """
    return (noisy - false_positive_rate) / (1.0 - false_positive_rate - false_negative_rate)


def length_bonus(completions: list[Completion], coef: float, unit: Literal["tokens", "chars"]) -> Tensor:
    """coef * response length, per completion.

    Args:
        completions: B completions.
        coef: Bonus per token or character (negative for a length penalty).
        unit: ``tokens`` uses ``Completion.num_tokens``, ``chars`` the length of ``Completion.response``.

    Returns:
        (B,) float32 bonus.

    Raises:
        ValueError: For ``unit="tokens"`` when a non-empty response reports ``num_tokens=0`` (the length was never
            filled in).
    """
    if unit == "tokens":
        for i, c in enumerate(completions):
            if c.num_tokens == 0 and c.response:
                raise ValueError(
                    f"LengthBias(unit='tokens'): completion {i} has a non-empty response but num_tokens=0; fill "
                    "Completion.num_tokens or use unit='chars'"
                )
        lengths = [c.num_tokens for c in completions]
    else:
        lengths = [len(c.response) for c in completions]
    return coef * torch.tensor(lengths, dtype=torch.float32)


def _check_rate(owner: str, name: str, value: float) -> None:
    """Raises a ValueError unless 0 <= value <= 1."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: {name}={value} must be in [0, 1]")


def _check_base(owner: str, base: Any) -> None:
    """Raises a TypeError unless ``base`` is a reward instance."""
    if not isinstance(base, RewardFunction):
        raise TypeError(
            f"{owner}: base must be a RewardFunction instance (got {type(base).__name__}); in YAML give it as "
            "base: {class_path: ..., init_args: ...}"
        )


RANK_SEED_STRIDE = 0x9E3779B9
"""The seed offset from one rank to the next (2**32 / golden ratio): far apart for small seeds. Not 2**32, because the
CPU generator (mt19937) keeps only the low 32 bits of its seed."""


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s noise generator: ``seed`` on rank 0, ``(seed + rank * 0x9E3779B9) mod 2**32``
    elsewhere.

    >>> rank_seed(7, 0), rank_seed(7, 1)
    (7, 2654435776)
    """
    return seed if rank == 0 else (seed + rank * RANK_SEED_STRIDE) % (1 << 32)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _NoiseWrapper(RewardFunction):
    """Shared plumbing: delegation to ``base``, gold pass-through, metrics, state and device."""

    base: RewardFunction
    seed: int | None = None
    _generator: torch.Generator | None = None
    _rank: int = 0

    def _setup(self, base: RewardFunction, seed: int | None) -> None:
        _check_base(type(self).__name__, base)
        self.base, self.seed = base, seed

    @property
    def generator(self) -> torch.Generator | None:
        """This rank's generator (None for deterministic wrappers), seeded with :func:`rank_seed` at first use."""
        if self.seed is None:
            return None
        if self._generator is None:
            self._rank = _rank_and_world()[0]
            self._generator = torch.Generator().manual_seed(rank_seed(self.seed, self._rank))
        return self._generator

    @abstractmethod
    def _corrupt(self, train: Tensor, completions: list[Completion]) -> Tensor:
        """(B,) base training reward -> (B,) corrupted training reward."""

    def score(self, completions: list[Completion]) -> RewardScores:
        """Scores with the base, corrupts ``train``, passes ``gold`` through and logs the observed flips.

        Returns:
            RewardScores: ``train`` (B,) corrupted; ``gold`` (B,) the base's, unchanged; metrics the base's plus
            :func:`observed_flip_rates` when the gold is binary.
        """
        scores = self.base.score(completions)
        train = self._corrupt(scores.train, completions)
        metrics = dict(scores.metrics)
        if scores.gold is not None and scores.gold.numel() and is_binary(scores.gold):
            metrics.update(observed_flip_rates(train, scores.gold))
        return RewardScores(train=train, gold=scores.gold, metrics=metrics)

    def gold_score(self, completions: list[Completion]) -> Tensor | None:
        """The base's gold; draws no random numbers."""
        return self.base.gold_score(completions)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (if any) and the base's state; with several processes also every rank's
        generator state, rank by rank (``generator_by_rank``; a collective: call it on every rank)."""
        state: dict[str, Any] = {"base": self.base.state_dict()}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
            world = _rank_and_world()[1]
            if world > 1:
                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, state["generator"])
                state["generator_by_rank"] = gathered
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output, so each rank's next draws repeat those of the saved run."""
        self.base.load_state_dict(state.get("base", {}))
        if self.generator is None:
            return
        by_rank = state.get("generator_by_rank")
        if by_rank is not None and self._rank < len(by_rank):
            self.generator.set_state(by_rank[self._rank])
        elif self._rank == 0:
            self.generator.set_state(state["generator"])

    def to(self, device: torch.device) -> RewardFunction:
        """Moves the base; the generator stays on the CPU (its draws are moved to the rewards' device)."""
        self.base.to(device)
        return self


class SymmetricFlip(_NoiseWrapper):
    """Flips a binary reward 0 <-> 1 with probability ``p``, independently per completion."""

    def __init__(self, base: RewardFunction, p: float, seed: int = 0):
        """Builds the noise model.

        Args:
            base: The binary reward to corrupt (e.g. a NumericVerifier).
            p: Flip probability in [0, 1]; learning stalls at p = 0.5 and inverts above it.
            seed: Seed of this model's own random generator.
        """
        _check_rate("SymmetricFlip", "p", p)
        self.p = p
        self._setup(base, seed)

    def _corrupt(self, train: Tensor, completions: list[Completion]) -> Tensor:
        check_binary(train, "SymmetricFlip")
        return flip_binary(train, self.p, self.p, self.generator)


class AsymmetricFlip(_NoiseWrapper):
    """Flips a binary reward with separate false-positive and false-negative rates."""

    def __init__(self, base: RewardFunction, false_positive_rate: float, false_negative_rate: float, seed: int = 0):
        """Builds the noise model.

        Args:
            base: The binary reward to corrupt (e.g. a NumericVerifier).
            false_positive_rate: rho+ = P(noisy=1 | true=0), in [0, 1].
            false_negative_rate: rho- = P(noisy=0 | true=1), in [0, 1].
            seed: Seed of this model's own random generator.
        """
        _check_rate("AsymmetricFlip", "false_positive_rate", false_positive_rate)
        _check_rate("AsymmetricFlip", "false_negative_rate", false_negative_rate)
        self.false_positive_rate = false_positive_rate
        self.false_negative_rate = false_negative_rate
        self._setup(base, seed)

    def _corrupt(self, train: Tensor, completions: list[Completion]) -> Tensor:
        check_binary(train, "AsymmetricFlip")
        return flip_binary(train, self.false_positive_rate, self.false_negative_rate, self.generator)


class GaussianNoise(_NoiseWrapper):
    """Adds independent N(0, sigma^2) noise to the reward."""

    def __init__(self, base: RewardFunction, sigma: float, seed: int = 0):
        """Builds the noise model.

        Args:
            base: The reward to corrupt (any scale).
            sigma: Standard deviation of the added noise, >= 0.
            seed: Seed of this model's own random generator.
        """
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"GaussianNoise: sigma={sigma} must be a finite number >= 0")
        self.sigma = sigma
        self._setup(base, seed)

    def _corrupt(self, train: Tensor, completions: list[Completion]) -> Tensor:
        noise = torch.randn(train.shape, generator=self.generator).to(train.device)
        return (train + self.sigma * noise).float()


class LengthBias(_NoiseWrapper):
    """Adds coef * response length: a systematic bias the policy can exploit by writing longer answers."""

    def __init__(self, base: RewardFunction, coef: float, unit: Literal["tokens", "chars"] = "tokens"):
        """Builds the (deterministic) bias.

        Args:
            base: The reward to bias.
            coef: Reward added per unit of length; negative values penalize length.
            unit: Length unit: ``tokens`` (``Completion.num_tokens``) or ``chars`` (characters of the response).
        """
        if not math.isfinite(coef):
            raise ValueError(f"LengthBias: coef={coef} must be a finite number")
        if unit not in ("tokens", "chars"):
            raise ValueError(f"LengthBias: unit={unit!r} must be 'tokens' or 'chars'")
        self.coef = coef
        self.unit = unit
        self._setup(base, seed=None)

    def _corrupt(self, train: Tensor, completions: list[Completion]) -> Tensor:
        return (train + length_bonus(completions, self.coef, self.unit).to(train.device)).float()


class FlipRateCorrection(_NoiseWrapper):
    """Unbiased correction of flip noise with known rates: r^ = (r~ - rho+) / (1 - rho+ - rho-).

    Beyond the VRPO paper (method.md: optional correction). Wrap it around the noisy reward:
    ``FlipRateCorrection(base=AsymmetricFlip(base=NumericVerifier(), ...), ...)``. Then E[r^ | r*] = r*, at the
    price of a variance larger by 1 / (1 - rho+ - rho-)^2.
    """

    def __init__(self, base: RewardFunction, false_positive_rate: float, false_negative_rate: float):
        """Builds the correction.

        Args:
            base: The noisy binary reward to correct.
            false_positive_rate: rho+ = P(noisy=1 | true=0) of the base, known or estimated, in [0, 1).
            false_negative_rate: rho- = P(noisy=0 | true=1) of the base, known or estimated, in [0, 1);
                rho+ + rho- must be < 1.
        """
        _check_rate("FlipRateCorrection", "false_positive_rate", false_positive_rate)
        _check_rate("FlipRateCorrection", "false_negative_rate", false_negative_rate)
        if false_positive_rate + false_negative_rate >= 1:
            raise ValueError(
                f"FlipRateCorrection: false_positive_rate + false_negative_rate = {false_positive_rate} + "
                f"{false_negative_rate} must be < 1. At a sum >= 1 the noisy reward carries no information about "
                "the true one, or an inverted one (Youden's J = 1 - rho+ - rho- <= 0), so no correction can make "
                "learning possible"
            )
        self.false_positive_rate = false_positive_rate
        self.false_negative_rate = false_negative_rate
        self._setup(base, seed=None)

    def _corrupt(self, train: Tensor, completions: list[Completion]) -> Tensor:
        check_binary(train, "FlipRateCorrection")
        return flip_corrected_reward(train, self.false_positive_rate, self.false_negative_rate).float()
