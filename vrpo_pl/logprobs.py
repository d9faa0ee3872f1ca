"""Per-token log-probabilities and entropies from logits: pure functions of tensors (torch only).

Every pass that scores tokens (the rollout's old and reference log-probs, the guide's targets, the update's policy
term) goes through :func:`token_logprobs_and_entropy`, which works in float32 chunks of rows whatever the logits'
dtype and keeps nothing but the logits for backward: a float32 copy of a whole (B, A, V) tensor (V = 49,152 for
SmolLM2) is never made. Shapes: B sequences, A response tokens, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 2**24
"""Float32 elements of logits processed at a time (64 MiB): never a float32 copy of a whole (B, A, V) tensor."""


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits / T) at ``tokens``, and optionally the entropy (no gradient), in float32 chunks of rows.

    Saves only the logits themselves (in their own dtype) for backward, which recomputes the softmax chunk by
    chunk: the float32 (N, V) log-softmax that autograd would keep is never materialized beyond one chunk.
    """

    @staticmethod
    def _normalized(logits: Tensor, temperature: float, log: bool) -> Tensor:
        """(log-)softmax of a chunk of logits / temperature in float32; at temperature 1 the cast is fused into the
        softmax (no float32 copy of the chunk), and the saved logits are never modified."""
        softmax = torch.log_softmax if log else torch.softmax
        if temperature == 1.0:
            return softmax(logits, dim=-1, dtype=torch.float32)
        x = logits.float()
        x = x.div_(temperature) if x.data_ptr() != logits.data_ptr() else x / temperature
        return softmax(x, dim=-1)

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, with_entropy: bool):
        n, vocab = logits.shape
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logp) if with_entropy else None
        step = _chunk_rows(vocab)
        for s in range(0, n, step):
            lsm = _TokenLogProbs._normalized(logits[s : s + step], temperature, log=True)
            logp[s : s + step] = lsm.gather(-1, tokens[s : s + step, None]).squeeze(-1)
            if with_entropy:
                # -sum p log p; a -inf logit gives 0 * -inf = nan, which nansum counts as the 0 it is.
                entropy[s : s + step] = torch.nansum(lsm.exp() * lsm, dim=-1).neg_()
        ctx.save_for_backward(logits, tokens)
        ctx.temperature = temperature
        if entropy is None:
            return logp, torch.zeros(0, device=logits.device)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, grad_entropy: Tensor):
        logits, tokens = ctx.saved_tensors
        grad = torch.empty_like(logits)
        step = _chunk_rows(logits.shape[1])
        for s in range(0, logits.shape[0], step):
            g = grad_logp[s : s + step, None]
            d = _TokenLogProbs._normalized(logits[s : s + step], ctx.temperature, log=False)
            d.mul_(-g).scatter_add_(-1, tokens[s : s + step, None], g)  # d logp / d x = onehot - softmax
            if ctx.temperature != 1.0:
                d.div_(ctx.temperature)
            grad[s : s + step] = d
        return grad, None, None, None


def token_logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[Tensor, Tensor | None]:
    """log pi(token | prefix) under logits / temperature, with gradient, and each distribution's entropy, without.

    Computed in float32 chunks whatever the logits' dtype; memory beyond the logits is O(rows) plus one chunk.

    Args:
        logits: (..., V) next-token logits aligned with ``tokens``.
        tokens: (...) the tokens whose log-probabilities are wanted.
        temperature: divides the logits.
        with_entropy: also compute the entropy (else None is returned for it).

    Returns:
        ``(logp, entropy)``: (...) float32 each, in nats.
    """
    shape = tokens.shape
    logp, entropy = _TokenLogProbs.apply(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), temperature,
                                         with_entropy)
    return logp.view(shape), entropy.view(shape) if with_entropy else None


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log pi(token | prefix) for each position (differentiable; float32 chunks, see
    :func:`token_logprobs_and_entropy`).

    Args:
        logits: (B, A, V) next-token logits aligned with ``tokens``.
        tokens: (B, A) the tokens whose log-probabilities are wanted.

    Returns:
        (B, A) float32 log-probabilities.
    """
    return token_logprobs_and_entropy(logits, tokens, with_entropy=False)[0]


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy H = -sum_v p(v) log p(v) of each next-token distribution, in nats (differentiable).

    Args:
        logits: (..., V).

    Returns:
        (...) float32 entropies.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p_logp = logp.exp() * logp
    # A -inf logit (masked token) has p = 0 and contributes 0, not 0 * -inf = nan.
    return -torch.where(torch.isfinite(logp), p_logp, torch.zeros_like(p_logp)).sum(-1)


def logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, entropy_grad: bool = False
) -> tuple[Tensor, Tensor]:
    """Log-probabilities of ``tokens`` and the entropy of each next-token distribution under logits / temperature.

    Args:
        logits: (B, A, V) next-token logits aligned with ``tokens``.
        tokens: (B, A).
        temperature: the sampling temperature (the distribution the tokens were drawn from).
        entropy_grad: keep the entropy's graph (an entropy bonus: a full float32 log-softmax is kept for backward);
            else both come from :func:`token_logprobs_and_entropy` (float32 chunks, entropy without gradient).

    Returns:
        ``(logp, entropy)``: (B, A) each, float32, in nats.
    """
    if not (entropy_grad and torch.is_grad_enabled()):
        return token_logprobs_and_entropy(logits, tokens, temperature)
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)
