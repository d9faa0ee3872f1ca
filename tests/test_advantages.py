"""Unit tests of vrpo_pl.advantages: GAE, masked statistics, GRPO group normalization, per-token rewards and
running moments, against hand-computed values and naive per-sequence Python loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vrpo_pl.advantages import (
    RunningMoments,
    compute_advantages,
    gae_advantages,
    group_normalize,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    token_rewards,
    transform_scores,
)


def ragged_mask(lengths: list[int], width: int, dtype=torch.float64) -> torch.Tensor:
    """(B, width) mask with ones on the first ``lengths[b]`` positions of row b."""
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


def naive_gae(rewards, values, mask, gamma, lam):
    """Per-sequence GAE with plain Python floats, bootstrapping from zero past each response's end."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        r, v = rewards[b].tolist(), values[b].tolist()
        next_adv = 0.0
        for t in reversed(range(length)):
            next_value = v[t + 1] if t + 1 < length else 0.0
            delta = r[t] + gamma * next_value - v[t]
            next_adv = delta + gamma * lam * next_adv
            advantages[b, t] = next_adv
    return advantages


# --- GAE --------------------------------------------------------------------------------------------------------


def test_gae_hand_computed_three_tokens():
    """A 3-token response (plus one padding slot holding garbage) matches the GAE recursion worked by hand."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # delta_2 = 1 - 0.7 = 0.3; delta_1 = 0.7 - 0.6 = 0.1; delta_0 = 0.6 - 0.5 = 0.1
    # A_2 = 0.3; A_1 = 0.1 + 0.95 * 0.3 = 0.385; A_0 = 0.1 + 0.95 * 0.385 = 0.46575
    expected_adv = torch.tensor([[0.46575, 0.385, 0.3, 0.0]], dtype=torch.float64)
    assert_close(advantages, expected_adv)
    assert_close(returns, torch.tensor([[0.96575, 0.985, 1.0, 0.0]], dtype=torch.float64))


def test_gae_hand_computed_discounted():
    """The same 3 tokens with gamma=0.9, lam=0.5 match a hand computation."""
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    advantages, _ = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    a2 = 1.0 - 0.7
    a1 = (0.9 * 0.7 - 0.6) + 0.45 * a2
    a0 = (0.9 * 0.6 - 0.5) + 0.45 * a1
    assert_close(advantages, torch.tensor([[a0, a1, a2]], dtype=torch.float64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (0.99, 0.95), (0.9, 1.0), (0.8, 0.0), (0.5, 0.7)])
def test_gae_matches_naive_loop_on_ragged_batch(gamma, lam):
    """GAE equals a naive per-sequence loop on random rewards/values with responses of different lengths."""
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 7, 3, 5]
    mask = ragged_mask(lengths, 7)
    rewards = torch.randn(len(lengths), 7, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), 7, generator=g, dtype=torch.float64)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    assert_close(advantages, naive_gae(rewards, values, mask, gamma, lam))
    assert_close(returns, (advantages + values) * mask)
    assert torch.all(advantages[mask == 0] == 0)
    assert torch.all(returns[mask == 0] == 0)


def test_gae_padding_content_is_ignored():
    """Changing rewards and values on padding changes nothing on response tokens."""
    g = torch.Generator().manual_seed(1)
    mask = ragged_mask([2, 5, 3], 5)
    rewards = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64)
    noisy_r = torch.where(mask.bool(), rewards, torch.full_like(rewards, 100.0))
    noisy_v = torch.where(mask.bool(), values, torch.full_like(values, -100.0))
    a1, r1 = gae_advantages(rewards, values, mask)
    a2, r2 = gae_advantages(noisy_r, noisy_v, mask)
    assert_close(a1, a2)
    assert_close(r1, r2)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lambda_one_returns_are_discounted_reward_to_go(gamma):
    """With lam=1 the returns are the Monte Carlo discounted reward-to-go, whatever the values."""
    g = torch.Generator().manual_seed(2)
    mask = ragged_mask([4, 2, 6], 6)
    rewards = torch.randn(3, 6, generator=g, dtype=torch.float64) * mask
    values = torch.randn(3, 6, generator=g, dtype=torch.float64)
    _, returns = gae_advantages(rewards, values, mask, gamma=gamma, lam=1.0)
    expected = torch.zeros_like(rewards)
    for b in range(3):
        running = 0.0
        for t in reversed(range(int(mask[b].sum()))):
            running = rewards[b, t].item() + gamma * running
            expected[b, t] = running
    assert_close(returns, expected)


def test_gae_lambda_zero_is_one_step_td():
    """With lam=0 the advantage is the one-step TD error delta_t."""
    g = torch.Generator().manual_seed(3)
    mask = ragged_mask([3, 5], 5)
    rewards = torch.randn(2, 5, generator=g, dtype=torch.float64) * mask
    values = torch.randn(2, 5, generator=g, dtype=torch.float64) * mask
    advantages, _ = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(2, 1, dtype=torch.float64)], dim=1)
    assert_close(advantages, (rewards + 0.9 * next_values - values) * mask)


# --- masked statistics ------------------------------------------------------------------------------------------


def test_masked_sum_and_mean_hand_values():
    """Masked sum and mean ignore padding, per row and overall; an empty row's mean is 0."""
    x = torch.tensor([[1.0, 3.0, 100.0], [2.0, -7.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert masked_sum(x, mask).item() == 4.0
    assert masked_mean(x, mask).item() == 2.0
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 0.0]))
    assert_close(masked_sum(x, mask, dim=1), torch.tensor([4.0, 0.0]))


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_torch_var_of_valid_tokens(unbiased):
    """masked_var equals torch.var over the valid tokens only (Bessel-corrected or not)."""
    g = torch.Generator().manual_seed(4)
    mask = ragged_mask([5, 2, 6, 1], 6)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64) + 1000.0 * (1 - mask)
    expected = x[mask.bool()].var(unbiased=unbiased)
    assert_close(masked_var(x, mask, unbiased=unbiased), expected)


def test_masked_var_single_token_is_zero_not_nan():
    """One valid token: variance 0 (no division by n - 1 = 0)."""
    x = torch.tensor([[3.0, 9.0]])
    mask = torch.tensor([[1.0, 0.0]])
    assert masked_var(x, mask).item() == 0.0


def test_masked_whiten_standardizes_valid_tokens():
    """Whitened valid tokens have mean 0 and (unbiased) std 1; padding is exactly 0."""
    g = torch.Generator().manual_seed(5)
    mask = ragged_mask([6, 3, 8, 1, 5], 8)
    x = 3.0 + 2.5 * torch.randn(5, 8, generator=g, dtype=torch.float64) + 1e3 * (1 - mask)
    w = masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert_close(valid.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-10, rtol=0)
    assert_close(valid.std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.all(w[mask == 0] == 0)


def test_masked_whiten_without_shift_keeps_the_mean():
    """shift_mean=False keeps the original mean of valid tokens and still scales to unit std."""
    g = torch.Generator().manual_seed(6)
    mask = ragged_mask([4, 7, 2], 7)
    x = 3.0 + 2.5 * torch.randn(3, 7, generator=g, dtype=torch.float64)
    w = masked_whiten(x, mask, shift_mean=False)
    valid, orig = w[mask.bool()], x[mask.bool()]
    assert_close(valid.mean(), orig.mean())
    assert_close(valid.std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.all(w[mask == 0] == 0)


def test_masked_whiten_constant_input_is_finite():
    """Constant valid values whiten to 0 (eps keeps it finite)."""
    x = torch.full((2, 3), 4.0)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    w = masked_whiten(x, mask)
    assert torch.all(torch.isfinite(w))
    assert torch.all(w == 0)


# --- GRPO group normalization -----------------------------------------------------------------------------------


def naive_group_normalize(scores, group, scale_by_std=True, eps=1e-6):
    out = torch.zeros_like(scores)
    for gid in group.unique().tolist():
        idx = (group == gid).nonzero().flatten()
        s = scores[idx]
        centered = s - s.mean()
        if scale_by_std:
            std = s.std() if len(idx) > 1 else torch.zeros((), dtype=scores.dtype)
            centered = centered / (std + eps)
        out[idx] = centered
    return out


def test_group_normalize_hand_values():
    """Two groups worked by hand: {1, 0} -> +-0.7071; {1, 1} -> 0; {1, 2, 3, 6} -> centered / sqrt(14/3)."""
    out = group_normalize(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    assert_close(out, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (math.sqrt(0.5) + 1e-6))
    out = group_normalize(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64), torch.tensor([4, 4, 4, 4]))
    std = math.sqrt(14.0 / 3.0)
    assert_close(out, torch.tensor([-2.0, -1.0, 0.0, 3.0], dtype=torch.float64) / (std + 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.9, 0.1, 1.2857142857142858])
@pytest.mark.parametrize("size", [3, 7, 8, 16])
def test_group_normalize_zero_variance_group_is_exactly_zero(size, value, dtype):
    """A group whose scores are all equal gets advantage exactly 0 (no NaN, no rounding noise amplified by 1/eps).

    1.2857... is (1 - rho+) / (1 - rho+ - rho-) for rho+ = 0.1, rho- = 0.2: every correct answer of a
    noise-corrected GRPO group scores it.
    """
    scores = torch.cat([torch.full((size,), value, dtype=dtype), torch.tensor([0.0, 1.0], dtype=dtype)])
    group = torch.tensor([0] * size + [1, 1])
    out = group_normalize(scores, group)
    assert torch.all(torch.isfinite(out))
    assert torch.all(out[:size] == 0), f"constant group of {value} gave advantages {out[:size].tolist()}"


def test_group_normalize_uneven_and_noncontiguous_groups_match_naive_loop():
    """Interleaved, non-contiguous, negative and large group ids of sizes 1..4 match a per-group loop."""
    g = torch.Generator().manual_seed(7)
    group = torch.tensor([42, -3, 42, 7, 7, 42, 1000, 7, 42, -3])
    scores = torch.randn(len(group), generator=g, dtype=torch.float64)
    out = group_normalize(scores, group)
    assert_close(out, naive_group_normalize(scores, group))
    assert out[6].item() == 0.0  # a group of one has no signal
    # Relabelling the groups changes nothing.
    relabelled = torch.tensor([0, 1, 0, 2, 2, 0, 3, 2, 0, 1])
    assert_close(group_normalize(scores, relabelled), out)


def test_group_normalize_per_group_mean_zero_std_one():
    """Each normalized group has mean 0 and unbiased std ~1."""
    g = torch.Generator().manual_seed(8)
    group = torch.arange(4).repeat_interleave(torch.tensor([2, 5, 3, 8]))
    scores = torch.rand(len(group), generator=g, dtype=torch.float64) * 10
    out = group_normalize(scores, group)
    for gid in range(4):
        a = out[group == gid]
        assert abs(a.mean().item()) < 1e-12
        assert abs(a.std().item() - 1.0) < 1e-5


def test_group_normalize_dr_grpo_is_centered_scores():
    """scale_by_std=False (Dr. GRPO) returns each score minus its group mean, unscaled."""
    g = torch.Generator().manual_seed(9)
    group = torch.tensor([5, 2, 5, 2, 2, 9])
    scores = torch.randn(6, generator=g, dtype=torch.float64)
    out = group_normalize(scores, group, scale_by_std=False)
    expected = torch.empty_like(scores)
    for gid in (5, 2, 9):
        expected[group == gid] = scores[group == gid] - scores[group == gid].mean()
    assert_close(out, expected)
    assert_close(out, naive_group_normalize(scores, group, scale_by_std=False))


# --- per-token rewards ------------------------------------------------------------------------------------------


def test_token_rewards_hand_values():
    """KL penalty on each valid token; the score lands on the last valid token only; padding stays 0."""
    scores = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    out = token_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.25 - 2.0, 0.0, 0.0, 0.0]])
    assert_close(out, expected)


@pytest.mark.parametrize("kl_coef", [0.0, 0.05, 1.0])
def test_token_rewards_match_naive_loop_ragged(kl_coef):
    """Random KL and scores with ragged masks match a per-sequence loop."""
    g = torch.Generator().manual_seed(10)
    lengths = [5, 1, 3, 6, 2]
    mask = ragged_mask(lengths, 6, dtype=torch.float32)
    kl = torch.randn(5, 6, generator=g)
    scores = torch.randn(5, generator=g)
    out = token_rewards(scores, kl, mask, kl_coef)
    expected = torch.zeros(5, 6)
    for b, length in enumerate(lengths):
        for t in range(length):
            expected[b, t] = -kl_coef * kl[b, t]
        expected[b, length - 1] += scores[b]
    assert_close(out, expected)
    assert torch.all(out[mask == 0] == 0)
    # Summed over tokens: score minus the KL penalty of the valid tokens.
    assert_close(out.sum(1), scores - kl_coef * (kl * mask).sum(1))


# --- running moments --------------------------------------------------------------------------------------------


def test_running_moments_match_concatenated_data():
    """After several updates of different sizes and shapes, mean/var/std equal those of all data together."""
    g = torch.Generator().manual_seed(11)
    batches = [
        torch.randn(7, generator=g) * 3 + 2,
        torch.randn(2, 5, generator=g) - 4,
        torch.randn(1, generator=g),
        torch.randn(33, generator=g) * 0.1 + 10,
    ]
    moments = RunningMoments()
    for i, batch in enumerate(batches):
        moments.update(batch)
        seen = torch.cat([b.flatten() for b in batches[: i + 1]]).double()
        assert moments.count == seen.numel()
        assert math.isclose(moments.mean, seen.mean().item(), rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(moments.var, seen.var(unbiased=False).item(), rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(moments.std, seen.std(unbiased=False).item(), rel_tol=1e-9, abs_tol=1e-9)


def test_running_moments_empty_update_is_noop():
    """An empty batch changes nothing."""
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    before = moments.state_dict()
    moments.update(torch.tensor([]))
    assert moments.state_dict() == before


def test_running_moments_state_dict_round_trip():
    """A restored instance has the same state and evolves identically."""
    g = torch.Generator().manual_seed(12)
    a = RunningMoments()
    a.update(torch.randn(10, generator=g))
    a.update(torch.randn(4, generator=g) + 1)
    b = RunningMoments()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    nxt = torch.randn(6, generator=g)
    a.update(nxt)
    b.update(nxt)
    assert b.state_dict() == a.state_dict()
    assert set(a.state_dict()) == {"mean", "var", "count"}


# ------------------------------------------------------------------ the one entry point for every algorithm
def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    kl = torch.rand(4, 4, generator=generator) * mask
    values = torch.randn(4, 4, generator=generator) * mask
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0])
    return scores, kl, values, mask


def test_compute_advantages_gae_is_token_rewards_then_gae_then_whitening():
    scores, kl, values, mask = _batch()
    rewards = token_rewards(scores, kl, mask, 0.1)
    raw, returns = gae_advantages(rewards, values, mask, 1.0, 0.9)
    advantages, got_returns = compute_advantages("gae", scores, kl, mask, kl_coef=0.1, values=values, lam=0.9)
    assert_close(advantages, masked_whiten(raw, mask))
    assert_close(got_returns, returns)
    unwhitened, _ = compute_advantages("gae", scores, kl, mask, kl_coef=0.1, values=values, lam=0.9, whiten=False)
    assert_close(unwhitened, raw)
    no_kl, _ = compute_advantages("gae", scores, kl, mask, kl_coef=0.1, kl_in_reward=False, values=values,
                                  whiten=False)
    assert_close(no_kl, gae_advantages(token_rewards(scores, torch.zeros_like(kl), mask, 0.1), values, mask)[0])


def test_compute_advantages_group_normalizes_the_penalized_score_once():
    scores, kl, _, mask = _batch()
    group = torch.tensor([0, 0, 1, 1])
    advantages, returns = compute_advantages("group", scores, kl, mask, kl_coef=0.5, group=group)
    expected = group_normalize(scores - 0.5 * kl.sum(1), group)[:, None] * mask
    assert returns is None
    assert_close(advantages, expected)
    in_loss, _ = compute_advantages("group", scores, kl, mask, kl_coef=0.5, kl_in_reward=False, group=group)
    assert_close(in_loss, group_normalize(scores, group)[:, None] * mask)


def test_compute_advantages_refuses_missing_inputs():
    scores, kl, _, mask = _batch()
    with pytest.raises(ValueError, match="needs the critic's `values`"):
        compute_advantages("gae", scores, kl, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="needs the prompt ids `group`"):
        compute_advantages("group", scores, kl, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("vtrace", scores, kl, mask, kl_coef=0.1)


def test_masked_whiten_over_fake_ranks_equals_whitening_the_global_batch():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(5))
    mask = (torch.rand(6, 5, generator=torch.Generator().manual_seed(6)) > 0.3).float()
    parts = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    moments = [torch.stack([(a * m).sum(), (a * a * m).sum(), m.sum()]) for a, m in parts]
    total = moments[0] + moments[1]
    sharded = torch.cat([masked_whiten(a, m, reduce=lambda _: total) for a, m in parts])
    assert_close(sharded, masked_whiten(x, mask), atol=1e-5, rtol=1e-5)


def test_transform_scores_normalizes_then_clips():
    moments = RunningMoments()
    moments.update(torch.tensor([0.0, 2.0]))
    assert_close(transform_scores(torch.tensor([0.0, 2.0, 10.0]), moments), torch.tensor([-1.0, 1.0, 9.0]))
    assert_close(transform_scores(torch.tensor([0.0, 2.0, 10.0]), moments, clip=2.0), torch.tensor([-1.0, 1.0, 2.0]))
    assert_close(transform_scores(torch.tensor([0.5, -4.0])), torch.tensor([0.5, -4.0]))
