"""LoRA: the adapters' settings (:class:`LoRASpec`, ``--model.lora`` and ``--model.critic_lora``), wrapping a
model with them (:func:`apply_lora`, peft), and reading a plain LoRA linear's adapter (:func:`single_adapter`,
:func:`adapter_weights`: what the fused passes and the lean decode steps multiply by)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn


@dataclass
class LoRASpec:
    """Low-rank adapters (peft) on a model's linear layers."""

    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Adapter dropout (0 keeps the rollout and update log-probs identical)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear modules that get adapters (Llama attention projections by default)."""
    top_layers: int | None = None
    """Adapters on the last N transformer layers only (None: every layer). Nothing below them trains, so the
    backward pass stops there: a cheaper update (most useful for the critic, whose 4 passes per rollout batch are
    most of PPO's and VRPO's update), at the cost of the adapted model's capacity."""
    compute: Literal["input", "float32"] = "input"
    """The dtype the adapters multiply in. ``input``: their input's, so with bf16 base weights (``--model.dtype``) a
    bf16 copy of each small adapter matrix meets the bf16 activations; the parameters, their gradients and the
    optimizer state stay float32. ``float32``: peft's default, every adapter input (B x T x hidden) cast to float32
    first, the numerics of runs before 2026-12-05. With float32 weights both are the same. Measured on 2 Xeon cores
    (docs/performance.md): GRPO with passes of 32 rows 0.89-0.92x the time and 0.89x the memory of ``float32``; the
    base workload's passes of 8 rows unchanged (within run-to-run noise)."""


def num_layers_of(model: nn.Module) -> int:
    """The number of transformer layers (``num_hidden_layers`` of the model's text config)."""
    config = model.config
    return getattr(config, "num_hidden_layers", None) or config.get_text_config().num_hidden_layers


def apply_lora(model: nn.Module, spec: LoRASpec, causal_lm: bool) -> nn.Module:
    """Wraps ``model`` with peft LoRA adapters; only the adapters stay trainable.

    Raises:
        ValueError: ``spec.top_layers`` is not between 1 and the model's number of layers.
    """
    from peft import LoraConfig, get_peft_model

    if spec.compute not in ("input", "float32"):
        raise ValueError(f"LoRA compute={spec.compute!r} (--model.lora.compute or --model.critic_lora.compute) must "
                         "be 'input' or 'float32'")
    layers = pattern = None
    if spec.top_layers is not None:
        total = num_layers_of(model)
        if not 1 <= spec.top_layers <= total:
            raise ValueError(f"LoRA top_layers={spec.top_layers} (--model.lora.top_layers or "
                             f"--model.critic_lora.top_layers) must be between 1 and the model's {total} layers")
        layers = list(range(total - spec.top_layers, total))
        # The name of the module list that holds the layers ("layers" in Llama, "h" in GPT-2): peft finds a module's
        # layer index after it, also at the start of a name (a body without the causal LM's "model." prefix).
        pattern = next((name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                        if isinstance(m, nn.ModuleList) and len(m) == total), None)
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM" if causal_lm else None, layers_to_transform=layers, layers_pattern=pattern,
    )
    model = get_peft_model(model, config)
    if spec.compute == "input":
        adapters_in_input_dtype(model)
    return model


class InputDtypeLinear(nn.Linear):
    """An adapter matrix (peft's ``lora_A`` or ``lora_B``) that multiplies in its input's dtype: its float32
    parameter is cast, not the activations (the gradient flows back to the float32 parameter through the cast)."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


def adapters_in_input_dtype(model: nn.Module) -> nn.Module:
    """Makes every LoRA layer of a peft ``model`` multiply in its input's dtype (:attr:`LoRASpec.compute`), in
    place: peft's cast of the input to the adapters' float32 is turned off (its ``cast_input_dtype_enabled``,
    which ``peft.helpers.disable_input_dtype_casting`` sets too) and the adapter matrices cast themselves instead.
    The parameters, state dict and merge are unchanged."""
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.cast_input_dtype_enabled = False
            for adapters in (layer.lora_A, layer.lora_B):
                for matrix in adapters.values():
                    if type(matrix) is nn.Linear:
                        matrix.__class__ = InputDtypeLinear
    return model


def single_adapter(layer: nn.Module) -> str | None:
    """The name of a peft LoRA linear's one active adapter when it is plain LoRA (no variant such as DoRA, no bias,
    no dropout, not merged or disabled), else None."""
    from peft.tuners.lora import Linear as LoraLinear

    if type(layer) is not LoraLinear or layer.merged or layer.disable_adapters or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if a.bias is not None or b.bias is not None:
        return None
    if not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and dropout.p == 0)):
        return None
    return name


def adapter_weights(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """A plain LoRA linear's ``(A, B * scaling)``: (r, in) and (out, r)."""
    name = layer.active_adapters[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight * layer.scaling[name]
