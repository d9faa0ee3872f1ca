"""MetricAccumulator: one test per reduction against the quantity computed directly, also split over fake ranks."""

from __future__ import annotations

import pytest
import torch

from vrpo_pl.losses import explained_variance, pearson
from vrpo_pl.metrics import MetricAccumulator, PhaseTimer


def _fake_ranks(build, n_ranks: int = 2) -> dict[str, float]:
    """Runs ``build(accumulator, rank)`` on ``n_ranks`` accumulators and reduces them as an all-reduce would."""
    accumulators = [MetricAccumulator() for _ in range(n_ranks)]
    for rank, acc in enumerate(accumulators):
        build(acc, rank)
    stacks = []
    for acc in accumulators:
        acc.compute(lambda t: stacks.append(t) or t)
    if not stacks:  # nothing to reduce (constants only)
        return accumulators[0].compute()
    total = torch.stack(stacks).sum(0)
    return accumulators[0].compute(lambda _: total)


def _data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(6, 5, generator=generator)
    mask = (torch.rand(6, 5, generator=generator) > 0.3).float()
    return values, mask


def test_token_mean_over_micro_batches_and_ranks_equals_the_global_mean():
    values, mask = _data()
    expected = float((values * mask).sum() / mask.sum())
    single = MetricAccumulator()
    for part in range(3):
        single.token_mean("x", values[2 * part : 2 * part + 2], mask[2 * part : 2 * part + 2])
    assert single.compute()["x"] == pytest.approx(expected)
    ranks = _fake_ranks(lambda acc, rank: acc.token_mean("x", values[3 * rank : 3 * rank + 3],
                                                         mask[3 * rank : 3 * rank + 3]))
    assert ranks["x"] == pytest.approx(expected)


def test_token_mean_of_weights_micro_batch_means_by_their_tokens():
    acc = MetricAccumulator()
    acc.token_mean_of("loss", 2.0, 1)  # one token at 2
    acc.token_mean_of("loss", 5.0, 3)  # three tokens averaging 5
    assert acc.compute()["loss"] == pytest.approx(17 / 4)


def test_seq_mean_counts_sequences_not_tokens():
    lengths = torch.tensor([1.0, 4.0, 10.0])
    ranks = _fake_ranks(lambda acc, rank: acc.seq_mean("len", lengths[:1] if rank == 0 else lengths[1:]))
    assert ranks["len"] == pytest.approx(5.0)


def test_step_mean_ignores_skipped_steps():
    acc = MetricAccumulator()
    acc.step_mean("grad_norm", 2.0)
    acc.step_mean("grad_norm", 0.0, steps=0.0)  # a skipped step registers the metric without counting
    acc.step_mean("grad_norm", 4.0)
    assert acc.compute()["grad_norm"] == pytest.approx(3.0)
    empty = MetricAccumulator()
    empty.step_mean("grad_norm", 0.0, steps=0.0)
    assert empty.compute()["grad_norm"] == 0.0


def test_sum_adds_over_ranks():
    assert _fake_ranks(lambda acc, rank: acc.sum("skipped", float(rank + 1)), n_ranks=3)["skipped"] == 6.0


def test_correlation_over_ranks_equals_pearson_of_all_points():
    x, mask = _data(1)
    y = 0.5 * x + torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    valid = mask.bool()
    expected = float(pearson(x, y, mask))

    def build(acc, rank):
        rows = slice(3 * rank, 3 * rank + 3)
        acc.correlation("c", x[rows][valid[rows]], y[rows][valid[rows]])

    ranks = _fake_ranks(build)
    assert ranks["c"] == pytest.approx(expected, abs=1e-6)


def test_explained_variance_over_ranks_equals_the_direct_formula():
    returns, mask = _data(3)
    values = returns + 0.5 * torch.randn(returns.shape, generator=torch.Generator().manual_seed(4))
    # explained_variance uses Bessel-corrected variances on both sides: the ratio is the same.
    expected = float(explained_variance(values, returns, mask))
    ranks = _fake_ranks(lambda acc, rank: acc.explained_variance("ev", values[3 * rank : 3 * rank + 3],
                                                                 returns[3 * rank : 3 * rank + 3],
                                                                 mask[3 * rank : 3 * rank + 3]))
    assert ranks["ev"] == pytest.approx(expected, abs=1e-6)


def test_constant_is_not_reduced():
    ranks = _fake_ranks(lambda acc, rank: acc.constant("kl/coef", 0.05))
    assert ranks["kl/coef"] == 0.05


def test_a_metric_keeps_its_reduction():
    acc = MetricAccumulator()
    acc.sum("x", 1.0)
    with pytest.raises(ValueError, match="'x' is recorded as token_mean but was registered as sum"):
        acc.token_mean("x", torch.ones(1, 1), torch.ones(1, 1))


def test_phase_timer_sums_repeated_and_nested_phases():
    timer = PhaseTimer()
    with timer("outer"):
        for _ in range(2):
            with timer("inner"):
                pass
    assert set(timer.seconds) == {"outer", "inner"} and timer.seconds["outer"] >= timer.seconds["inner"] >= 0
    timer.reset()
    assert timer.seconds == {}


def test_rollout_metrics_reduce_each_as_declared():
    from vrpo_pl.metrics import rollout_metrics
    from vrpo_pl.rollout import Rollout

    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    r = Rollout(sequences=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5),
                position_ids=torch.zeros(2, 5, dtype=torch.long), responses=torch.zeros(2, 3, dtype=torch.long),
                mask=mask, truncated=torch.tensor([True, False]), prompt_width=2, values=returns.clone(),
                returns=returns, advantages=torch.zeros(2, 3))
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    out = rollout_metrics(r, kl, torch.tensor([1.0, 0.0]), None, kl_coef=0.05, rollouts=3).compute()
    assert out["reward/train"] == pytest.approx(0.5) and "reward/gold" not in out
    assert out["response/length"] == pytest.approx(2.0)  # a sequence mean of 3 and 1 tokens
    assert out["response/truncated_frac"] == pytest.approx(0.5)
    assert out["kl/ref"] == pytest.approx(0.5)  # per-sequence sums 0.6 and 0.4, averaged
    assert out["kl/coef"] == 0.05 and out["rollouts"] == 3.0
    assert out["value/mean"] == pytest.approx(0.75)  # token mean: 3 ones and 1 zero
    for name in ("value/explained_variance", "value/explained_variance_first", "value/explained_variance_last"):
        assert out[name] == pytest.approx(1.0), name  # values equal to the returns
