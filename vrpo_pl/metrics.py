"""Metric reduction: every logged quantity declares how it is reduced where it is produced.

A :class:`MetricAccumulator` collects the *parts* of each metric (a sum and its count, or the moments of a
correlation) over micro-batches, mini-batches and epochs, then :meth:`~MetricAccumulator.compute` sums all parts
over data-parallel ranks in one collective and finishes each metric by its own rule. Nothing is inferred from a
metric's name, so a new metric cannot be divided by the wrong count.

Reductions:

- ``token_mean``: a per-token quantity averaged over the response tokens it was recorded on;
- ``seq_mean``: a per-sequence quantity averaged over sequences;
- ``step_mean``: one value per optimizer step (a gradient norm), averaged over the steps taken;
- ``sum``: added up (counts: skipped updates);
- ``correlation``: Pearson correlation over every recorded point (:func:`vrpo_pl.losses.correlation_from_sums`);
- ``explained_variance``: 1 - Var(R - V)/Var(R) over every recorded point
  (:func:`vrpo_pl.losses.explained_variance_from_sums`);
- ``constant``: the same value on every rank (a coefficient, a counter), reported as last recorded.

Adding a metric is one line where it is produced, e.g. ``metrics.token_mean("value/abs_error", err.abs(), mask)``,
plus its row in the README's metric table.

Beside them: :func:`rollout_metrics` (a rollout batch's metrics), :func:`sample_records` (a few samples as plain
records for the sample logger) and :class:`PhaseTimer` (the ``perf/*`` phase times).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from vrpo_pl.advantages import masked_mean
from vrpo_pl.losses import correlation_from_sums, explained_variance_from_sums

if TYPE_CHECKING:
    from vrpo_pl.rollout import Rollout

Reduction = Literal["token_mean", "seq_mean", "step_mean", "sum", "correlation", "explained_variance", "constant"]

# The parts each reduction sums over micro-batches and ranks.
_PARTS: dict[str, tuple[str, ...]] = {
    "token_mean": ("total", "count"),
    "seq_mean": ("total", "count"),
    "step_mean": ("total", "count"),
    "sum": ("total",),
    "correlation": ("x", "y", "xx", "yy", "xy", "n"),
    "explained_variance": ("r", "rr", "e", "ee", "n"),
}


class MetricAccumulator:
    """Parts of metrics, summed as they are recorded and reduced over ranks once by :meth:`compute`.

    Every rank must record the same metric names (values may be zero): the parts of all metrics travel in one
    all-reduce, ordered by name.

    >>> m = MetricAccumulator()
    >>> m.token_mean("loss", torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 1.0]]))
    >>> m.token_mean("loss", torch.tensor([[5.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    >>> m.compute()
    {'loss': 3.0}
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        """
        Args:
            device: where the parts are kept (the training device: no synchronization until :meth:`compute`).
        """
        self.device = torch.device(device)
        self._kinds: dict[str, Reduction] = {}
        self._parts: dict[str, dict[str, Tensor]] = {}
        self._constants: dict[str, float] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._kinds

    def _add(self, name: str, kind: Reduction, **parts: Tensor | float) -> None:
        known = self._kinds.setdefault(name, kind)
        if known != kind:
            raise ValueError(f"metric {name!r} is recorded as {kind} but was registered as {known}")
        slot = self._parts.setdefault(name, {})
        for part, value in parts.items():
            value = torch.as_tensor(value).detach().to(self.device, torch.float64)
            slot[part] = slot[part] + value if part in slot else value

    def token_mean(self, name: str, values: Tensor, mask: Tensor) -> None:
        """A per-token quantity: adds the masked sum of ``values`` (B, A) and the token count of ``mask`` (B, A)."""
        self._add(name, "token_mean", total=(values.detach() * mask).sum(), count=mask.sum())

    def token_mean_of(self, name: str, mean: Tensor | float, tokens: Tensor | float) -> None:
        """A token mean already taken over ``tokens`` tokens (a micro-batch's loss): weighted by its token count."""
        tokens = torch.as_tensor(tokens).to(self.device, torch.float64)
        self._add(name, "token_mean", total=torch.as_tensor(mean).to(self.device, torch.float64) * tokens, count=tokens)

    def seq_mean(self, name: str, values: Tensor) -> None:
        """A per-sequence quantity: adds the sum and the number of the (B,) ``values``."""
        self._add(name, "seq_mean", total=values.detach().float().sum(), count=float(values.numel()))

    def step_mean(self, name: str, value: Tensor | float, steps: float = 1.0) -> None:
        """One value per optimizer step (``steps=0`` registers the metric without counting a step)."""
        self._add(name, "step_mean", total=torch.as_tensor(value).to(self.device, torch.float64) * steps, count=steps)

    def sum(self, name: str, value: Tensor | float) -> None:
        """Added up over micro-batches and ranks."""
        self._add(name, "sum", total=value)

    def correlation(self, name: str, x: Tensor, y: Tensor) -> None:
        """Pearson correlation over every point of ``x`` and ``y`` (same shape, already restricted to valid ones)."""
        x, y = x.detach().double().flatten(), y.detach().double().flatten()
        self._add(name, "correlation", x=x.sum(), y=y.sum(), xx=(x * x).sum(), yy=(y * y).sum(), xy=(x * y).sum(),
                  n=float(x.numel()))

    def explained_variance(self, name: str, values: Tensor, returns: Tensor, mask: Tensor) -> None:
        """Explained variance of ``values`` against ``returns`` over the positions of ``mask`` (all the same shape)."""
        returns, error, mask = returns.detach().double(), (returns - values).detach().double(), mask.double()
        self._add(name, "explained_variance", r=(returns * mask).sum(), rr=(returns**2 * mask).sum(),
                  e=(error * mask).sum(), ee=(error**2 * mask).sum(), n=mask.sum())

    def constant(self, name: str, value: float) -> None:
        """A value that is the same on every rank: not reduced, the last one recorded is reported."""
        self._kinds.setdefault(name, "constant")
        self._constants[name] = float(value)

    def compute(self, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Sums every part over ranks (``all_reduce_sum``, e.g. :func:`vrpo_pl.distributed.all_reduce_sum`) and
        finishes each metric by its reduction. Means over no count are 0, as are undefined correlations."""
        names = sorted(self._parts)
        flat = [self._parts[name][part] for name in names for part in _PARTS[self._kinds[name]]]
        if flat and all_reduce_sum is not None:
            reduced = all_reduce_sum(torch.stack(flat)).tolist()
        else:
            reduced = [float(v) for v in flat]
        out: dict[str, float] = {}
        offset = 0
        for name in names:
            kind = self._kinds[name]
            parts = dict(zip(_PARTS[kind], reduced[offset : offset + len(_PARTS[kind])], strict=True))
            offset += len(_PARTS[kind])
            if kind == "sum":
                out[name] = parts["total"]
            elif kind == "correlation":
                out[name] = correlation_from_sums(parts, parts["n"])
            elif kind == "explained_variance":
                out[name] = explained_variance_from_sums(parts["r"], parts["rr"], parts["e"], parts["ee"], parts["n"])
            else:
                out[name] = parts["total"] / parts["count"] if parts["count"] > 0 else 0.0
        out.update(self._constants)
        return out


def rollout_metrics(r: Rollout, kl: Tensor, train: Tensor, gold: Tensor | None, *, kl_coef: float,
                    rollouts: int) -> MetricAccumulator:
    """A rollout batch's metrics (see the README's metric table), ready for :meth:`MetricAccumulator.compute`.

    Args:
        r: the :class:`vrpo_pl.rollout.Rollout` after advantages (values, returns and key marks when present).
        kl: (B, A) per-token KL to the reference; train, gold: (B,) training and gold rewards (gold may be None).
        kl_coef, rollouts: logged as constants.
    """
    m, mask, lengths = MetricAccumulator(r.mask.device), r.mask, r.mask.sum(1)
    m.seq_mean("reward/train", train)
    if gold is not None:
        m.seq_mean("reward/gold", gold)
    m.seq_mean("response/length", lengths)
    m.seq_mean("response/truncated_frac", r.truncated.float())
    m.seq_mean("kl/ref", kl.sum(1))
    m.constant("kl/coef", kl_coef)
    m.constant("rollouts", float(rollouts))
    if r.values is not None:
        m.token_mean("value/mean", r.values, mask)
        m.explained_variance("value/explained_variance", r.values, r.returns, mask)
        # At two positions: the first response token (V sees the prompt only) and the last one (V has seen the
        # whole response but its final token): where the critic has information.
        last = (lengths.long() - 1).clamp(min=0)[:, None]
        for name, pos in (("first", torch.zeros_like(last)), ("last", last)):
            m.explained_variance(f"value/explained_variance_{name}", r.values.gather(1, pos),
                                 r.returns.gather(1, pos), mask.gather(1, pos))
    if r.key is not None:
        m.token_mean("adv/abs_key", r.advantages.abs(), r.key)
        m.token_mean("adv/abs_other", r.advantages.abs(), mask - r.key)
    return m


def sample_records(batch: dict, texts: list[str], r: Rollout, train: Tensor, gold: Tensor | None,
                   n: int = 8) -> list[dict]:
    """The first ``n`` samples of a rollout batch as plain records (prompt, response, answer, training and gold
    reward, mean advantage over the response's tokens), for the sample logger."""
    adv = masked_mean(r.advantages, r.mask, dim=1)
    answers = batch.get("answer") or [None] * r.size
    return [{"prompt": batch["prompt"][i], "response": texts[i], "answer": answers[i], "reward_train": float(train[i]),
             "reward_gold": None if gold is None else float(gold[i]), "advantage": float(adv[i])}
            for i in range(min(n, r.size))]


class PhaseTimer:
    """Wall-clock seconds of named phases within one training step (synchronizing CUDA at each boundary).

    ``seconds`` maps phase names to their summed durations since :meth:`reset`; a phase may run several times
    (each optimizer step of the update) and nest (generation inside the rollout).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
