"""Export of a trained system as plain Hugging Face directories.

    python -m vrpo_pl.export --config configs/vrpo.yaml --ckpt_path runs/vrpo/version_0/checkpoints/last.ckpt \\
        --out exported/ [--adapter-only] [other vrpo fit flags the run used]

writes ``OUT/policy`` (``AutoModelForCausalLM.from_pretrained(OUT/policy)`` loads it; LoRA merged into the
weights, or with ``--adapter-only`` the adapter alone, which peft loads onto the base model) and, for PPO/VRPO,
``OUT/critic`` (the value model: its body as a Hugging Face model plus ``value_head.safetensors`` and
``value_head.json``; :func:`load_critic` rebuilds the :class:`~vrpo_pl.models.ValueModel`). Both directories
hold the tokenizer. The system is built through the ``vrpo`` command's own parser from the same configuration
and flags as the training run; the checkpoint must be a single file (the default for every strategy, see
:mod:`vrpo_pl.checkpoint`).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn

from vrpo_pl.critic import ValueHead, ValueModel

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_CONFIG = "value_head.json"


def _check_not_sharded(model: nn.Module) -> None:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            "the model is sharded (FSDP2): export from its checkpoint in a single process with "
            "`python -m vrpo_pl.export --config ... --ckpt_path CKPT --out DIR`"
        )


def _merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its LoRA adapters merged into the base weights (the model itself if none)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload()


def export_policy(system, out_dir: str | Path, merge_lora: bool = True) -> Path:
    """Saves the policy (and the tokenizer) as a Hugging Face directory.

    Args:
        system: an :class:`~vrpo_pl.system.RLSystem` with its models built (``configure_model``), not sharded.
        out_dir: the directory to write (created).
        merge_lora: with LoRA, merge the adapters into a copy of the base weights (a plain model that
            ``AutoModelForCausalLM`` loads); False saves the adapter alone (``peft.PeftModel.from_pretrained(base,
            out_dir)`` loads it). Ignored without LoRA.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    policy = system.policy
    if policy is None:
        raise ValueError("the system has no policy yet: call configure_model() (or load a checkpoint) first")
    _check_not_sharded(policy)
    is_peft = hasattr(policy, "merge_and_unload")
    model = _merged(policy) if merge_lora or not is_peft else policy
    model.save_pretrained(out)
    system.tokenizer.save_pretrained(out)
    return out


def export_critic(system, out_dir: str | Path) -> Path:
    """Saves the value model: its body (LoRA merged) as a Hugging Face directory, the head beside it.

    The head's weights go to ``value_head.safetensors`` and its shape settings to ``value_head.json``;
    :func:`load_critic` reads them back.

    Args:
        system: an :class:`~vrpo_pl.system.RLSystem` with a critic (PPO or VRPO), not sharded.
        out_dir: the directory to write (created).
    """
    from safetensors.torch import save_file

    critic = system.critic
    if critic is None:
        raise ValueError(f"--model.algorithm {system.algorithm} has no critic to export")
    _check_not_sharded(critic)
    out = Path(out_dir)
    _merged(critic.backbone).save_pretrained(out)
    head = critic.head
    config = head.config  # the constructor arguments, saved rather than inferred from weight shapes
    (out / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(out / HEAD_WEIGHTS))
    system.tokenizer.save_pretrained(out)
    return out


def load_critic(path: str | Path, dtype: torch.dtype | None = None) -> ValueModel:
    """Rebuilds a :class:`~vrpo_pl.models.ValueModel` written by :func:`export_critic`.

    Args:
        path: the exported critic directory.
        dtype: the body's dtype (default: as saved); the head is float32 as in training.
    """
    from safetensors.torch import load_file
    from transformers import AutoModel

    path = Path(path)
    if not (path / HEAD_CONFIG).exists():
        raise FileNotFoundError(f"{str(path)!r} is not an exported critic (no {HEAD_CONFIG}); see vrpo_pl.export")
    head = ValueHead(**json.loads((path / HEAD_CONFIG).read_text()))
    head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
    body = AutoModel.from_pretrained(path, **({} if dtype is None else {"dtype": dtype}))
    return ValueModel(body, head).eval()


def load_trained_system(config_args: list[str], ckpt_path: str | Path):
    """Builds the system from ``vrpo fit`` arguments (through the ``vrpo`` parser) and loads a checkpoint into it.

    The trainer is forced to one CPU process (nothing is launched); the checkpoint's fingerprint is checked
    against the configuration as when resuming.
    """
    from vrpo_pl.cli import build_cli

    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():
        raise ValueError(
            f"--ckpt_path {str(ckpt_path)!r} is a sharded checkpoint directory; export reads single-file checkpoints "
            "(the default of every strategy, FSDP2Strategy(save_distributed_checkpoint=False))"
        )
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--ckpt_path {str(ckpt_path)!r} does not exist")
    single = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
              "--trainer.strategy", "auto"]
    cli = build_cli([*config_args, *single], save_config_kwargs={"overwrite": True})
    system = cli.model
    system.configure_model()
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    system.on_load_checkpoint(checkpoint)  # checks the fingerprint first
    missing, unexpected = system.load_state_dict(checkpoint["state_dict"], strict=False)
    if unexpected:
        raise ValueError(f"--ckpt_path {str(ckpt_path)!r} holds weights this configuration lacks: {unexpected[:5]}")
    trainable = {n for n, p in system.named_parameters() if p.requires_grad}
    absent = sorted(trainable & set(missing))
    if absent:
        raise ValueError(f"--ckpt_path {str(ckpt_path)!r} lacks trainable weights: {absent[:5]}")
    return system.eval()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m vrpo_pl.export``; unknown arguments go to the ``vrpo`` parser."""
    parser = argparse.ArgumentParser(
        prog="python -m vrpo_pl.export",
        description="Writes OUT/policy (and OUT/critic) as Hugging Face directories from a vrpo checkpoint. "
                    "Pass the training run's --config and flags as well.",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint file (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="output directory; gets policy/ and critic/")
    parser.add_argument("--adapter-only", action="store_true", help="save the policy's LoRA adapter alone")
    args, config_args = parser.parse_known_args(argv)
    system = load_trained_system(config_args, args.ckpt_path)
    out = Path(args.out)
    written = [export_policy(system, out / "policy", merge_lora=not args.adapter_only)]
    if system.critic is not None:
        written.append(export_critic(system, out / "critic"))
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
