"""Shared prompt prefix: a pass over rows that repeat a prompt computes each distinct prompt once.

A rollout batch holds each of its prompts G times (G samples), and the G rows of a prompt carry the identical
left-padded prompt in their first P columns (typically 50-70 prompt tokens against 10-16 response tokens). A plain
pass computes every prompt G times. The shared pass instead

1. finds the distinct prompts of the batch (:func:`distinct_prompts`: ``torch.unique`` over the prompt columns,
   padding marked apart, so it needs no group ids and works on any slice or shuffled micro-batch);
2. runs the model once per distinct prompt over the prompt without its last token, filling a KV cache;
3. expands the cache to the batch rows with the inverse index (``DynamicCache.batch_select_indices``: plain
   indexing of each layer's keys and values, so gradients flow back through it to LoRA on q/k/v/o);
4. runs the last prompt token and the response tokens but the last against that cache, with the rows' own
   attention mask over prompt + response and the response part's position ids.

The A positions of step 4 are exactly those whose outputs the plain pass keeps (the one predicting response token 0
is the prompt's last position), so :func:`shared_prefix_logits` returns the (B, A, V) next-token logits of
:func:`vrpo_pl.passes.response_logits` and :func:`shared_prefix_hidden` the (B, A, H) hidden states a value head
reads, equal to the plain pass's up to float rounding (tested to 1e-5 in float32, values and LoRA gradients).

A batch with no repeated prompt, or a model that is not a causal decoder (:func:`supports_shared_prefix`: a
bidirectional encoder's prompt states depend on the response), takes the plain pass. The loop sampler prefills
each distinct prompt once in the same way (:mod:`vrpo_pl.sampling`, ``--model.generation.share_prompt_prefill``).
Shapes: B rows, U distinct prompts, P prompt columns, A response positions, T = P + A, V vocabulary, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SharedPrompts:
    """Which rows of a batch hold the same prompt."""

    rows: Tensor  # (U,) one row per distinct prompt (its first occurrence)
    inverse: Tensor  # (B,) the distinct prompt of each row: rows[inverse[i]] holds row i's prompt
    split: int  # columns [0, split) are computed once per distinct prompt: the prompt without its last column


def distinct_prompts(sequences: Tensor, attention_mask: Tensor, prompt_width: int) -> tuple[Tensor, Tensor] | None:
    """The rows that hold each distinct prompt once, and which of them every row holds; None when none repeats.

    Args:
        sequences: (B, T) tokens whose first ``prompt_width`` columns are the left-padded prompts (T >= P).
        attention_mask: (B, T).
        prompt_width: P, the prompt columns.

    Returns:
        ``(rows, inverse)``: (U,) the first row of each distinct prompt and (B,) indices into ``rows``, so that
        ``rows[inverse[i]]`` holds row i's prompt; None when all B prompts differ.

    >>> ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 5, 6]])
    >>> rows, inverse = distinct_prompts(ids, torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1]]), prompt_width=3)
    >>> rows.tolist(), inverse.tolist()
    ([0, 2], [0, 0, 1])
    """
    batch = sequences.shape[0]
    # Padding becomes -1, so two prompts match only with the same tokens at the same places.
    keys = torch.where(attention_mask[:, :prompt_width].bool(), sequences[:, :prompt_width], -1)
    distinct, inverse = torch.unique(keys, dim=0, return_inverse=True)
    if distinct.shape[0] == batch:
        return None
    order = torch.arange(batch, device=sequences.device)
    rows = torch.full((distinct.shape[0],), batch, dtype=torch.long, device=sequences.device)
    return rows.scatter_reduce(0, inverse, order, reduce="amin"), inverse


def find_shared_prompts(sequences: Tensor, attention_mask: Tensor, prompt_width: int) -> SharedPrompts | None:
    """The distinct prompts of a batch for a shared pass, or None when sharing saves nothing.

    Args:
        sequences: (B, T) tokens whose first ``prompt_width`` columns are the left-padded prompts.
        attention_mask: (B, T).
        prompt_width: P, the prompt columns.

    Returns:
        :class:`SharedPrompts`, or None when no prompt occurs twice (:func:`distinct_prompts`) or the prompt is a
        single column (nothing would be cached).
    """
    if prompt_width < 2 or sequences.shape[0] < 2:
        return None
    distinct = distinct_prompts(sequences, attention_mask, prompt_width)
    if distinct is None:
        return None
    return SharedPrompts(rows=distinct[0], inverse=distinct[1], split=prompt_width - 1)


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def supports_shared_prefix(model: nn.Module) -> bool:
    """Whether ``model`` is a causal decoder whose KV cache can carry a prompt: a model type transformers lists for
    causal LM and not for masked LM (BERT-like encoders are in both and see the whole sequence), not
    encoder-decoder, not a recurrent-state model."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = getattr(model, "config", None)
    if config is None:
        return False
    config = _text_config(model)
    kind = getattr(config, "model_type", None)
    return (kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False) and not getattr(model, "_is_stateful", False))


def shared_prompts_for(model: nn.Module, sequences: Tensor, attention_mask: Tensor, num_response: int,
                       prompt_width: int | None) -> SharedPrompts | None:
    """The rows' shared prompts for a pass of ``model`` over them, or None for the plain pass: no ``prompt_width``
    (sharing switched off), no repeated prompt (:func:`find_shared_prompts`), or a model that is no causal decoder
    (:func:`supports_shared_prefix`).

    Raises:
        ValueError: ``prompt_width + num_response`` is not the rows' width (the response must end the rows).
    """
    if prompt_width is None or not supports_shared_prefix(model):
        return None
    if prompt_width + num_response != sequences.shape[1]:
        raise ValueError(f"prompt_width={prompt_width} + num_response={num_response} must be the rows' width "
                         f"{sequences.shape[1]}")
    return find_shared_prompts(sequences, attention_mask, prompt_width)


def _prompt_then_rest(model: nn.Module, sequences: Tensor, attention_mask: Tensor, position_ids: Tensor,
                      shared: SharedPrompts, prompt_kwargs: dict, rest_kwargs: dict):
    """Steps 2-4 of the module docstring: the model's output over columns [split, T - 1) of every row."""
    from transformers import DynamicCache

    s, rows = shared.split, shared.rows
    cache = DynamicCache(config=_text_config(model))
    model(input_ids=sequences[rows, :s], attention_mask=attention_mask[rows, :s], position_ids=position_ids[rows, :s],
          past_key_values=cache, use_cache=True, **prompt_kwargs)
    cache.batch_select_indices(shared.inverse)
    return model(input_ids=sequences[:, s:-1], attention_mask=attention_mask[:, :-1],
                 position_ids=position_ids[:, s:-1], past_key_values=cache, use_cache=True, **rest_kwargs)


def shared_prefix_logits(model: nn.Module, sequences: Tensor, attention_mask: Tensor, position_ids: Tensor,
                         shared: SharedPrompts) -> Tensor:
    """Next-token logits at the response positions of a causal LM, each distinct prompt computed once.

    Args:
        model: a causal LM (``logits_to_keep``, ``past_key_values``).
        sequences: (B, T) prompt + response tokens; attention_mask, position_ids: (B, T).
        shared: from :func:`find_shared_prompts` on these rows.

    Returns:
        (B, A, V) logits, A = T - P; row t predicts response token t (as :func:`vrpo_pl.passes.response_logits`).
    """
    num = sequences.shape[1] - 1 - shared.split
    # The prompt pass keeps one position of logits (transformers has no "none"); the rest keeps all A.
    return _prompt_then_rest(model, sequences, attention_mask, position_ids, shared, {"logits_to_keep": 1},
                             {"logits_to_keep": num}).logits


def shared_prefix_hidden(backbone: nn.Module, sequences: Tensor, attention_mask: Tensor, position_ids: Tensor,
                         shared: SharedPrompts) -> Tensor:
    """Last hidden states at the positions that predict the response tokens, each distinct prompt computed once.

    Args:
        backbone: a decoder body (``last_hidden_state`` out, ``past_key_values`` in).
        sequences: (B, T); attention_mask, position_ids: (B, T).
        shared: from :func:`find_shared_prompts` on these rows.

    Returns:
        (B, A, H): position t holds h at the last token of s_t = (x, y_<t), what the value head reads.
    """
    return _prompt_then_rest(backbone, sequences, attention_mask, position_ids, shared, {}, {}).last_hidden_state
