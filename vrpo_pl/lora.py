"""LoRA: the adapters' settings (:class:`LoRASpec`, ``--model.lora`` and ``--model.critic_lora``) and wrapping a
model with them (:func:`apply_lora`, peft)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


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
    return get_peft_model(model, config)
