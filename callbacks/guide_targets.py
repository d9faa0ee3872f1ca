"""Frozen-LM targets for VRPO's auxiliary loss: per-token entropy and surprisal of a guide language model.

For every response token the guide pi_g gives H_t = -sum_v pi_g(v|s_t) log pi_g(v|s_t) and
S_t = -log pi_g(y_t|s_t) (log-perplexity of the token). By default the guide is the reference model, whose
logits the training step already computes for the KL penalty, so the targets cost no extra forward pass.
Targets are standardized with running statistics (checkpointed), and "key" tokens are marked where the chosen
signal is high (a per-batch quantile or a fixed threshold). With several processes both are taken over the global
batch (every rank's tokens), so every rank standardizes and marks alike and the saved statistics are everyone's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from vrpo_pl import distributed
from vrpo_pl.advantages import RunningMoments
from vrpo_pl.logprobs import TokenLogits
from vrpo_pl.losses import key_token_mask
from vrpo_pl.models import LMSource, contiguous_lm_head
from vrpo_pl.passes import guide_targets, response_token_logits


@dataclass
class GuideTargets:
    """Per-token targets for one rollout batch."""

    raw: Tensor
    """(B, A, 2) entropy and surprisal in nats."""
    standardized: Tensor
    """(B, A, 2) the same, standardized with running statistics (what the auxiliary heads regress)."""
    key: Tensor
    """(B, A) 1.0 on key tokens."""


class FrozenLMTargets(pl.Callback):
    """Computes VRPO's frozen-LM entropy/perplexity targets and key-token marks for each rollout batch."""

    def __init__(
        self,
        guide: LMSource | None = None,
        standardize: bool = True,
        key_signal: Literal["entropy", "surprisal"] = "entropy",
        key_quantile: float = 0.8,
        key_threshold: float | None = None,
    ) -> None:
        """
        Args:
            guide: a separate frozen guide LM (must share the policy's tokenizer); None uses the reference
                model and reuses its logits (no extra memory or forward pass).
            standardize: standardize entropy and surprisal with running mean/std before regression.
            key_signal: which signal marks key tokens.
            key_quantile: tokens at or above this per-batch quantile of the signal are key (default 0.8, our
                choice).
            key_threshold: a fixed threshold in nats instead of the quantile.
        """
        if not 0.0 <= key_quantile < 1.0:
            raise ValueError(f"FrozenLMTargets: key_quantile={key_quantile} must be in [0, 1)")
        self.guide_source, self.standardize = guide, standardize
        self.key_signal, self.key_quantile, self.key_threshold = key_signal, key_quantile, key_threshold
        self.moments = [RunningMoments(), RunningMoments()]
        self.guide: torch.nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.guide_source is None or self.guide is not None:
            return
        guide_vocab = len(self.guide_source.tokenizer())
        policy_vocab = len(pl_module.tokenizer)
        if guide_vocab != policy_vocab:
            raise ValueError(
                f"FrozenLMTargets: the guide's tokenizer has {guide_vocab} tokens but the policy's has {policy_vocab}; "
                "the guide must share the policy's tokenizer (or leave `guide` unset to use the reference model)"
            )
        self.guide = contiguous_lm_head(self.guide_source.causal_lm(pl_module.model_dtype)).requires_grad_(False).eval()
        self.guide.to(pl_module.device)

    @torch.no_grad()
    def raw_targets(
        self, sequences: Tensor, attention_mask: Tensor, position_ids: Tensor, responses: Tensor,
        reference_logits: TokenLogits,
    ) -> Tensor:
        """Entropy and surprisal of the guide for a slice of a rollout batch.

        Args:
            sequences: (B, T) prompt + response tokens.
            attention_mask: (B, T).
            position_ids: (B, T).
            responses: (B, A) response tokens.
            reference_logits: the reference pass's logits (:class:`~vrpo_pl.logprobs.TokenLogits`), used when the
                guide is the reference.

        Returns:
            (B, A, 2) entropy and surprisal in nats.
        """
        if self.guide is None:
            logits = reference_logits
        else:
            logits = response_token_logits(self.guide, sequences, attention_mask, position_ids, responses.shape[1])
        return guide_targets(logits, responses)

    @torch.no_grad()
    def finalize(self, raw: Tensor, mask: Tensor) -> GuideTargets:
        """Standardizes a whole rollout batch's targets and marks its key tokens.

        Args:
            raw: (B, A, 2) from :meth:`raw_targets`.
            mask: (B, A) response mask.
        """
        standardized, valid, world = raw.clone(), mask.bool(), distributed.world_size()
        if self.standardize:
            for k, moments in enumerate(self.moments):
                values = raw[..., k][valid].double()
                if world == 1:
                    moments.update(values)
                else:  # the global batch's moments, so every rank standardizes alike (and saves the same state)
                    sums = torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64, device=raw.device),
                                        values.sum(), values.square().sum()])
                    n, total, squares = distributed.all_reduce_sum(sums).tolist()
                    if n > 0:
                        moments.update_stats(n, total / n, max(squares / n - (total / n) ** 2, 0.0))
                standardized[..., k] = (raw[..., k] - moments.mean) / max(moments.std, 1e-6)
        signal = raw[..., 0 if self.key_signal == "entropy" else 1]
        threshold = self.key_threshold
        if threshold is None and world > 1:  # the global batch's quantile: a key token means the same on every rank
            values = distributed.all_gather_ragged(signal[valid].float())
            if values.numel():
                threshold = float(torch.quantile(values, self.key_quantile).to(signal.dtype))
        key = key_token_mask(signal, mask, self.key_quantile, threshold)
        return GuideTargets(raw=raw, standardized=standardized * mask[..., None], key=key)

    def state_dict(self) -> dict[str, Any]:
        return {"moments": [m.state_dict() for m in self.moments]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for moments, state in zip(self.moments, state_dict["moments"], strict=True):
            moments.load_state_dict(state)
