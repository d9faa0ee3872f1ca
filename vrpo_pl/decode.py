"""Lean decode steps for Llama-architecture policies (``--model.generation.lean_decode``, the ``loop`` sampler).

A decode step feeds one token per row through every layer. On a CPU its cost is not the arithmetic (B x 2N FLOPs)
but reading the weights once and, through the model's own forward, about sixty small operator calls per layer:
LoRA's three products, casts and sums on each adapted projection, RMSNorm's six element-wise passes, the rotary
embedding's halves and concatenations, a KV cache that grows by concatenation (a copy of the whole cache per layer
and step). The profile of a 32 x 32-token generation of SmolLM2 + LoRA (Intel Xeon with AMX, 2 threads) put the
matrix products at 46% of the time; the rest was those calls.

:class:`LeanDecoder` runs the steps on the same weights with fewer calls:

- every LoRA projection multiplies one weight, ``W + scaling * B @ A``, merged once per ``sample`` call into a
  temporary copy in the weight's dtype (the frozen weight itself is never touched; unadapted weights are read as
  they are): the adapters' products vanish from the steps;
- the KV cache is one preallocated buffer per layer, filled from the prefill's cache, written in place;
- the rotary embedding is applied to the queries and keys in one call, RMSNorm is ``torch.nn.functional.rms_norm``
  in float32 (as the model's norm computes), attention is one ``scaled_dot_product_attention`` with grouped query
  heads.

The prefill stays the model's own forward (with prompt sharing, :func:`vrpo_pl.sampling._prefill`). The logits equal
the model's own decode step's to rounding; the merged weights round once more in the weight's dtype (bf16: about
1e-2 on a logit, like any fused kernel), so in bf16 the tokens drawn can differ from the model's own forward for the
same seed while following the same policy; in float32 they agree to ~1e-6 (tested). The rollout's old log-probs come
from the update's own pass in bf16 (``sampler_logprobs`` is off there), so the first PPO ratio stays 1.

Used when :meth:`LeanDecoder.build` recognizes the model: a transformers Llama (``model_type == "llama"``; SmolLM2 is
one) with SiLU MLPs, no biases, plain LoRA adapters or none (peft's ``Linear``, one active adapter, no DoRA or
dropout) and ordinary tensors (not FSDP2's sharded ones, not compiled blocks). Otherwise the loop calls the model's
forward for each step, as with ``lean_decode: false``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vrpo_pl.compile import is_compiled
from vrpo_pl.lora import adapter_weights, single_adapter


def effective_weight(linear: nn.Module) -> Tensor | None:
    """The weight a linear layer multiplies by: ``W`` for ``nn.Linear``, ``W + scaling * B @ A`` (a new tensor in
    ``W``'s dtype, computed in float32) for a plain peft LoRA linear, ``W`` for one whose adapters are disabled;
    None for anything else (a bias, DoRA, dropout, several adapters, a sharded weight).

    >>> lin = nn.Linear(3, 2, bias=False)
    >>> effective_weight(lin) is lin.weight
    True
    """
    from peft.tuners.lora import Linear as LoraLinear

    if type(linear) is nn.Linear:
        weight = linear.weight
        return weight if linear.bias is None and type(weight.data) is Tensor else None
    if type(linear) is not LoraLinear:
        return None
    base = effective_weight(linear.base_layer)
    if base is None or linear.merged:
        return None
    if linear.disable_adapters or not linear.active_adapters:
        return base
    if single_adapter(linear) is None:
        return None
    with torch.no_grad():
        a, b = adapter_weights(linear)
        return torch.addmm(base.float(), b.float(), a.float()).to(base.dtype)


@dataclass
class _Layer:
    """One decoder layer's weights for the decode step (see :class:`LeanDecoder`)."""

    attention_norm: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    mlp_norm: Tensor
    gate: Tensor
    up: Tensor
    down: Tensor


class LeanDecoder:
    """Decode steps of a Llama-architecture causal LM with merged adapters and a preallocated KV cache (see the
    module docstring). Built per ``sample`` call (:meth:`build`), filled from the prefill's cache (:meth:`start`),
    then one :meth:`step` per new token."""

    def __init__(self, model: nn.Module, layers: list[_Layer], final_norm: Tensor, head: Tensor) -> None:
        config, decoder = model.config, model.get_decoder()
        self.embed, self.rotary = decoder.get_input_embeddings(), decoder.rotary_emb
        self.layers, self.final_norm, self.head = layers, final_norm, head
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    @classmethod
    def build(cls, policy: nn.Module) -> LeanDecoder | None:
        """The lean decoder of ``policy`` (a peft model or a plain causal LM) with its adapters as they are now, or
        None where the model is not one it handles (see the module docstring)."""
        model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) != "llama" or is_compiled(policy):
            return None
        if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
            return None
        if not isinstance(model.get_output_embeddings(), nn.Module) or not hasattr(model, "get_decoder"):
            return None
        decoder = model.get_decoder()
        if type(decoder.get_input_embeddings()) is not nn.Embedding or not hasattr(decoder, "rotary_emb"):
            return None
        layers = []
        for block in decoder.layers:
            attention, mlp = block.self_attn, block.mlp
            weights = [effective_weight(m) for m in (attention.q_proj, attention.k_proj, attention.v_proj,
                                                     attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            norms = [_norm_weight(block.input_layernorm), _norm_weight(block.post_attention_layernorm)]
            if any(t is None for t in (*weights, *norms)):
                return None
            q, k, v, o, gate, up, down = weights
            layers.append(_Layer(norms[0], q, k, v, o, norms[1], gate, up, down))
        head, final_norm = effective_weight(model.get_output_embeddings()), _norm_weight(decoder.norm)
        if head is None or final_norm is None:
            return None
        return cls(model, layers, final_norm, head)

    def start(self, cache, total: int) -> None:
        """Copies the prefill's KV cache (transformers' ``DynamicCache``, (B, kv heads, P, head dim) per layer) into
        buffers of ``total`` positions."""
        self.keys, self.values = [], []
        for layer in cache.layers:
            keys, values = layer.keys, layer.values
            shape = (*keys.shape[:2], total, keys.shape[-1])
            self.keys.append(keys.new_empty(shape))
            self.values.append(values.new_empty(shape))
            self.keys[-1][:, :, : keys.shape[2]] = keys
            self.values[-1][:, :, : values.shape[2]] = values

    def step(self, tokens: Tensor, position: Tensor, mask: Tensor) -> Tensor:
        """Logits (B, V) after feeding ``tokens`` (B,) at ``position`` (B, 1); ``mask`` (B, L) marks the positions
        attended to, this step's (the last, L - 1) included."""
        batch, length = tokens.shape[0], mask.shape[1]
        slot = length - 1
        h = self.embed(tokens)  # (B, hidden)
        cos, sin = self.rotary(h, position)  # (B, 1, head dim)
        # (B, 1, 1, L), additive: 0 where attended, -inf at padding (measured faster than a boolean mask in SDPA)
        attend = torch.zeros(batch, 1, 1, length, dtype=h.dtype, device=h.device).masked_fill_(
            mask[:, None, None, :] == 0, float("-inf"))
        q_heads, groups = self.heads, self.heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, layer.attention_norm, self.eps)
            q = F.linear(x, layer.q).view(batch, q_heads, self.head_dim)
            k = F.linear(x, layer.k).view(batch, self.kv_heads, self.head_dim)
            qk = _rotate(torch.cat((q, k), dim=1), cos, sin)
            self.keys[i][:, :, slot] = qk[:, q_heads:]
            self.values[i][:, :, slot] = F.linear(x, layer.v).view(batch, self.kv_heads, self.head_dim)
            # The query heads of one key/value head attend as its queries: one (B, kv heads, groups, D) attention
            # without expanding the keys and values (query head h reads key/value head h // groups, as repeat_kv).
            attended = F.scaled_dot_product_attention(
                qk[:, :q_heads].view(batch, self.kv_heads, groups, self.head_dim), self.keys[i][:, :, :length],
                self.values[i][:, :, :length], attn_mask=attend,
            )
            h = h + F.linear(attended.reshape(batch, -1), layer.o)
            x = _rms_norm(h, layer.mlp_norm, self.eps)
            h = h + F.linear(F.silu(F.linear(x, layer.gate)) * F.linear(x, layer.up), layer.down)
        return F.linear(_rms_norm(h, self.final_norm, self.eps), self.head)


def _norm_weight(norm: nn.Module) -> Tensor | None:
    """An RMSNorm's weight when it is transformers' Llama RMSNorm (``weight * x / rms(x)``), else None."""
    if type(norm).__name__ != "LlamaRMSNorm" or type(norm.weight.data) is not Tensor:
        return None
    return norm.weight


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm: normalized in float32, back in ``x``'s dtype, then scaled by ``weight``."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary embedding of (B, heads, D) queries or keys with (B, 1, D) ``cos`` and ``sin``, as transformers'
    ``apply_rotary_pos_emb`` (the halves of each head rotated)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
