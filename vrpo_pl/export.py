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

``OUT`` is written whole or not at all: the export goes to a temporary sibling directory that then replaces
``OUT``, so no file of an earlier export survives beside the new one (an adapter left beside merged weights would
be loaded on top of them). A non-empty ``OUT`` is refused unless ``--overwrite`` is given, and even then only when it
holds nothing but a previous export (``policy/``, ``critic/``). A failed export leaves ``OUT`` as it was.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from vrpo_pl.critic import ValueHead, ValueModel

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_CONFIG = "value_head.json"
EXPORT_ENTRIES = frozenset({"policy", "critic"})
"""What an export directory holds; ``--overwrite`` replaces a directory with nothing else in it."""


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
    from vrpo_pl.checkpoint import check_readable, load_checkpoint_file
    from vrpo_pl.cli import build_cli

    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_dir():
        raise ValueError(
            f"--ckpt_path {str(ckpt_path)!r} is a sharded checkpoint directory; export reads single-file checkpoints "
            "(the default of every strategy, FSDP2Strategy(save_distributed_checkpoint=False))"
        )
    check_readable(ckpt_path)  # before the models are built
    single = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
              "--trainer.strategy", "auto"]
    cli = build_cli([*config_args, *single], save_config_kwargs={"overwrite": True})
    system = cli.model
    system.configure_model()
    checkpoint = load_checkpoint_file(ckpt_path, map_location="cpu", weights_only=False)
    system.on_load_checkpoint(checkpoint)  # checks the fingerprint first
    missing, unexpected = system.load_state_dict(checkpoint["state_dict"], strict=False)
    if unexpected:
        raise ValueError(f"--ckpt_path {str(ckpt_path)!r} holds weights this configuration lacks: {unexpected[:5]}")
    trainable = {n for n, p in system.named_parameters() if p.requires_grad}
    absent = sorted(trainable & set(missing))
    if absent:
        raise ValueError(f"--ckpt_path {str(ckpt_path)!r} lacks trainable weights: {absent[:5]}")
    return system.eval()


def check_export_target(out: str | Path, overwrite: bool = False) -> None:
    """Refuses an ``--out`` that an export must not replace.

    Args:
        out: the export directory.
        overwrite: replace a previous export there (``--overwrite``).

    Raises:
        ValueError: ``out`` is a file; or it is a non-empty directory and ``overwrite`` is off; or it holds
            something besides a previous export (``policy/``, ``critic/``), which is never replaced.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory (it gets policy/ and critic/)")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not names:
        return
    if not overwrite:
        raise ValueError(
            f"--out {str(out)!r} is not empty ({', '.join(names[:5])}); pass --overwrite to replace it whole with "
            "the new export, or give a new or empty directory"
        )
    others = [name for name in names if name not in EXPORT_ENTRIES]
    if others:
        raise ValueError(
            f"--out {str(out)!r} holds more than a previous export ({', '.join(others[:5])}); --overwrite replaces "
            "only a directory with nothing but policy/ and critic/ in it: give a new or empty directory"
        )


def write_export(system, out: str | Path, adapter_only: bool = False, overwrite: bool = False) -> list[Path]:
    """Writes ``out/policy`` (and ``out/critic`` with a critic) in a temporary sibling directory, then puts it in
    place of ``out`` whole; ``out`` is left as it was if anything fails.

    Args:
        system: the trained :class:`~vrpo_pl.system.RLSystem`, built and not sharded.
        out: the export directory.
        adapter_only: save the policy's LoRA adapter alone (see :func:`export_policy`).
        overwrite: replace a previous export in ``out`` (see :func:`check_export_target`).

    Returns:
        The directories written (``out/policy`` and, with a critic, ``out/critic``).
    """
    check_export_target(out, overwrite)
    target = Path(os.path.abspath(out))  # a name and a parent even for "." or "exported/"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".vrpo-tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        export_policy(system, staging / "policy", merge_lora=not adapter_only)
        if system.critic is not None:
            export_critic(system, staging / "critic")
        _replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [Path(out) / name for name in ("policy", "critic") if (target / name).is_dir()]


def _replace_directory(new: Path, target: Path) -> None:
    """Renames ``new`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".vrpo-old", dir=target.parent))
    os.replace(target, aside)  # a directory renamed over an empty one (POSIX)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m vrpo_pl.export``; unknown arguments go to the ``vrpo`` parser. The project's own
    errors end with one line and exit status 2, as in ``vrpo`` (:func:`vrpo_pl.cli.run_reporting_errors`)."""
    from vrpo_pl.cli import run_reporting_errors

    run_reporting_errors(_export, argv)


def _export(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vrpo_pl.export",
        description="Writes OUT/policy (and OUT/critic) as Hugging Face directories from a vrpo checkpoint. "
                    "Pass the training run's --config and flags as well.",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint file (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True,
                        help="output directory; gets policy/ and critic/, written whole in a temporary sibling "
                             "directory and then put in its place; must be new or empty unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous export in --out whole (a directory with only policy/ and critic/); "
                             "no file of it is kept")
    parser.add_argument("--adapter-only", action="store_true", help="save the policy's LoRA adapter alone")
    args, config_args = parser.parse_known_args(argv)
    check_export_target(args.out, args.overwrite)  # before the minutes of loading the model
    system = load_trained_system(config_args, args.ckpt_path)
    written = write_export(system, args.out, adapter_only=args.adapter_only, overwrite=args.overwrite)
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
