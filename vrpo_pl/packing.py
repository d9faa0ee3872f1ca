"""Packed passes: a batch's rows without their padding, each distinct prompt once, in a few long rows.

A rollout's rows are left-padded prompts (P columns) followed by right-padded responses (A columns), and each
prompt repeats in the G rows of its group. The plain pass computes every column of every row; the shared pass
(:mod:`vrpo_pl.prefix`) computes each distinct prompt once, in a second call, and still pads every response to the
longest. A packed pass lays the tokens that matter end to end (``--model.ppo.pack_rows``; our choice, the
"remove padding" of verl and OpenRLHF, with the prompt shared)::

    [prompt u] [row i's response but its last token] [row j's ...] [prompt u'] [row k's ...] ...

each token with its own position id, under a (K, 1, N, N) additive attention mask by which a prompt token sees its
prompt's earlier tokens and a response token sees its prompt and its own row's earlier tokens. Every row's
computation is then the plain pass's (equal up to float rounding; tested), while the matrix products of the
layers run once over the real tokens, in one call. The outputs at the positions that predict a response token (the
prompt's last token for token 0, then the row's own tokens) are gathered back into (B, A, ...), zeros at padding.

Measured on 2 Xeon cores (docs/performance.md, "Packed rows"): the update's policy and critic passes over
throughput.py's micro-batches of 8 rows 0.68-0.75x the time of the shared passes; over wide rows packing does not
pay, so a pass over more than :data:`PACK_MAX_TOKENS` real tokens takes the shared or plain pass.

Packs hold whole prompt groups, merged while they fit in :data:`PACK_TOKENS` tokens (a longer group is cut into
packs of its own, each with the prompt); the K packs are right-padded to the longest and run as one call. A pack's
attention is dense (N x N per head, most of it masked), which is why packs stay short. Packing needs eager or sdpa
attention (the 4D mask is passed through as is), a causal decoder with position ids (no ALiBi, no sliding window
narrower than the rows), and rows laid out as above; any other pass takes the shared or plain one
(:func:`packable`). Shapes: B rows, T = P + A columns, U distinct prompts, K packs of N tokens, n response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vrpo_pl.compile import COMPILED_EAGER_ATTENTION
from vrpo_pl.logprobs import TokenLogits, spread_rows
from vrpo_pl.prefix import _text_config, distinct_prompts, supports_shared_prefix

PACK_TOKENS = 256
"""Tokens per pack at most, unless one prompt group (or one row with its prompt) is longer. A pack's attention is
dense, N x N per head, so its cost (and, in a pass that trains, the saved probabilities) grows with this. On 2 Xeon
cores, over the same two rollouts of throughput.py's workload (alternating, best of 2): the update's 4 micro-batches
of 8 rows (2 groups of about 120-150 tokens), policy and critic forward + backward, 3.95 and 4.69 s in packs of up
to 256 tokens (both groups in one), 4.09 and 4.96 s with 512, 4.63 and 5.25 s with 128 (a pack per group), 5.83 and
6.22 s shared without packing; the no-gradient passes over all 32 rows 2.05-2.47 s whatever the packs (2.05-2.33 s
unpacked), and 2.6-3.0 s in packs of up to 1024-2048 tokens."""

PACK_MAX_TOKENS = 1024
"""A pass over rows holding more real tokens than this (prompts counted per row) takes the shared or plain pass.
Packing pays where the shared pass's two calls are narrow (a few hundred tokens, where a CPU's matrix products run
far below their peak); over wide rows the products are near their peak already and the packs' dense attention (N
columns per token instead of the row's T) costs time and memory. On 2 Xeon cores: micro-batches of 8 rows (about
530-620 tokens) 0.68-0.75x the time packed; one of 32 rows (about 2,100 tokens, the peer A/B's GRPO update) 1.09x
the time and 0.86 GiB more peak memory packed, the rollout's no-gradient passes over 32 rows no faster."""

_MASKED_ATTENTION = ("eager", "sdpa", COMPILED_EAGER_ATTENTION)


@dataclass(frozen=True)
class PackedRows:
    """Where a batch's tokens go in its packs, and where the outputs that predict response tokens come from."""

    input_ids: Tensor  # (K, N) tokens; padding at the end of the shorter packs
    position_ids: Tensor  # (K, N) each token's position in its own row
    groups: Tensor  # (K, N) the token's prompt segment within its pack (0, 1, ...), -1 for padding
    owners: Tensor  # (K, N) the row whose response holds the token, -1 for a prompt token or padding
    pack: Tensor  # (n,) the pack of each response token's predicting output, row-major over valid (B, A) positions
    column: Tensor  # (n,) its column in that pack
    valid: Tensor  # (B, A) bool: the response positions that hold a token

    def attention_mask(self, dtype: torch.dtype) -> Tensor:
        """(K, 1, N, N) additive mask in ``dtype``: 0 where a query may attend, the dtype's minimum elsewhere."""
        n = self.groups.shape[1]
        q = torch.arange(n, device=self.groups.device)
        g_q, g_k = self.groups[:, :, None], self.groups[:, None, :]
        o_q, o_k = self.owners[:, :, None], self.owners[:, None, :]
        allowed = (g_q == g_k) & (g_k >= 0) & (q[None, None, :] <= q[None, :, None]) & ((o_k < 0) | (o_k == o_q))
        allowed |= torch.eye(n, dtype=torch.bool, device=q.device)  # a padding token sees itself: no empty row
        mask = torch.zeros(allowed.shape, dtype=dtype, device=q.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def kept_columns(self) -> tuple[Tensor, Tensor]:
        """``(keep, index)``: the ascending columns any pack reads (what ``logits_to_keep`` computes) and, for each
        response token, its output's row in the (K * len(keep)) flattened kept outputs."""
        keep, where = torch.unique(self.column, sorted=True, return_inverse=True)
        return keep, self.pack * keep.numel() + where

    def spread(self, outputs: Tensor, index: Tensor) -> Tensor:
        """The (B, A, ...) outputs that predict the response tokens, zeros at padding (differentiable).

        Args:
            outputs: (R, ...) rows of outputs, e.g. the packs' flattened kept logits.
            index: (n,) the row of ``outputs`` of each response token, in row-major order of :attr:`valid`.
        """
        return spread_rows(outputs, index, self.valid)

    def spread_positions(self, outputs: Tensor) -> Tensor:
        """:meth:`spread` of per-position outputs of the packs, (K, N, ...) -> (B, A, ...): e.g. hidden states."""
        return self.spread(outputs.flatten(0, 1), self.pack * outputs.shape[1] + self.column)


def rows_are_packable(attention_mask: Tensor, num_response: int) -> bool:
    """Whether every row is a left-padded prompt of at least one token followed by a right-padded response.

    >>> rows_are_packable(torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]), num_response=2)
    True
    >>> rows_are_packable(torch.tensor([[1, 1, 1, 0, 1]]), num_response=2)
    False
    """
    mask = attention_mask.bool()
    prompt, response = mask[:, : mask.shape[1] - num_response], mask[:, mask.shape[1] - num_response :]
    if prompt.shape[1] == 0 or not bool(prompt[:, -1].all()):
        return False
    # A left-padded prompt never drops back to padding; a right-padded response never resumes after it.
    return bool((prompt[:, 1:] >= prompt[:, :-1]).all() and (response[:, 1:] <= response[:, :-1]).all())


def pack_rows(sequences: Tensor, attention_mask: Tensor, position_ids: Tensor, num_response: int,
              share_prompts: bool = True, max_tokens: int | None = None) -> PackedRows:
    """Lays out the rows' tokens in packs (see the module docstring).

    Args:
        sequences: (B, T) left-padded prompts then right-padded responses (:func:`rows_are_packable`).
        attention_mask, position_ids: (B, T).
        num_response: A, the response columns at the end of the rows.
        share_prompts: rows with the same prompt share one copy of it (else every row packs its own).
        max_tokens: tokens per pack at most (default :data:`PACK_TOKENS`): groups are merged while they fit, a
            longer group is cut into packs of its own (each with the prompt), one row with its prompt never.

    Returns:
        :class:`PackedRows`.
    """
    batch, width = sequences.shape
    p, max_tokens = width - num_response, max_tokens or PACK_TOKENS
    mask = attention_mask.bool()
    prompt_len, response_len = mask[:, :p].sum(1).tolist(), mask[:, p:].sum(1).tolist()
    shared = distinct_prompts(sequences, attention_mask, p) if share_prompts and batch > 1 else None
    if shared is None:
        prompt_rows, inverse = list(range(batch)), list(range(batch))
    else:
        prompt_rows, inverse = shared[0].tolist(), shared[1].tolist()
    members = [[] for _ in prompt_rows]
    for row, u in enumerate(inverse):
        members[u].append(row)
    # Whole prompt groups, merged in order while they fit in max_tokens; a group longer than that alone is cut into
    # packs of its own, each carrying the prompt (a group cut across a shared pack would pad every other pack).
    packs, current, filled = [], [], 0  # a pack: [(prompt, [rows])]
    for u, r in enumerate(prompt_rows):
        size = prompt_len[r] + sum(max(response_len[i] - 1, 0) for i in members[u])
        if current and filled + size > max_tokens:
            packs.append(current)
            current, filled = [], 0
        if size <= max_tokens:
            current.append((u, members[u]))
            filled += size
            continue
        rows, need = [], prompt_len[r]
        for i in members[u]:
            if rows and need + max(response_len[i] - 1, 0) > max_tokens:
                packs.append([(u, rows)])
                rows, need = [], prompt_len[r]
            rows.append(i)
            need += max(response_len[i] - 1, 0)
        packs.append([(u, rows)])
    if current:
        packs.append(current)

    # Each packed token is (row, column) of the batch; responses' predicting outputs are (pack, column) of the packs.
    src_row, src_col, groups, owners = [], [], [], []
    out_pack, out_col = [0] * batch, [None] * batch
    for k, pack in enumerate(packs):
        rows_k, cols_k, groups_k, owners_k = [], [], [], []
        for segment, (u, rows) in enumerate(pack):
            r = prompt_rows[u]
            rows_k += [r] * prompt_len[r]
            cols_k += range(p - prompt_len[r], p)
            groups_k += [segment] * prompt_len[r]
            owners_k += [-1] * prompt_len[r]
            last_prompt = len(cols_k) - 1
            for i in rows:
                m = max(response_len[i] - 1, 0)
                out_pack[i], out_col[i] = k, [last_prompt, *range(len(cols_k), len(cols_k) + m)]
                rows_k += [i] * m
                cols_k += range(p, p + m)
                groups_k += [segment] * m
                owners_k += [i] * m
        src_row.append(rows_k), src_col.append(cols_k), groups.append(groups_k), owners.append(owners_k)
    n = max(len(c) for c in src_col)
    device = sequences.device

    def padded(lists: list[list[int]], fill: int) -> Tensor:
        return torch.tensor([x + [fill] * (n - len(x)) for x in lists], dtype=torch.long, device=device)

    rows_t, cols_t = padded(src_row, 0), padded(src_col, 0)
    groups_t = padded(groups, -1)
    valid = mask[:, p:]
    pack_of = [out_pack[i] for i in range(batch) for _ in range(response_len[i])]
    column = [c for i in range(batch) for c in out_col[i][: response_len[i]]]
    return PackedRows(
        input_ids=torch.where(groups_t >= 0, sequences[rows_t, cols_t], sequences[0, -1]),
        position_ids=torch.where(groups_t >= 0, position_ids[rows_t, cols_t], 0),
        groups=groups_t, owners=padded(owners, -1),
        pack=torch.tensor(pack_of, dtype=torch.long, device=device),
        column=torch.tensor(column, dtype=torch.long, device=device), valid=valid)


def packable(model: nn.Module, attention_mask: Tensor, num_response: int) -> bool:
    """Whether a packed pass of ``model`` over these rows pays and computes what the plain pass does: at most
    :data:`PACK_MAX_TOKENS` real tokens, a causal decoder (:func:`vrpo_pl.prefix.supports_shared_prefix`) whose
    attention takes a 4D mask as is (eager, sdpa), without ALiBi or a sliding window narrower than the rows, over
    rows laid out as :func:`rows_are_packable` wants."""
    if int(attention_mask.sum()) > PACK_MAX_TOKENS or not supports_shared_prefix(model):
        return False
    config = _text_config(model)
    window = getattr(config, "sliding_window", None)
    if config._attn_implementation not in _MASKED_ATTENTION or getattr(config, "alibi", False):
        return False
    if config.model_type in ("bloom", "mpt", "falcon") or (window is not None and window < attention_mask.shape[1]):
        return False
    return rows_are_packable(attention_mask, num_response)


def _mask_dtype(model: nn.Module) -> torch.dtype:
    weight = model.get_input_embeddings().weight
    return weight.dtype if weight.is_floating_point() else torch.float32


def packed_logits(model: nn.Module, sequences: Tensor, attention_mask: Tensor, position_ids: Tensor,
                  num_response: int, share_prompts: bool = True) -> TokenLogits:
    """Next-token logits at the response positions of a causal LM, by one packed call; the LM head runs only at
    the columns some response token reads.

    Returns:
        :class:`~vrpo_pl.logprobs.TokenLogits`: the packs' kept logits, one row per kept output, and the row
        predicting each response token (``.dense()``: (B, A, V) as :func:`vrpo_pl.passes.response_logits`, zeros
        at the positions past each response's end).
    """
    packed = pack_rows(sequences, attention_mask, position_ids, num_response, share_prompts)
    keep, index = packed.kept_columns()
    out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask(_mask_dtype(model)),
                position_ids=packed.position_ids, logits_to_keep=keep, use_cache=False)
    return TokenLogits(out.logits.reshape(-1, out.logits.shape[-1]), index, packed.valid)


def packed_hidden(backbone: nn.Module, sequences: Tensor, attention_mask: Tensor, position_ids: Tensor,
                  num_response: int, share_prompts: bool = True) -> Tensor:
    """Last hidden states at the positions that predict the response tokens, by one packed call of a decoder body.

    Returns:
        (B, A, H), as :func:`vrpo_pl.prefix.shared_prefix_hidden`; zeros past each response's end.
    """
    packed = pack_rows(sequences, attention_mask, position_ids, num_response, share_prompts)
    out = backbone(input_ids=packed.input_ids, attention_mask=packed.attention_mask(_mask_dtype(backbone)),
                   position_ids=packed.position_ids, use_cache=False)
    return packed.spread_positions(out.last_hidden_state)
