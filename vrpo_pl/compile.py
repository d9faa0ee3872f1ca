"""Compiled transformer blocks for the passes that train (``--model.compile``).

A rollout batch on a CPU spends most of its update in small element-wise operators around the matrix products:
LoRA's casts, scalings and sums, RMSNorm, SwiGLU's gate, eager attention's mask, softmax and ``repeat_kv``
(``docs/performance.md``, "Where a rollout batch's time goes now"). ``torch.compile`` fuses them. What is compiled is
regional, torchtune's and litgpt's choice for speed of compilation: every child of each decoder layer (the MLP, the
norms) and every child of its attention module (the q/k/v/o projections with their LoRA adapters), plus the
attention kernel itself, with dynamic shapes. The attention module's own forward stays eager, because it updates
the KV cache that the shared-prompt passes (:mod:`vrpo_pl.prefix`) hand it, which would make the compiler
specialize on each layer's cache. One graph per module type then serves all layers (and the critic's body).

The compiled forwards are switched on only inside :func:`compiled_blocks`, which :func:`vrpo_pl.models.
training_attention` enters for the update's passes and for the pass that computes the old log-probs (so the first
PPO ratio is 1 in the update's own numerics). The decode loop and the frozen passes (reference, guide, values) stay
eager: they are not where the time goes (``docs/performance.md``), and each would add graphs of its own to compile.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

COMPILED_EAGER_ATTENTION = "vrpo_compiled_eager"
"""The name under which transformers' attention and mask interfaces know the compiled eager attention."""

_ATTENTION_NAMES = ("attn", "attention")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers: the ``ModuleList`` with ``num_hidden_layers`` entries.

    Raises:
        ValueError: the model has no such list (not a transformers decoder).
    """
    config = getattr(model, "config", None) or getattr(getattr(model, "backbone", None), "config", None)
    total = getattr(config, "num_hidden_layers", None) if config is not None else None
    if total is None and config is not None and hasattr(config, "get_text_config"):
        total = config.get_text_config().num_hidden_layers
    found = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == total), None)
    if found is None:
        raise ValueError(f"--model.compile: found no list of {total} decoder layers in {type(model).__name__}; "
                         "it works on transformers decoders (Llama, Qwen2, GPT-2, ...); turn it off for this model")
    return found


def compile_targets(layer: nn.Module) -> list[nn.Module]:
    """The modules of one decoder layer whose forwards are compiled: its children, except that an attention child
    (a name that ends in ``attn`` or ``attention``) is replaced by its own children that hold parameters (the
    projections)."""
    targets = []
    for name, child in layer.named_children():
        if name.lower().endswith(_ATTENTION_NAMES):
            targets += [c for c in child.children() if any(True for _ in c.parameters())]
        elif any(True for _ in child.parameters()) or list(child.children()):
            targets.append(child)
    return targets


def prepare_compiled_blocks(*models: nn.Module | None) -> int:
    """Gives every target module of each model's decoder layers a compiled forward (used inside
    :func:`compiled_blocks` only); None entries are skipped. Returns how many modules; compilation itself happens
    at their first call."""
    # One graph per module type, grad mode and shape family: the policy's and the critic's projections differ in
    # their adapters' shapes (q/o against k/v under grouped-query attention), and the old log-probs' pass runs
    # without gradients. SmolLM2's VRPO run makes 11 such recompilations; dynamo's default limit is 8 per function,
    # past which it would run the function eagerly with a warning.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    count = 0
    for model in models:
        if model is None:
            continue
        for layer in decoder_layers(model):
            for module in compile_targets(layer):
                module._vrpo_compiled_forward = torch.compile(module.forward, dynamic=True)
                count += 1
        model._vrpo_compiled = True
    register_compiled_eager_attention()
    return count


def is_compiled(model: nn.Module | None) -> bool:
    return model is not None and getattr(model, "_vrpo_compiled", False)


@contextmanager
def compiled_blocks(*models: nn.Module | None) -> Iterator[None]:
    """Runs the prepared models' layers with their compiled forwards; unprepared models are left alone."""
    swapped = []
    for model in models:
        if not is_compiled(model):
            continue
        for module in model.modules():
            compiled = module.__dict__.get("_vrpo_compiled_forward")
            if compiled is not None:
                module.forward = compiled  # an instance attribute: nn.Module.__call__ calls it
                swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward  # back to the class's forward


_registered = False


def register_compiled_eager_attention() -> None:
    """Registers transformers' eager attention, compiled, as ``COMPILED_EAGER_ATTENTION`` (with the eager mask)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    AttentionInterface.register(COMPILED_EAGER_ATTENTION, torch.compile(eager_attention_forward, dynamic=True))
    AttentionMaskInterface.register(COMPILED_EAGER_ATTENTION, eager_mask)
    _registered = True
