"""Fused update passes: the policy's and the critic's pass over one micro-batch as one call.

PPO and VRPO step the policy and the critic on the same micro-batches (:mod:`vrpo_pl.update`). With LoRA adapters on
both and the critic's body holding the policy's own frozen base tensors (``RLSystem``'s default), the two passes
differ only in their adapters and in the head that reads the last hidden states. A fused pass
(``--model.ppo.fuse_update``, our choice) runs them as one call of the policy's decoder over the micro-batch's packs
(:mod:`vrpo_pl.packing`) laid twice, the policy's copy first and the critic's second::

    [packs] [the same packs]   ->   every adapted linear: the frozen weight once over both halves,
                                    each half's adapter in one batched product (bmm over the two halves)
    last hidden states[:K]     ->   the LM head (the policy's logits at the response positions)
    last hidden states[K:]     ->   the critic's value head

Every row's computation is what the separate passes compute (equal up to float rounding; tested), and a loss's
gradient reaches only its own model's adapters: the halves share no activation (attention stays inside a pack,
every other operation works row by row). What changes is the width of the calls: a CPU's matrix products gain
speed with their rows up to about a thousand (docs/performance.md), and the base workload's micro-batches of 8 rows
are about 200-300 packed tokens. Over throughput.py's rollouts, passes over micro-batches of 16 rows took 0.81-0.83x
the time of two passes of 8 (2 Xeon cores, bf16); the fused call has that width, and the policy's and the critic's
forward + backward took 0.81x the time of their two packed passes (``benchmarks/prefix_passes.py``'s ``fused_grad``;
docs/performance.md, "Fused policy and critic passes"). The rollout's old log-probs and values use the same call
(:func:`vrpo_pl.passes.score_rollout`).

Only where it computes what the separate passes would: both models adapted by plain LoRA (no DoRA or other variant,
no adapter bias, no dropout, one active adapter, not merged) on the same modules with the same rank, every other
tensor of the critic's body the policy's own, no compiled blocks, and a micro-batch the packed pass takes
(:func:`vrpo_pl.packing.packable`). Anything else runs the two passes one after the other, as before.
Shapes: K packs of N tokens, B rows, A response positions, V vocabulary, H hidden.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from vrpo_pl.compile import is_compiled
from vrpo_pl.critic import ValueModel, ValueOutput
from vrpo_pl.logprobs import TokenLogits
from vrpo_pl.lora import adapter_weights, single_adapter
from vrpo_pl.packing import _mask_dtype, pack_rows, packable


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer body under a peft wrapper: the causal LM's decoder, or a body itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder() if hasattr(base, "get_decoder") else base


def adapter_pairs(policy: nn.Module, critic: ValueModel | None) -> list[tuple[nn.Module, nn.Module]] | None:
    """Each of the policy's LoRA linears with the critic's at the same place, when the two models can share a call
    (see the module docstring); else None.

    >>> adapter_pairs(nn.Linear(2, 2), None) is None
    True
    """
    from peft.tuners.lora import LoraLayer

    if critic is None or not hasattr(policy, "get_base_model") or not hasattr(critic.backbone, "get_base_model"):
        return None
    if is_compiled(policy) or is_compiled(critic.backbone):
        return None
    ours, theirs = _decoder(policy), _decoder(critic.backbone)
    ours_modules, theirs_modules = dict(ours.named_modules()), dict(theirs.named_modules())
    if ours_modules.keys() != theirs_modules.keys():
        return None
    pairs = []
    for name, mine in ours_modules.items():
        other = theirs_modules[name]
        mine_lora, other_lora = isinstance(mine, LoraLayer), isinstance(other, LoraLayer)
        if mine_lora != other_lora:
            return None
        if not mine_lora:
            continue
        a, b = single_adapter(mine), single_adapter(other)
        if a is None or b is None or mine.base_layer.weight is not other.base_layer.weight:
            return None
        if (mine.r[a] != other.r[b] or mine.lora_A[a].weight.dtype != other.lora_A[b].weight.dtype
                or mine.cast_input_dtype_enabled != other.cast_input_dtype_enabled):
            return None
        pairs.append((mine, other))
    # Every other tensor of the critic's body must be the policy's own (embeddings, norms, unadapted linears).
    ours_tensors = {name: t for name, t in ours.named_parameters() if "lora_" not in name}
    theirs_tensors = {name: t for name, t in theirs.named_parameters() if "lora_" not in name}
    if ours_tensors.keys() != theirs_tensors.keys() or any(t is not theirs_tensors[n] for n, t in ours_tensors.items()):
        return None
    return pairs or None


def _two_adapter_forward(mine: nn.Module, other: nn.Module):
    """A forward for ``mine`` over a batch whose first half ``mine``'s adapter adapts and second half ``other``'s:
    the frozen weight once over both halves, the two adapters in one batched product each."""

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = mine.base_layer(x, *args, **kwargs)
        (a1, b1), (a2, b2) = adapter_weights(mine), adapter_weights(other)
        if mine.cast_input_dtype_enabled:  # peft's float32 adapters (LoRASpec.compute = "float32")
            x = x.to(a1.dtype)
        halves = x.reshape(2, -1, x.shape[-1])
        a = torch.stack((a1, a2)).to(halves.dtype).transpose(1, 2)  # (2, in, r)
        b = torch.stack((b1, b2)).to(halves.dtype).transpose(1, 2)  # (2, r, out)
        delta = torch.bmm(torch.bmm(halves, a), b)
        return (result + delta.view(*result.shape[:-1], delta.shape[-1])).to(result.dtype)

    return forward


@contextmanager
def _two_adapters(pairs: list[tuple[nn.Module, nn.Module]]) -> Iterator[None]:
    """Within: each policy LoRA linear adapts its input's first half with its own adapter and the second half with
    the critic's (:func:`_two_adapter_forward`)."""
    for mine, other in pairs:
        mine.forward = _two_adapter_forward(mine, other)
    try:
        yield
    finally:
        for mine, _ in pairs:
            del mine.forward


def fusable(policy: nn.Module, pairs: list | None, attention_mask: Tensor, num_response: int) -> bool:
    """Whether a micro-batch's policy and critic passes can run as one fused call: the models pair up
    (:func:`adapter_pairs`) and the packed pass takes these rows (:func:`vrpo_pl.packing.packable`)."""
    return pairs is not None and packable(policy, attention_mask, num_response)


def fused_passes(
    policy: nn.Module, critic: ValueModel, pairs: list[tuple[nn.Module, nn.Module]], sequences: Tensor,
    attention_mask: Tensor, position_ids: Tensor, num_response: int, share_prompts: bool = True,
    sample: bool = False, noise: Tensor | None = None,
) -> tuple[TokenLogits, ValueOutput]:
    """The policy's logits and the critic's values at the response positions, in one packed call (module docstring).

    Args:
        policy: the LoRA causal LM; critic: its :class:`~vrpo_pl.critic.ValueModel`; pairs: from
            :func:`adapter_pairs` (checked with :func:`fusable`).
        sequences, attention_mask, position_ids: (B, T) rows as the rollout lays them.
        num_response: A, the response columns at the end of the rows.
        share_prompts: rows with the same prompt share one copy of it in the packs.
        sample, noise: the value head's (:meth:`vrpo_pl.critic.ValueHead.forward`).

    Returns:
        ``(logits, values)``: the policy's :class:`~vrpo_pl.logprobs.TokenLogits` as
        :func:`vrpo_pl.passes.response_token_logits` gives them, and the head's :class:`~vrpo_pl.critic.ValueOutput`
        as :meth:`ValueModel.forward` gives it.
    """
    packed = pack_rows(sequences, attention_mask, position_ids, num_response, share_prompts)
    keep, index = packed.kept_columns()
    k = packed.input_ids.shape[0]
    mask = packed.attention_mask(_mask_dtype(policy))
    captured: dict[str, Tensor] = {}

    def keep_last_hidden(module: nn.Module, args: tuple, output: Any) -> None:
        captured["hidden"] = output.last_hidden_state

    def policy_half(module: nn.Module, args: tuple) -> tuple:
        return (args[0][:k], *args[1:])  # the LM head over the policy's packs only

    hooks = [_decoder(policy).register_forward_hook(keep_last_hidden),
             policy.get_output_embeddings().register_forward_pre_hook(policy_half)]
    try:
        with _two_adapters(pairs):
            out = policy(input_ids=packed.input_ids.repeat(2, 1), attention_mask=mask.repeat(2, 1, 1, 1),
                         position_ids=packed.position_ids.repeat(2, 1), logits_to_keep=keep, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    logits = TokenLogits(out.logits.reshape(-1, out.logits.shape[-1]), index, packed.valid)
    hidden = packed.spread_positions(captured["hidden"][k:])
    return logits, critic.head(hidden, sample=sample, noise=noise)
