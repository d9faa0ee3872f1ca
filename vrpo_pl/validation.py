"""Greedy validation, read from its rollouts: per-question outcomes, the reduced metrics and the key-token view.

``RLSystem`` runs the passes (greedy decoding, the gold reward, and for the view the no-gradient scoring passes)
and keeps the running metrics, which must be its submodules (Lightning moves them to the device and torchmetrics
reduces them over ranks); the functions here turn what those give into records and numbers. Shapes: B responses,
A response tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from vrpo_pl.advantages import compute_advantages
from vrpo_pl.losses import KLEstimator, kl_estimate
from vrpo_pl.rollout import Rollout


def outcome_records(batch: dict[str, Any], r: Rollout, gold: Tensor | None, texts: list[str]) -> list[dict[str, Any]]:
    """One record per question of a validation batch: its id, gold reward (None without a verifier), response
    length in tokens and response text (``RLSystem.last_validation``, the ``ValidationOutcomes`` callback)."""
    lengths = r.mask.sum(1)
    return [{"id": batch["id"][i], "gold": None if gold is None else float(gold[i]), "length": int(lengths[i]),
             "response": texts[i]} for i in range(r.size)]


def reduce_metrics(accuracy: MeanMetric, length: MeanMetric) -> dict[str, float]:
    """``val/response_length`` and, when a verifier gave gold rewards, ``val/accuracy``, reduced over batches and
    ranks; resets both metrics for the next validation."""
    metrics = {"val/response_length": float(length.compute())}
    if accuracy.update_count:
        metrics["val/accuracy"] = float(accuracy.compute())
    accuracy.reset()
    length.reset()
    return metrics


@torch.no_grad()
def token_view(r: Rollout, gold: Tensor | None, prompts: list[str], tokenizer, *, kl_estimator: KLEstimator,
               kl_coef: float, gamma: float, lam: float) -> list[dict[str, Any]]:
    """Per-token quantities of scored greedy responses, for the key-token view (``KeyTokenView`` callback).

    Args:
        r: a greedy rollout after the scoring passes (``ref_logp``, ``guide_raw`` and, with a critic, ``values``).
        gold: (B,) gold rewards, or None without a verifier (then 0).
        prompts: the B prompts.
        tokenizer: decodes the response tokens one by one.
        kl_estimator: the KL penalty's estimator (``--model.kl.estimator``).
        kl_coef: the KL coefficient now.
        gamma: GAE's discount.
        lam: GAE's lambda.

    Returns:
        One dict per prompt: prompt, tokens (decoded one by one), gold reward, and per-token lists of advantage
        (GAE against the gold reward with the KL penalty, not whitened; None without a critic), value (None without
        a critic), guide entropy and surprisal.
    """
    gold = torch.zeros(r.size, device=r.mask.device) if gold is None else gold
    advantages = None
    if r.values is not None:
        kl = kl_estimate(r.logp, r.ref_logp, kl_estimator) * r.mask
        advantages, _ = compute_advantages("gae", gold, kl, r.mask, kl_coef=kl_coef, values=r.values, gamma=gamma,
                                           lam=lam, whiten=False)
    views = []
    for i, n in enumerate(r.mask.sum(1).long().tolist()):
        views.append({
            "prompt": prompts[i], "gold": float(gold[i]),
            "tokens": [tokenizer.decode([t]) for t in r.responses[i, :n].tolist()],
            "advantage": None if advantages is None else advantages[i, :n].tolist(),
            "value": None if r.values is None else r.values[i, :n].tolist(),
            "entropy": r.guide_raw[i, :n, 0].tolist(), "surprisal": r.guide_raw[i, :n, 1].tolist(),
        })
    return views
