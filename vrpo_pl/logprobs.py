"""Per-token log-probabilities and entropies from logits: pure functions of tensors (torch only).

Every pass that scores tokens (the rollout's old and reference log-probs, the guide's targets, the update's policy
term) goes through :func:`token_logprobs_and_entropy`, which works in float32 chunks of rows whatever the logits'
dtype and keeps nothing but the logits for backward: a float32 copy of a whole (B, A, V) tensor (V = 49,152 for
SmolLM2) is never made. Shapes: B sequences, A response tokens, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 2**21
"""Float32 elements of logits processed at a time (8 MiB, 42 rows of SmolLM2's 49,152 logits): never a float32
copy of a whole (B, A, V) tensor. Small enough that each chunk's float32 intermediates are reused from the heap and
stay in cache: on 2 Xeon cores (bf16 logits) 700 rows' log-probs and entropies took 0.04 s in chunks of 2**21
elements against 0.16-0.26 s in chunks of 2**24 (64 MiB, freshly mapped memory every chunk), and 256 rows'
log-probs with their backward 0.03 s against 0.10 s; 2**20 was no faster."""


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
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, with_entropy: bool, rows: Tensor | None):
        n, vocab = tokens.shape[0], logits.shape[1]
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logp) if with_entropy else None
        step = _chunk_rows(vocab)
        for s in range(0, n, step):
            chunk = logits[s : s + step] if rows is None else logits.index_select(0, rows[s : s + step])
            lsm = _TokenLogProbs._normalized(chunk, temperature, log=True)
            logp[s : s + step] = lsm.gather(-1, tokens[s : s + step, None]).squeeze(-1)
            if with_entropy:
                # -sum p log p; a -inf logit gives 0 * -inf = nan, which nansum counts as the 0 it is.
                entropy[s : s + step] = torch.nansum(lsm.exp() * lsm, dim=-1).neg_()
        ctx.save_for_backward(logits, tokens, rows)
        ctx.temperature = temperature
        if entropy is None:
            return logp, torch.zeros(0, device=logits.device)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, grad_entropy: Tensor):
        logits, tokens, rows = ctx.saved_tensors
        # Rows read by no token get no gradient; a row read by several tokens gets the sum (index_add_).
        grad = torch.empty_like(logits) if rows is None else torch.zeros_like(logits)
        step = _chunk_rows(logits.shape[1])
        for s in range(0, tokens.shape[0], step):
            g = grad_logp[s : s + step, None]
            chunk = logits[s : s + step] if rows is None else logits.index_select(0, rows[s : s + step])
            d = _TokenLogProbs._normalized(chunk, ctx.temperature, log=False)
            d.mul_(-g).scatter_add_(-1, tokens[s : s + step, None], g)  # d logp / d x = onehot - softmax
            if ctx.temperature != 1.0:
                d.div_(ctx.temperature)
            if rows is None:
                grad[s : s + step] = d
            else:
                grad.index_add_(0, rows[s : s + step], d.to(grad.dtype))
        return grad, None, None, None, None


def token_logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, with_entropy: bool = True, rows: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log pi(token | prefix) under logits / temperature, with gradient, and each distribution's entropy, without.

    Computed in float32 chunks whatever the logits' dtype; memory beyond the logits is O(rows) plus one chunk.

    Args:
        logits: (..., V) next-token logits aligned with ``tokens``; with ``rows``, (R, V) rows that tokens read.
        tokens: (...) the tokens whose log-probabilities are wanted; with ``rows``, (n,).
        temperature: divides the logits.
        with_entropy: also compute the entropy (else None is returned for it).
        rows: (n,) the row of ``logits`` that predicts each token (several tokens may read one row, a row may be
            read by none): only those rows are normalized, and the gradient reaches only them. None: row i
            predicts token i.

    Returns:
        ``(logp, entropy)``: shaped as ``tokens``, float32 each, in nats.
    """
    shape = tokens.shape
    if rows is None:
        logits = logits.reshape(-1, logits.shape[-1])
    elif logits.dim() != 2 or tokens.dim() != 1 or rows.shape != tokens.shape:
        raise ValueError(f"rows: logits (R, V), tokens and rows (n,) expected, got {tuple(logits.shape)}, "
                         f"{tuple(tokens.shape)} and {tuple(rows.shape)}")
    logp, entropy = _TokenLogProbs.apply(logits, tokens.reshape(-1), temperature, with_entropy, rows)
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


def spread_rows(outputs: Tensor, rows: Tensor, valid: Tensor) -> Tensor:
    """(B, A, ...) outputs gathered from rows: position j of ``valid`` (row-major) takes ``outputs[rows[j]]``,
    padding gets zeros (differentiable).

    One ``index_select`` (a row read by several positions gets their gradients added: far cheaper than indexing's
    accumulating ``index_put``), then padding zeroed in place.

    >>> valid = torch.tensor([[True, True], [True, False]])
    >>> spread_rows(torch.tensor([[1.0], [2.0]]), torch.tensor([1, 0, 1]), valid)[..., 0]
    tensor([[2., 1.],
            [2., 0.]])
    """
    batch, width = valid.shape
    flat = valid.flatten()
    source = torch.zeros(batch * width, dtype=torch.long, device=outputs.device)
    source[flat] = rows
    spread = outputs.index_select(0, source)
    spread.masked_fill_(~flat.view(-1, *[1] * (outputs.dim() - 1)), 0)
    return spread.view(batch, width, *outputs.shape[1:])


class TokenLogits:
    """A pass's next-token logits where it computed them, and which of them predicts each response token.

    What log-probabilities and entropies need, without spreading the logits into (B, A, V) with their padding: a
    packed pass keeps one row per kept output (a prompt's last output serves each of its rows), a plain pass its
    (B * A) rows, of which only the response tokens' are normalized. Shapes: R rows of V logits, n response
    tokens, (B, A) response positions.
    """

    def __init__(self, logits: Tensor, rows: Tensor, valid: Tensor, dense: Tensor | None = None) -> None:
        """
        Args:
            logits: (R, V).
            rows: (n,) the row of ``logits`` predicting each response token, row-major over ``valid``.
            valid: (B, A) bool, the response positions that hold a token.
            dense: the (B, A, V) logits these rows were taken from, if the pass made them (returned by
                :meth:`dense` as they are).
        """
        self.logits, self.rows, self.valid, self._dense = logits, rows, valid, dense
        self._stats: tuple | None = None

    @classmethod
    def from_dense(cls, logits: Tensor, valid: Tensor) -> TokenLogits:
        """From (B, A, V) logits, of which the ``valid`` positions' are read."""
        rows = valid.flatten().nonzero().squeeze(1)
        return cls(logits.reshape(-1, logits.shape[-1]), rows, valid, dense=logits)

    def dense(self) -> Tensor:
        """(B, A, V) logits; zeros at padding where the pass did not compute them."""
        return self._dense if self._dense is not None else spread_rows(self.logits, self.rows, self.valid)

    def token_stats(self, tokens: Tensor, temperature: float = 1.0,
                    with_entropy: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(logp, entropy)`` of the (B, A) ``tokens`` under logits / temperature (:func:`token_logprobs_and_entropy`),
        zeros at padding; the entropy without gradient, None unless ``with_entropy``.

        Without gradient the last result is kept: asked again for the same tokens and temperature (the reference's
        log-probs, then the guide's entropy and surprisal from the same logits), nothing is recomputed.
        """
        last = self._stats
        if (last is not None and not torch.is_grad_enabled() and last[0] is tokens and last[1] == temperature
                and (last[3] is not None or not with_entropy)):
            return last[2], last[3] if with_entropy else None
        logp, entropy = token_logprobs_and_entropy(self.logits, tokens[self.valid], temperature, with_entropy,
                                                   rows=self.rows)
        logp, entropy = self._grid(logp), None if entropy is None else self._grid(entropy)
        if not torch.is_grad_enabled():
            self._stats = (tokens, temperature, logp, entropy)
        return logp, entropy

    def _grid(self, values: Tensor) -> Tensor:
        """(n,) per-token values laid out as (B, A), zeros at padding (differentiable)."""
        flat = self.valid.flatten()
        return values.new_zeros(flat.shape).masked_scatter(flat, values).view(self.valid.shape)
