"""Unit tests of vrpo_pl.losses (KL estimators, PPO clipped losses, VIB, key tokens, aggregation invariants,
diagnostics) and of the adaptive KL controller's update rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence
from torch.testing import assert_close

from vrpo_pl import logprobs, losses
from vrpo_pl.callbacks.kl_control import adaptive_kl_update
from vrpo_pl.logprobs import logprobs_from_logits, token_entropy
from vrpo_pl.losses import (
    aggregate,
    aux_predict_loss,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    key_token_mask,
    key_token_weights,
    kl_estimate,
    pearson,
    reparameterize,
    vib_kl,
)


def ragged_mask(lengths: list[int], width: int, dtype=torch.float64) -> torch.Tensor:
    """(B, width) mask with ones on the first ``lengths[b]`` positions of row b."""
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


# --- log-probs and entropy --------------------------------------------------------------------------------------


def test_logprobs_from_logits_equals_log_softmax_gather():
    """log-probs of the given tokens equal log_softmax(logits) indexed at those tokens."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    out = logprobs_from_logits(logits, tokens)
    expected = torch.stack(
        [torch.stack([torch.log_softmax(logits[b, t], -1)[tokens[b, t]] for t in range(5)]) for b in range(3)]
    )
    assert out.shape == (3, 5)
    assert_close(out, expected)
    assert torch.all(out <= 0)


def test_logprobs_from_logits_upcasts_to_float32():
    """Low-precision logits give float32 log-probs."""
    logits = torch.randn(2, 3, 7).to(torch.bfloat16)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    assert logprobs_from_logits(logits, tokens).dtype == torch.float32
    assert token_entropy(logits).dtype == torch.float32


def test_token_entropy_equals_categorical_entropy():
    """Entropy of each next-token distribution equals torch.distributions.Categorical's."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 13, generator=g) * 3
    assert_close(token_entropy(logits), Categorical(logits=logits).entropy())


def test_token_entropy_bounds():
    """Uniform logits give log V; a near one-hot distribution gives ~0."""
    assert_close(token_entropy(torch.zeros(1, 10)), torch.tensor([math.log(10)]))
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    assert token_entropy(peaked).item() < 1e-6


def test_token_entropy_handles_masked_logits():
    """A vocabulary entry with logit -inf has probability 0 and contributes 0 (0 log 0 = 0), not NaN."""
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert_close(token_entropy(logits), torch.tensor([math.log(2)]))


# --- KL estimators ----------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    """k1 = logp - ref, k2 = 0.5 (ref - logp)^2, k3 = exp(ref - logp) - 1 - (ref - logp), by hand."""
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-2.0, -1.0, -0.5], dtype=torch.float64)
    assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    k3 = torch.tensor([math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1, 0.0], dtype=torch.float64)
    assert_close(kl_estimate(logp, ref, "k3"), k3)


def test_kl_default_estimator_is_k1():
    """The default estimator is k1."""
    logp, ref = torch.tensor([-0.3]), torch.tensor([-1.3])
    assert_close(kl_estimate(logp, ref), kl_estimate(logp, ref, "k1"))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_zero_when_policies_agree(estimator):
    """Every estimator is exactly 0 when logp == ref_logp."""
    logp = -torch.rand(4, 6) * 5
    assert torch.all(kl_estimate(logp, logp.clone(), estimator) == 0)


def test_kl_k3_nonnegative_and_finite():
    """k3 >= 0 for any log-ratio, including ratios far beyond exp()'s range (the clamp keeps it finite)."""
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(1000, generator=g) * 10
    ref = torch.randn(1000, generator=g) * 10
    extreme_logp = torch.tensor([0.0, -200.0, 0.0, -1e4])
    extreme_ref = torch.tensor([-200.0, 0.0, -1e4, 0.0])
    for lp, rf in ((logp, ref), (extreme_logp, extreme_ref)):
        k3 = kl_estimate(lp, rf, "k3")
        assert torch.all(k3 >= 0)
        assert torch.all(torch.isfinite(k3))


def test_kl_k2_is_half_k1_squared():
    """k2 = 0.5 * k1^2 elementwise."""
    g = torch.Generator().manual_seed(3)
    logp, ref = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert_close(kl_estimate(logp, ref, "k2"), 0.5 * kl_estimate(logp, ref, "k1") ** 2)


def test_kl_unknown_estimator_raises():
    """An unknown estimator name raises a ValueError naming it."""
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


def test_kl_k1_and_k3_are_unbiased_for_sampled_tokens():
    """For tokens sampled from pi, the sample means of k1 and k3 estimate KL(pi || pi_ref) (seeded, 200k draws)."""
    g = torch.Generator().manual_seed(4)
    pi = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    true_kl = (pi * (pi.log() - ref.log())).sum()
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    logp, ref_logp = pi.log()[tokens], ref.log()[tokens]
    k1, k3 = kl_estimate(logp, ref_logp, "k1"), kl_estimate(logp, ref_logp, "k3")
    for est in (k1, k3):
        stderr = est.std() / math.sqrt(est.numel())
        assert abs(est.mean() - true_kl) < max(5 * stderr, 1e-3)
        assert abs(est.mean() - true_kl) < 0.01
    # k2 is biased but close for close distributions; it is non-negative.
    assert torch.all(kl_estimate(logp, ref_logp, "k2") >= 0)


# --- PPO clipped policy loss ------------------------------------------------------------------------------------


def policy_case(delta: float, advantage: float, eps: float = 0.2):
    """One token with log-ratio ``delta``; returns (loss, clipped, ratio, d loss / d logp)."""
    old = torch.tensor([[0.0]], dtype=torch.float64)
    logp = (old + delta).requires_grad_()
    loss, clipped, ratio = clipped_policy_loss(logp, old, torch.tensor([[advantage]], dtype=torch.float64), eps)
    loss.sum().backward()
    return loss.item(), clipped.item(), ratio.item(), logp.grad.item()


@pytest.mark.parametrize("advantage", [2.0, 0.5])
def test_policy_loss_positive_advantage_above_range_is_clipped(advantage):
    """A > 0, ratio > 1 + eps: loss = -A (1 + eps), clipped, zero gradient."""
    loss, clipped, ratio, grad = policy_case(math.log(1.5), advantage)
    assert math.isclose(ratio, 1.5)
    assert math.isclose(loss, -advantage * 1.2)
    assert clipped == 1.0
    assert grad == 0.0


@pytest.mark.parametrize("advantage", [-2.0, -0.5])
def test_policy_loss_negative_advantage_below_range_is_clipped(advantage):
    """A < 0, ratio < 1 - eps: loss = -A (1 - eps), clipped, zero gradient."""
    loss, clipped, ratio, grad = policy_case(math.log(0.5), advantage)
    assert math.isclose(loss, -advantage * 0.8)
    assert clipped == 1.0
    assert grad == 0.0


@pytest.mark.parametrize("delta", [math.log(0.9), 0.0, math.log(1.1)])
@pytest.mark.parametrize("advantage", [1.7, -1.7])
def test_policy_loss_inside_range_is_unclipped(delta, advantage):
    """Ratio inside [1 - eps, 1 + eps]: loss = -A ratio, not clipped, d loss / d logp = -A ratio."""
    loss, clipped, ratio, grad = policy_case(delta, advantage)
    assert math.isclose(ratio, math.exp(delta))
    assert math.isclose(loss, -advantage * ratio)
    assert clipped == 0.0
    assert math.isclose(grad, -advantage * ratio)


@pytest.mark.parametrize("delta,advantage", [(math.log(1.5), -1.0), (math.log(0.5), 1.0)])
def test_policy_loss_pessimistic_side_is_not_clipped(delta, advantage):
    """Outside the range on the side that hurts (A < 0 with large ratio, A > 0 with small ratio): unclipped."""
    loss, clipped, ratio, grad = policy_case(delta, advantage)
    assert math.isclose(loss, -advantage * ratio)
    assert clipped == 0.0
    assert math.isclose(grad, -advantage * ratio)


@pytest.mark.parametrize("ratio_value,advantage", [(1.25, 2.0), (0.75, -3.0), (1.25, -2.0), (0.75, 3.0)])
def test_policy_loss_ratio_exactly_at_boundary(ratio_value, advantage):
    """Ratio exactly 1 +- eps: loss = -A ratio, the clipped indicator is 0, the gradient is -A ratio."""
    delta = math.log(ratio_value)
    exact_ratio = torch.exp(torch.tensor(delta, dtype=torch.float64)).item()
    eps = abs(exact_ratio - 1.0)  # exact (Sterbenz), so 1 +- eps reproduces the computed ratio bit for bit
    assert 1.0 + eps == exact_ratio or 1.0 - eps == exact_ratio
    loss, clipped, ratio, grad = policy_case(delta, advantage, eps=eps)
    assert ratio == exact_ratio
    assert math.isclose(loss, -advantage * ratio)
    assert clipped == 0.0
    assert math.isclose(grad, -advantage * ratio)


def test_policy_loss_batch_matches_formula_and_indicator():
    """On random tokens, loss = max(-A r, -A clip(r)) and the indicator marks exactly the strictly larger branch."""
    g = torch.Generator().manual_seed(5)
    old = torch.randn(6, 9, generator=g, dtype=torch.float64)
    logp = old + 0.5 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    adv = torch.randn(6, 9, generator=g, dtype=torch.float64)
    loss, clipped, ratio = clipped_policy_loss(logp, old, adv, 0.2)
    assert_close(ratio, torch.exp(logp - old))
    expected_clip = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    assert torch.equal(clipped.bool(), expected_clip)
    assert_close(loss, torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)))


# --- clipped value loss -----------------------------------------------------------------------------------------


def value_case(v: float, old: float, ret: float, clip: float | None = 0.2):
    values = torch.tensor([[v]], dtype=torch.float64, requires_grad=True)
    loss, clipped = clipped_value_loss(
        values, torch.tensor([[old]], dtype=torch.float64), torch.tensor([[ret]], dtype=torch.float64), clip
    )
    loss.sum().backward()
    return loss.item(), clipped.item(), values.grad.item()


def test_value_loss_clipped_branch_dominates_has_zero_gradient():
    """V=1.5, V_old=1, R=2: V_clip=1.2, loss 0.5 * 0.8^2 = 0.32, clipped, gradient 0 (clamp saturated)."""
    loss, clipped, grad = value_case(1.5, 1.0, 2.0)
    assert math.isclose(loss, 0.32)
    assert clipped == 1.0
    assert grad == 0.0


def test_value_loss_unclipped_branch_dominates():
    """V=1.5, V_old=1, R=1: unclipped error 0.25 beats clipped 0.04; loss 0.125, gradient V - R = 0.5."""
    loss, clipped, grad = value_case(1.5, 1.0, 1.0)
    assert math.isclose(loss, 0.125)
    assert clipped == 0.0
    assert math.isclose(grad, 0.5)


def test_value_loss_inside_clip_range_is_plain_mse():
    """|V - V_old| <= clip: both branches agree; loss 0.5 (V - R)^2, not clipped, gradient V - R."""
    loss, clipped, grad = value_case(1.1, 1.0, 2.0)
    assert math.isclose(loss, 0.5 * 0.9**2)
    assert clipped == 0.0
    assert math.isclose(grad, 1.1 - 2.0)


def test_value_loss_without_clip_is_half_mse():
    """clip=None: 0.5 * (V - R)^2 everywhere and a zero indicator, even far from V_old."""
    g = torch.Generator().manual_seed(6)
    values, old, ret = (torch.randn(4, 5, generator=g) * 3 for _ in range(3))
    loss, clipped = clipped_value_loss(values, old, ret, clip=None)
    assert_close(loss, 0.5 * (values - ret) ** 2)
    assert torch.all(clipped == 0)
    loss, _, grad = value_case(5.0, 0.0, 1.0, clip=None)
    assert math.isclose(loss, 8.0)
    assert math.isclose(grad, 4.0)


def test_value_loss_batch_matches_formula():
    """On random values the loss is 0.5 max((V - R)^2, (V_clip - R)^2) and the indicator marks the larger."""
    g = torch.Generator().manual_seed(7)
    values, old, ret = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    loss, clipped = clipped_value_loss(values, old, ret, clip=0.3)
    v_clip = old + (values - old).clamp(-0.3, 0.3)
    assert_close(loss, 0.5 * torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2))
    assert torch.equal(clipped.bool(), (v_clip - ret) ** 2 > (values - ret) ** 2)
    assert torch.all(loss >= 0.5 * (values - ret) ** 2)


# --- VIB --------------------------------------------------------------------------------------------------------


def test_vib_kl_matches_closed_form_and_torch_distributions():
    """vib_kl equals 0.5 sum(mu^2 + sigma^2 - log sigma^2 - 1) and KL(Normal(mu, sigma) || Normal(0, 1)).sum(-1)."""
    g = torch.Generator().manual_seed(8)
    mu = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    out = vib_kl(mu, logvar)
    assert out.shape == (3, 4)
    closed = 0.5 * (mu**2 + logvar.exp() - logvar - 1).sum(-1)
    assert_close(out, closed)
    sigma = torch.exp(0.5 * logvar)
    reference = kl_divergence(Normal(mu, sigma), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
    assert_close(out, reference)
    assert torch.all(out >= 0)


def test_vib_kl_zero_at_standard_normal():
    """mu = 0, logvar = 0 gives KL exactly 0, and the gradient there is 0."""
    mu = torch.zeros(2, 3, 5, requires_grad=True)
    logvar = torch.zeros(2, 3, 5, requires_grad=True)
    out = vib_kl(mu, logvar)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(mu.grad == 0)
    assert torch.all(logvar.grad == 0)


def test_vib_kl_hand_value():
    """One dimension, mu = 1, sigma^2 = e: 0.5 (1 + e - 1 - 1) = 0.5 (e - 1)."""
    assert_close(vib_kl(torch.tensor([[[1.0]]]), torch.tensor([[[1.0]]])), torch.tensor([[0.5 * (math.e - 1)]]))


def test_reparameterize_sample_moments():
    """z = mu + sigma eps has mean mu and std sigma (seeded, 200k samples)."""
    g = torch.Generator().manual_seed(9)
    mu = torch.full((200_000,), 2.0)
    logvar = torch.full((200_000,), math.log(0.25))
    z = reparameterize(mu, logvar, generator=g)
    assert z.shape == mu.shape and z.dtype == mu.dtype
    assert abs(z.mean().item() - 2.0) < 0.01
    assert abs(z.std().item() - 0.5) < 0.01


def test_reparameterize_is_deterministic_with_a_seed_and_differentiable():
    """Same seed, same z; another seed, another z; dz/dmu = 1 and dz/dlogvar = 0.5 sigma eps."""
    mu = torch.randn(4, 3, 8, requires_grad=True)
    logvar = torch.randn(4, 3, 8, requires_grad=True)
    z1 = reparameterize(mu, logvar, torch.Generator().manual_seed(10))
    z2 = reparameterize(mu, logvar, torch.Generator().manual_seed(10))
    z3 = reparameterize(mu, logvar, torch.Generator().manual_seed(11))
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, z3)
    z1.sum().backward()
    assert torch.all(mu.grad == 1)
    eps = (z1 - mu) / torch.exp(0.5 * logvar)
    assert_close(logvar.grad, (0.5 * torch.exp(0.5 * logvar) * eps).detach())


def test_reparameterize_zero_variance_limit_is_mu():
    """A very negative logvar gives z ~ mu."""
    mu = torch.randn(10)
    z = reparameterize(mu, torch.full((10,), -60.0), torch.Generator().manual_seed(0))
    assert_close(z, mu)


# --- key tokens and the auxiliary loss --------------------------------------------------------------------------


def test_key_token_mask_quantile_selects_top_share_of_valid_tokens():
    """q = 0.8 over 10 distinct valid signals marks the top 2; padding (even with a huge signal) never counts."""
    signal = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 99.0], [5.0, 6.0, 7.0, 8.0, 9.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    key = key_token_mask(signal, mask, quantile=0.8)
    expected = torch.zeros(2, 6)
    expected[1, 3:5] = 1.0
    assert torch.equal(key, expected)
    assert key.dtype == torch.float32


@pytest.mark.parametrize("quantile", [0.5, 0.8, 0.9])
def test_key_token_mask_share_on_random_signal(quantile):
    """On distinct random signals with ragged masks, about (1 - q) of the valid tokens are key, all valid."""
    g = torch.Generator().manual_seed(12)
    mask = ragged_mask([40, 17, 33, 50], 50, dtype=torch.float32)
    signal = torch.rand(4, 50, generator=g)
    key = key_token_mask(signal, mask, quantile=quantile)
    n_valid = int(mask.sum())
    assert abs(key.sum().item() - (1 - quantile) * n_valid) <= 1.0
    assert torch.all(key[mask == 0] == 0)
    # Every key token's signal is at least every non-key valid token's.
    valid = mask.bool()
    assert signal[(key == 1)].min() >= signal[valid & (key == 0)].max()


def test_key_token_mask_threshold_overrides_quantile():
    """A fixed threshold wins over the quantile; padding above the threshold is still not key."""
    signal = torch.tensor([[0.5, 1.5, 2.5, 3.5], [4.5, 0.1, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    key = key_token_mask(signal, mask, quantile=0.99, threshold=2.0)
    assert torch.equal(key, torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    key = key_token_mask(signal, mask, quantile=None, threshold=2.0)
    assert torch.equal(key, torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("threshold", [None, 0.0])
def test_key_token_mask_empty_mask_gives_zeros(threshold):
    """No valid token: no key token (no error from an empty quantile)."""
    signal = torch.randn(3, 4)
    key = key_token_mask(signal, torch.zeros(3, 4), quantile=0.8, threshold=threshold)
    assert torch.equal(key, torch.zeros(3, 4))


def test_key_token_mask_no_criterion_gives_zeros():
    """quantile=None and threshold=None: nothing is key."""
    key = key_token_mask(torch.randn(2, 3), torch.ones(2, 3), quantile=None, threshold=None)
    assert torch.equal(key, torch.zeros(2, 3))


def test_aux_predict_loss_with_and_without_weight():
    """Per-token MSE averaged over the K targets; the weight multiplies each token's loss."""
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, -1.0], [2.0, 2.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 2.0]], [[3.0, 1.0], [2.0, 2.0]]])
    expected = torch.tensor([[(1.0 + 4.0) / 2, 4.0 / 2], [4.0 / 2, 0.0]])
    assert_close(aux_predict_loss(pred, target), expected)
    weight = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    assert_close(aux_predict_loss(pred, target, weight), expected * weight)


def test_aux_predict_loss_gradient():
    """d loss / d prediction = 2 (pred - target) / K."""
    g = torch.Generator().manual_seed(13)
    pred = torch.randn(2, 3, 2, generator=g, requires_grad=True)
    target = torch.randn(2, 3, 2, generator=g)
    aux_predict_loss(pred, target).sum().backward()
    assert_close(pred.grad, (pred - target).detach())


def test_key_token_weights():
    """w_t = 1 + alpha * key_t; alpha = 0 gives all ones."""
    key = torch.tensor([[1.0, 0.0, 1.0]])
    assert_close(key_token_weights(key, 2.0), torch.tensor([[3.0, 1.0, 3.0]]))
    assert_close(key_token_weights(key, 0.0), torch.ones(1, 3))


# --- aggregation and the accumulation invariants ----------------------------------------------------------------


def test_aggregate_hand_values():
    """token_mean = masked sum / tokens; seq_mean_token_mean = mean over rows of each row's token mean."""
    loss = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert_close(aggregate(loss, mask, "token_mean"), torch.tensor(10.0 / 4))
    assert_close(aggregate(loss, mask, "seq_mean_token_mean"), torch.tensor((2.0 + 4.0) / 2))
    assert_close(aggregate(loss, mask), torch.tensor(10.0 / 4))  # default mode
    assert_close(aggregate(loss, mask, "token_mean", num_tokens=8), torch.tensor(10.0 / 8))
    assert_close(aggregate(loss, mask, "seq_mean_token_mean", num_seqs=4), torch.tensor(6.0 / 4))


def test_aggregate_empty_mask_is_zero_not_nan():
    """No valid token: both modes give 0."""
    loss, mask = torch.randn(2, 3), torch.zeros(2, 3)
    assert aggregate(loss, mask, "token_mean").item() == 0.0
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == 0.0


def test_aggregate_unknown_mode_raises():
    """An unknown mode raises a ValueError naming it."""
    with pytest.raises(ValueError, match="sum"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "sum")


def accumulation_setup():
    """A parameter, a ragged mask of 4 sequences, and a per-token loss function of the parameter."""
    g = torch.Generator().manual_seed(14)
    mask = ragged_mask([7, 2, 5, 4], 7)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    y = torch.randn(4, 7, generator=g, dtype=torch.float64)
    w = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()

    def per_token_loss(rows: slice) -> torch.Tensor:
        return (w * x[rows] - y[rows]) ** 2 + torch.sin(w) * x[rows]

    return w, mask, per_token_loss


@pytest.mark.parametrize("micro", [1, 2, 4])
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_aggregate_micro_batch_accumulation_is_exact(mode, micro):
    """Summing micro-batch losses divided by the mini-batch's counts equals the mini-batch loss (1x4 == 4x1),
    and the accumulated gradients are equal."""
    w, mask, per_token_loss = accumulation_setup()
    full = aggregate(per_token_loss(slice(0, 4)), mask, mode)
    (full_grad,) = torch.autograd.grad(full, w)

    total_tokens, total_seqs = mask.sum().item(), mask.shape[0]
    accumulated = torch.zeros((), dtype=torch.float64)
    for start in range(0, 4, micro):
        rows = slice(start, start + micro)
        part = aggregate(per_token_loss(rows), mask[rows], mode, num_tokens=total_tokens, num_seqs=total_seqs)
        part.backward()  # gradients accumulate in w.grad, as in gradient accumulation
        accumulated = accumulated + part.detach()
    assert_close(accumulated, full.detach())
    assert_close(w.grad, full_grad)


def test_aggregate_micro_batches_without_global_count_differ():
    """Control: averaging per-micro-batch token means does not give the mini-batch token mean on ragged masks."""
    w, mask, per_token_loss = accumulation_setup()
    full = aggregate(per_token_loss(slice(0, 4)), mask).item()
    naive = sum(aggregate(per_token_loss(slice(i, i + 1)), mask[i : i + 1]).item() for i in range(4)) / 4
    assert not math.isclose(naive, full, rel_tol=1e-6)


def test_aggregate_token_mean_over_fake_ranks_equals_global():
    """Two fake ranks each divide by global_tokens / 2; averaging their losses (and gradients, as DDP does)
    equals the global token mean."""
    w, mask, per_token_loss = accumulation_setup()
    full = aggregate(per_token_loss(slice(0, 4)), mask)
    (full_grad,) = torch.autograd.grad(full, w)
    global_tokens = mask.sum().item()
    losses, grads = [], []
    for rows in (slice(0, 2), slice(2, 4)):  # rank 0 holds 9 tokens, rank 1 holds 9 (lengths 7+2, 5+4)
        loss = aggregate(per_token_loss(rows), mask[rows], "token_mean", num_tokens=global_tokens / 2)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, w)[0])
    assert_close((losses[0] + losses[1]) / 2, full)
    assert_close((grads[0] + grads[1]) / 2, full_grad)


def test_aggregate_fake_ranks_with_unequal_token_counts():
    """Ranks holding different numbers of tokens (7+5 vs 2+4) still average to the global token mean."""
    w, mask, per_token_loss = accumulation_setup()
    full = aggregate(per_token_loss(slice(0, 4)), mask)
    global_tokens = mask.sum().item()
    rank_rows = ([0, 2], [1, 3])
    losses = [
        aggregate(per_token_loss(rows), mask[rows], "token_mean", num_tokens=global_tokens / 2) for rows in rank_rows
    ]
    assert_close((losses[0] + losses[1]) / 2, full)


# --- diagnostics ------------------------------------------------------------------------------------------------


def test_explained_variance_perfect_constant_and_degenerate():
    """1 for a perfect prediction, ~0 for the mean as a constant, nan for constant returns or < 2 tokens."""
    g = torch.Generator().manual_seed(15)
    mask = ragged_mask([6, 3, 5], 6, dtype=torch.float32)
    returns = torch.randn(3, 6, generator=g)
    values = torch.where(mask.bool(), returns, torch.full_like(returns, 50.0))  # garbage on padding
    assert_close(explained_variance(values, returns, mask), torch.tensor(1.0))
    mean = returns[mask.bool()].mean()
    assert abs(explained_variance(torch.full_like(returns, mean.item()), returns, mask).item()) < 1e-5
    assert torch.isnan(explained_variance(values, torch.full_like(returns, 2.0), mask))
    one = torch.zeros(3, 6)
    one[0, 0] = 1.0
    assert torch.isnan(explained_variance(values, returns, one))


def test_explained_variance_formula():
    """Equals 1 - Var(R - V) / Var(R) over valid tokens."""
    g = torch.Generator().manual_seed(16)
    mask = ragged_mask([4, 6], 6, dtype=torch.float32)
    returns, values = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    r, v = returns[mask.bool()], values[mask.bool()]
    assert_close(explained_variance(values, returns, mask), 1 - (r - v).var() / r.var())


def test_pearson_matches_corrcoef_and_extremes():
    """Equals torch.corrcoef on valid positions; +1 / -1 for affine maps; nan when undefined."""
    g = torch.Generator().manual_seed(17)
    mask = ragged_mask([5, 2, 6], 6, dtype=torch.float32)
    x, y = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    valid = mask.bool()
    expected = torch.corrcoef(torch.stack([x[valid], y[valid]]))[0, 1]
    assert_close(pearson(x, y, mask), expected)
    assert_close(pearson(x, 3 * x + 1, mask), torch.tensor(1.0))
    assert_close(pearson(x, -2 * x, mask), torch.tensor(-1.0))
    assert torch.isnan(pearson(x, torch.ones_like(x), mask))
    one = torch.zeros(3, 6)
    one[1, 0] = 1
    assert torch.isnan(pearson(x, y, one))


# --- adaptive KL controller -------------------------------------------------------------------------------------


def test_adaptive_kl_hand_value():
    """kl = 2 target: error clipped to 0.2; coef 0.1 -> 0.1 (1 + 0.2 * 100 / 10000) = 0.1002."""
    assert math.isclose(adaptive_kl_update(0.1, 12.0, 6.0, 10000, 100), 0.1002)
    assert math.isclose(adaptive_kl_update(0.1, 6.6, 6.0, 1000, 100), 0.1 * (1 + 0.1 * 0.1))


def test_adaptive_kl_direction():
    """Above target the coefficient grows, below it shrinks, at target it stays."""
    assert adaptive_kl_update(0.05, 7.0, 6.0, 10000, 64) > 0.05
    assert adaptive_kl_update(0.05, 5.0, 6.0, 10000, 64) < 0.05
    assert adaptive_kl_update(0.05, 6.0, 6.0, 10000, 64) == 0.05


@pytest.mark.parametrize("kl,error", [(1000.0, 0.2), (6.0 * 1.2, 0.2), (0.0, -0.2), (-5.0, -0.2), (3.0, -0.2)])
def test_adaptive_kl_error_clipped(kl, error):
    """The proportional error kl / target - 1 is clipped to [-0.2, 0.2]."""
    coef, target, horizon, n = 0.2, 6.0, 1000, 50
    assert math.isclose(adaptive_kl_update(coef, kl, target, horizon, n), coef * (1 + error * n / horizon))


def test_summable_correlation_and_explained_variance_match_the_tensor_versions():
    """The sum-based forms used across micro-batches and ranks equal the direct tensor computations."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    y = y + 0.5 * x
    mask = torch.ones(50, dtype=torch.float64)
    sums = {"x": x.sum(), "y": y.sum(), "xx": (x * x).sum(), "yy": (y * y).sum(), "xy": (x * y).sum()}
    corr = losses.correlation_from_sums({k: float(v) for k, v in sums.items()}, 50.0)
    assert abs(corr - float(losses.pearson(x, y, mask))) < 1e-6, "pearson works in float32"
    r, v = y, 0.8 * y + 0.1 * x
    e = r - v
    ev = losses.explained_variance_from_sums(float(r.sum()), float((r * r).sum()), float(e.sum()),
                                             float((e * e).sum()), 50.0)
    # explained_variance uses unbiased variances; the ratio is the same.
    assert abs(ev - float(losses.explained_variance(v, r, mask))) < 1e-6
    constant = {"x": 50.0, "y": float(y.sum()), "xx": 50.0, "yy": float((y * y).sum()), "xy": float(y.sum())}
    assert losses.correlation_from_sums(constant, 50.0) == 0.0, "a constant has no correlation"


# ------------------------------------------------------------------ the objectives the update assembles
def _policy_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 11, generator=generator)
    tokens = torch.randint(0, 11, (3, 4), generator=generator)
    old = logprobs.logprobs_from_logits(logits, tokens) + 0.1 * torch.randn(3, 4, generator=generator)
    advantages = torch.randn(3, 4, generator=generator)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    return logits, tokens, old, advantages, mask


def test_logprobs_and_entropy_match_the_separate_functions():
    logits, tokens, *_ = _policy_inputs()
    logp, entropy = logprobs.logprobs_and_entropy(logits, tokens, temperature=0.7)
    torch.testing.assert_close(logp, logprobs.logprobs_from_logits(logits / 0.7, tokens))
    torch.testing.assert_close(entropy, logprobs.token_entropy(logits / 0.7))
    assert not entropy.requires_grad


def test_policy_objective_is_the_clipped_surrogate_plus_its_terms():
    logits, tokens, old, advantages, mask = _policy_inputs()
    logits.requires_grad_(True)
    logp, entropy = logprobs.logprobs_and_entropy(logits, tokens, entropy_grad=True)
    ref = old - 0.2
    loss, stats = losses.policy_objective(logp, entropy, old, advantages, mask, entropy_coef=0.01, ref_logp=ref,
                                          kl_coef=0.1, kl_estimator="k3")
    per_token, clipped, ratio = losses.clipped_policy_loss(logp, old, advantages)
    expected = (losses.aggregate(per_token, mask) - 0.01 * losses.aggregate(entropy, mask)
                + 0.1 * losses.aggregate(losses.kl_estimate(logp, ref, "k3"), mask))
    torch.testing.assert_close(loss, expected)
    assert set(stats) == {"loss/policy", "loss/kl", "policy/clipfrac", "policy/approx_kl", "policy/entropy",
                          "policy/ratio_mean"}
    torch.testing.assert_close(stats["policy/ratio_mean"], ratio.detach())
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    plain, plain_stats = losses.policy_objective(logp.detach(), entropy.detach(), old, advantages, mask)
    assert "loss/kl" not in plain_stats
    torch.testing.assert_close(plain, losses.aggregate(per_token.detach(), mask))


@pytest.mark.parametrize("aux", ["predict", "weight", "none"])
def test_critic_objective_sums_value_vib_and_auxiliary_terms(aux):
    generator = torch.Generator().manual_seed(1)
    values, old, returns = (torch.randn(3, 4, generator=generator) for _ in range(3))
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    mu, logvar = torch.randn(3, 4, 5, generator=generator), torch.randn(3, 4, 5, generator=generator)
    predictions, targets = torch.randn(3, 4, 2, generator=generator), torch.randn(3, 4, 2, generator=generator)
    key = (torch.rand(3, 4, generator=generator) > 0.5).float() * mask
    loss, stats, correlations = losses.critic_objective(
        values, old, returns, mask, value_clip=0.2, mu=mu, logvar=logvar, beta=1e-3, aux=aux,
        aux_predictions=predictions, aux_targets=targets, aux_coef=0.1, key=key, key_alpha=2.0)
    value_loss, clipped = losses.clipped_value_loss(values, old, returns, 0.2)
    if aux == "weight":
        value_loss = value_loss * (1 + 2.0 * key)
    expected = losses.aggregate(value_loss, mask) + 1e-3 * losses.aggregate(losses.vib_kl(mu, logvar), mask)
    if aux == "predict":
        expected = expected + 0.1 * losses.aggregate(losses.aux_predict_loss(predictions, targets), mask)
    torch.testing.assert_close(loss, expected)
    assert {"loss/value", "value/clipfrac", "loss/vib_kl", "vib/sigma"} <= set(stats)
    assert ("loss/aux" in stats) == (aux != "none")
    assert set(correlations) == ({"aux/corr_entropy", "aux/corr_surprisal"} if aux == "predict" else set())
    if aux == "predict":
        x, y = correlations["aux/corr_entropy"]
        assert x.shape == y.shape == (int(mask.sum()),)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_token_logprobs_match_the_full_log_softmax_and_its_gradient(dtype, monkeypatch):
    """The chunked primitive (forced to 3-row chunks) equals log_softmax + gather in value and gradient, and the
    entropy equals the categorical entropy."""
    monkeypatch.setattr(logprobs, "_CHUNK_ELEMENTS", 3 * 13)
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 5, 13, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, 13, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g)
    chunked = logits.clone().requires_grad_(True)
    logp, entropy = logprobs.token_logprobs_and_entropy(chunked, tokens, temperature=0.7)
    (logp * weights).sum().backward()
    full = logits.clone().float().requires_grad_(True)
    expected = torch.log_softmax(full / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    (expected * weights).sum().backward()
    assert_close(logp, expected.detach(), atol=1e-5, rtol=1e-5)
    assert_close(entropy, Categorical(logits=full.detach() / 0.7).entropy(), atol=1e-5, rtol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # the gradient is returned in the logits' dtype
    assert chunked.grad.dtype == dtype
    assert_close(chunked.grad.float(), full.grad, atol=tol, rtol=tol)
    assert not entropy.requires_grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_over_chosen_rows_match_the_gathered_full_log_softmax(dtype, temperature, monkeypatch):
    """With ``rows`` (forced to 3-token chunks): tokens read the rows they name (one row by several tokens, one row
    by none); values and entropies equal the full log-softmax at those rows, the gradient reaches each row as the
    sum of its tokens' and no other row."""
    monkeypatch.setattr(logprobs, "_CHUNK_ELEMENTS", 3 * 13)
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 13, generator=g) * 3).to(dtype)
    rows = torch.tensor([4, 0, 0, 2, 0, 5, 1])  # row 0 read three times, row 3 never
    tokens = torch.randint(0, 13, (7,), generator=g)
    weights = torch.randn(7, generator=g)
    chosen = logits.clone().requires_grad_(True)
    logp, entropy = logprobs.token_logprobs_and_entropy(chosen, tokens, temperature, rows=rows)
    (logp * weights).sum().backward()
    full = logits.clone().float().requires_grad_(True)
    lsm = torch.log_softmax(full / temperature, -1)[rows]
    (lsm.gather(-1, tokens[:, None])[:, 0] * weights).sum().backward()
    assert_close(logp, lsm.gather(-1, tokens[:, None])[:, 0].detach(), atol=1e-5, rtol=1e-5)
    assert_close(entropy, Categorical(logits=full.detach()[rows] / temperature).entropy(), atol=1e-5, rtol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert_close(chosen.grad.float(), full.grad, atol=tol, rtol=tol)
    assert not chosen.grad[3].any()
    with pytest.raises(ValueError, match="rows"):
        logprobs.token_logprobs_and_entropy(chosen, tokens[:, None], rows=rows)


def test_token_logits_give_the_dense_logprobs_with_zeros_at_padding_and_reuse_a_normalization(monkeypatch):
    """TokenLogits over a plain pass's (B, A, V) logits: log-probs and entropies equal the dense computation at
    the response tokens and are 0 at padding; ``dense()`` is the pass's tensor; without gradient, the reference's
    log-probs then the guide's entropy from the same logits normalize once; with gradient, every call computes."""
    g = torch.Generator().manual_seed(5)
    dense = torch.randn(2, 4, 11, generator=g)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    tokens = torch.randint(0, 11, (2, 4), generator=g)
    token_logits = logprobs.TokenLogits.from_dense(dense, valid)
    assert token_logits.dense() is dense
    calls = []
    original = logprobs.token_logprobs_and_entropy
    monkeypatch.setattr(logprobs, "token_logprobs_and_entropy", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        logp, entropy = token_logits.token_stats(tokens, 1.0, with_entropy=True)
        again, none = token_logits.token_stats(tokens, 1.0, with_entropy=False)
        assert again is logp and none is None and len(calls) == 1
        token_logits.token_stats(tokens, 0.5, with_entropy=False)  # another temperature: computed
        assert len(calls) == 2
    expected_logp, expected_entropy = original(dense, tokens)
    assert_close(logp[valid], expected_logp[valid])
    assert_close(entropy[valid], expected_entropy[valid])
    assert not logp[~valid].any() and not entropy[~valid].any()
    token_logits.token_stats(tokens, 1.0)
    token_logits.token_stats(tokens, 1.0)
    assert len(calls) == 4


def test_spread_rows_fills_the_grid_and_adds_gradients_of_shared_rows():
    """Position j of the valid mask takes outputs[rows[j]], padding 0; a row read twice gets both gradients."""
    outputs = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    valid = torch.tensor([[True, False], [True, True]])
    spread = logprobs.spread_rows(outputs, torch.tensor([1, 1, 0]), valid)
    assert spread.tolist() == [[[3.0, 4.0], [0.0, 0.0]], [[3.0, 4.0], [1.0, 2.0]]]
    spread.sum().backward()
    assert outputs.grad.tolist() == [[1.0, 1.0], [2.0, 2.0]]
