"""Losses and per-token statistics of PPO, GRPO and VRPO: pure functions of tensors (torch only).

Shapes: B sequences, A response tokens, V vocabulary, Z the VIB latent size. Per-token losses are returned
unreduced, (B, A); :func:`aggregate` reduces them, so that gradient accumulation and data parallelism can divide
by the token count of the whole mini-batch (the micro-batch 1x4 == 4x1 invariant).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
LossAggregation = Literal["token_mean", "seq_mean_token_mean"]


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens (Schulman, 2020).

    With log r = log pi_ref - log pi: k1 = -log r (unbiased, high variance, can be negative),
    k2 = 0.5 (log r)^2, k3 = (r - 1) - log r (unbiased, always >= 0).

    Args:
        logp: (B, A) log pi of the sampled tokens.
        ref_logp: (B, A) log pi_ref of the same tokens.
        estimator: "k1", "k2" or "k3".

    Returns:
        (B, A) KL estimates.

    >>> kl_estimate(torch.tensor([-1.0]), torch.tensor([-1.0]), "k3")
    tensor([0.])
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # Clamp the exponent: a token the reference finds far likelier than the policy would overflow exp().
        return torch.exp(log_ratio.clamp(max=20.0)) - 1 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1', 'k2' or 'k3'")


def clipped_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate, per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    Args:
        logp: (B, A) log pi_theta of the sampled tokens (with gradient).
        old_logp: (B, A) log pi_old from the rollout.
        advantages: (B, A).
        clip_eps: clip range epsilon (0.2, Schulman et al. 2017).

    Returns:
        ``(loss, clipped, ratio)``, each (B, A): per-token loss, 1.0 where the clipped branch was taken,
        and the probability ratio.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(unclipped, clipped)
    return loss, (clipped > unclipped).float(), ratio


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value regression, per token: 0.5 * max((V - R)^2, (V_clip - R)^2).

    V_clip = V_old + clip(V - V_old, -clip, clip) (PPO2 baselines; Secrets of RLHF I). ``clip=None`` gives
    plain MSE.

    Args:
        values: (B, A) new value predictions (with gradient).
        old_values: (B, A) values from the rollout.
        returns: (B, A) regression targets.
        clip: clip range, or None.

    Returns:
        ``(loss, clipped)``, each (B, A); ``clipped`` is 1.0 where the clipped error was the larger.
    """
    error = (values - returns) ** 2
    if clip is None:
        return 0.5 * error, torch.zeros_like(error)
    values_clipped = old_values + (values - old_values).clamp(-clip, clip)
    error_clipped = (values_clipped - returns) ** 2
    return 0.5 * torch.maximum(error, error_clipped), (error_clipped > error).float()


def vib_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) per token, summed over the latent dimensions.

    KL = 0.5 * sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1) (Kingma & Welling 2014; Alemi et al. 2017).

    Args:
        mu: (B, A, Z) latent means.
        logvar: (B, A, Z) latent log-variances.

    Returns:
        (B, A) KL in nats.

    >>> vib_kl(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
    tensor([[0.]])
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(-1)


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def key_token_mask(
    signal: Tensor, mask: Tensor, quantile: float | None = 0.8, threshold: float | None = None
) -> Tensor:
    """Marks "key" tokens: those whose guide signal (entropy or surprisal) is high.

    A token is key when its signal is at or above the batch's ``quantile`` over response tokens, or above the
    fixed ``threshold`` when one is given (the threshold wins). Padding is never key.

    Args:
        signal: (B, A) per-token entropy or surprisal of the frozen guide LM.
        mask: (B, A) response mask.
        quantile: per-batch quantile in [0, 1).
        threshold: fixed threshold in nats.

    Returns:
        (B, A) float mask of key tokens.
    """
    valid = mask.bool()
    if threshold is not None:
        cut = torch.as_tensor(threshold, dtype=signal.dtype, device=signal.device)
    elif quantile is not None and valid.any():
        cut = torch.quantile(signal[valid].float(), quantile).to(signal.dtype)
    else:
        return torch.zeros_like(mask, dtype=torch.float)
    return ((signal >= cut) & valid).float()


def aux_predict_loss(predictions: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
    """VRPO's ``predict`` auxiliary loss, per token: MSE of the heads on z against the guide's targets.

    Our choice (the paper names the signal, not the form): small heads on the latent z_t regress the
    standardized entropy H_t and surprisal S_t of the frozen guide LM, so the bottleneck keeps the information
    that marks uncertain, decision-carrying tokens.

    Args:
        predictions: (B, A, K) head outputs, K targets (entropy, surprisal).
        targets: (B, A, K) standardized targets.
        weight: (B, A) optional per-token weight (e.g. 1 on key tokens only).

    Returns:
        (B, A) per-token loss (mean over K).
    """
    loss = (predictions - targets).pow(2).mean(-1)
    return loss if weight is None else loss * weight


def key_token_weights(key: Tensor, alpha: float) -> Tensor:
    """VRPO's ``weight`` variant: value-regression weights w_t = 1 + alpha * key_t (our choice)."""
    return 1.0 + alpha * key


def aggregate(
    loss: Tensor, mask: Tensor, mode: LossAggregation = "token_mean", num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> Tensor:
    """Reduces a (B, A) per-token loss to a scalar.

    ``token_mean`` divides the masked sum by the number of response tokens; ``seq_mean_token_mean`` averages
    each sequence's token-mean over sequences. Passing the count of the whole mini-batch (``num_tokens`` or
    ``num_seqs``) makes micro-batch losses add up to the mini-batch loss, so accumulation is exact.

    Args:
        loss: (B, A) per-token loss.
        mask: (B, A) response mask.
        mode: "token_mean" or "seq_mean_token_mean".
        num_tokens: token count to divide by (default: this batch's).
        num_seqs: sequence count to divide by (default: this batch's).

    Returns:
        Scalar loss.
    """
    if mode == "token_mean":
        denominator = mask.sum() if num_tokens is None else num_tokens
        return (loss * mask).sum() / max(float(denominator), 1.0)
    if mode == "seq_mean_token_mean":
        per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        denominator = loss.shape[0] if num_seqs is None else num_seqs
        return per_seq.sum() / max(float(denominator), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; use 'token_mean' or 'seq_mean_token_mean'")


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R) over response tokens (1 is perfect, 0 is no better than a constant)."""
    valid = mask.bool()
    r, v = returns[valid].float(), values[valid].float()
    if r.numel() < 2:
        return torch.tensor(float("nan"))
    var_r = r.var()
    return 1.0 - (r - v).var() / var_r if var_r > 0 else torch.tensor(float("nan"))


def pearson(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Pearson correlation of x and y over masked positions (nan when undefined)."""
    valid = mask.bool()
    a, b = x[valid].float(), y[valid].float()
    if a.numel() < 2:
        return torch.tensor(float("nan"))
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return (a * b).sum() / denom if denom > 0 else torch.tensor(float("nan"))


def correlation_from_sums(sums: dict[str, float], n: float) -> float:
    """Pearson correlation from the sums ``x``, ``y``, ``xx``, ``yy``, ``xy`` over n points (0 when undefined).

    Sums add up over micro-batches and ranks, so the correlation covers a whole update; :func:`pearson` is the
    same quantity for tensors in hand.
    """
    if n < 2:
        return 0.0
    cov = sums["xy"] - sums["x"] * sums["y"] / n
    var_x, var_y = sums["xx"] - sums["x"] ** 2 / n, sums["yy"] - sums["y"] ** 2 / n
    return cov / (var_x * var_y) ** 0.5 if var_x > 0 and var_y > 0 else 0.0


def explained_variance_from_sums(r: float, rr: float, e: float, ee: float, n: float) -> float:
    """1 - Var(R - V)/Var(R) from the sums of R, R^2, E = R - V and E^2 over n tokens (0 when Var(R) = 0).

    The summable form of :func:`explained_variance` (population variances), for batches spread over ranks.
    """
    if n < 1:
        return 0.0
    var_r = rr / n - (r / n) ** 2
    var_e = ee / n - (e / n) ** 2
    return 1.0 - var_e / var_r if var_r > 1e-12 else 0.0


# ------------------------------------------------------------------------------------------ objectives
# The policy's and the critic's losses as the update computes them, from tensors in hand. Each returns the scalar
# loss and its per-token statistics (B, A), which the caller averages over tokens (vrpo_pl.metrics).


def policy_objective(
    logp: Tensor, entropy: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, clip_eps: float = 0.2,
    entropy_coef: float = 0.0, ref_logp: Tensor | None = None, kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3", aggregation: LossAggregation = "token_mean", num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, minus an optional entropy bonus, plus an optional KL-to-reference term ("KL in the
    loss", with ``ref_logp``).

    Args:
        logp: (B, A) log pi_theta of the sampled tokens (with gradient), e.g. from
            :func:`vrpo_pl.logprobs.logprobs_and_entropy`.
        entropy: (B, A) the policy's per-token entropy (with gradient when ``entropy_coef`` > 0).
        old_logp: (B, A) log pi_old from the rollout.
        advantages: (B, A).
        mask: (B, A) response mask.
        clip_eps: ratio clip range.
        entropy_coef: entropy bonus weight.
        ref_logp: (B, A) log pi_ref for the KL term; None: no KL in the loss.
        kl_coef: weight of the KL term.
        kl_estimator: k1, k2 or k3 (:func:`kl_estimate`).
        aggregation, num_tokens, num_seqs: see :func:`aggregate`.

    Returns:
        ``(loss, stats)``: the scalar loss and (B, A) per-token statistics ``loss/policy``, ``policy/clipfrac``,
        ``policy/approx_kl``, ``policy/entropy``, ``policy/ratio_mean`` and, with ``ref_logp``, ``loss/kl``.
    """
    per_token, clipped, ratio = clipped_policy_loss(logp, old_logp, advantages, clip_eps)
    agg = dict(mask=mask, mode=aggregation, num_tokens=num_tokens, num_seqs=num_seqs)
    loss = aggregate(per_token, **agg)
    if entropy_coef > 0:
        loss = loss - entropy_coef * aggregate(entropy, **agg)
    stats = {"loss/policy": per_token.detach()}
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        loss = loss + kl_coef * aggregate(kl, **agg)
        stats["loss/kl"] = kl.detach()
    stats.update({
        "policy/clipfrac": clipped,
        "policy/approx_kl": kl_estimate(old_logp, logp.detach(), "k3"),
        "policy/entropy": entropy.detach(),
        "policy/ratio_mean": ratio.detach(),
    })
    return loss, stats


AuxiliaryForm = Literal["predict", "weight", "none"]


def critic_objective(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, value_clip: float | None = 0.2,
    mu: Tensor | None = None, logvar: Tensor | None = None, beta: float = 0.0, aux: AuxiliaryForm = "none",
    aux_predictions: Tensor | None = None, aux_targets: Tensor | None = None, aux_coef: float = 0.0,
    key: Tensor | None = None, key_alpha: float = 1.0, aux_key_only: bool = False,
    aggregation: LossAggregation = "token_mean", num_tokens: float | None = None, num_seqs: float | None = None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """The critic's loss: clipped value regression + beta * VIB KL + aux_coef * the auxiliary loss (VRPO).

    Values, old values and returns come in the units the regression uses (standardized when the head normalizes
    its targets).

    Args:
        values: (B, A) new predictions (with gradient).
        old_values: (B, A) the rollout's values.
        returns: (B, A) regression targets.
        mask: (B, A) response mask.
        value_clip: clip range around ``old_values`` (None: plain MSE).
        mu, logvar: (B, A, Z) the VIB posterior (None: no VIB term).
        beta: VIB KL weight.
        aux: ``predict`` (regress the guide targets from z), ``weight`` (value loss weighted 1 + key_alpha on key
            tokens) or ``none``.
        aux_predictions: (B, A, K) the auxiliary heads' outputs (``predict``).
        aux_targets: (B, A, K) the standardized guide targets (``predict``).
        aux_coef: weight of the ``predict`` loss.
        key: (B, A) key-token marks (``weight``; ``predict`` with ``aux_key_only``).
        key_alpha: the ``weight`` form's extra weight on key tokens.
        aux_key_only: ``predict`` on key tokens only.
        aggregation, num_tokens, num_seqs: see :func:`aggregate`.

    Returns:
        ``(loss, stats, correlations)``: the scalar loss; (B, A) per-token statistics ``loss/value``,
        ``value/clipfrac`` and, as configured, ``loss/vib_kl``, ``vib/sigma``, ``loss/aux``; and for ``predict``
        the (prediction, target) pairs over valid tokens of ``aux/corr_entropy`` and ``aux/corr_surprisal``.
    """
    per_token, clipped = clipped_value_loss(values, old_values, returns, value_clip)
    if aux == "weight":
        weights = key_token_weights(key, key_alpha)
        per_token = per_token * weights
    agg = dict(mask=mask, mode=aggregation, num_tokens=num_tokens, num_seqs=num_seqs)
    loss = aggregate(per_token, **agg)
    stats = {"loss/value": per_token.detach(), "value/clipfrac": clipped}
    correlations: dict[str, tuple[Tensor, Tensor]] = {}
    if mu is not None:
        kl = vib_kl(mu, logvar)
        loss = loss + beta * aggregate(kl, **agg)
        stats["loss/vib_kl"] = kl.detach()
        stats["vib/sigma"] = torch.exp(0.5 * logvar.detach()).mean(-1)
    if aux == "predict":
        aux_loss = aux_predict_loss(aux_predictions, aux_targets, key if aux_key_only else None)
        loss = loss + aux_coef * aggregate(aux_loss, **agg)
        stats["loss/aux"] = aux_loss.detach()
        valid = mask.bool()
        for k, name in enumerate(("entropy", "surprisal")):
            correlations[f"aux/corr_{name}"] = (aux_predictions.detach()[..., k][valid], aux_targets[..., k][valid])
    elif aux == "weight":
        stats["loss/aux"] = (per_token / weights).detach()
    return loss, stats, correlations
