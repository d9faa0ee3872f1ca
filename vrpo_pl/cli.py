"""The ``vrpo`` command: LightningCLI over :class:`RLSystem` and :class:`PromptDataModule`.

    vrpo fit --config configs/vrpo.yaml [--trainer.strategy ddp] [--model.ppo.epochs 4 ...]
    vrpo fit --config configs/vrpo.yaml --ckpt_path runs/.../checkpoints/last.ckpt   # resume exactly
    vrpo validate --config configs/vrpo.yaml --ckpt_path runs/.../last.ckpt
    python -m vrpo_pl.export --config configs/vrpo.yaml --ckpt_path runs/.../last.ckpt --out exported/

Strategies, by flag on the same config (see :mod:`vrpo_pl.distributed`): ``--trainer.strategy ddp`` or
``--trainer.strategy fsdp2`` with ``--trainer.devices N`` (CPU: gloo; GPUs: nccl); FSDP1 (``fsdp``) on GPUs only,
refused on CPU before anything is built. Several nodes: ``--trainer.num_nodes M`` under Lightning's launchers
(``torchrun``, SLURM). Checkpoints are written atomically by default (``trainer.plugins``:
:class:`vrpo_pl.checkpoint.AtomicCheckpointIO`), so a crash or a full disk while saving keeps the previous one.

Every setting's documentation (its attribute docstring) shows in ``vrpo fit --help``; nested settings with
``class_path`` (sources, rewards, callbacks) show theirs with ``--help CLASS``-style options of jsonargparse,
e.g. ``vrpo fit --model.reward.help vrpo_pl.rewards.SymmetricFlip``.
"""

from __future__ import annotations

import sys
import warnings

import jsonargparse
from lightning.pytorch.cli import LightningCLI

from vrpo_pl.data import PromptDataModule
from vrpo_pl.distributed import check_strategy  # importing it registers --trainer.strategy fsdp2
from vrpo_pl.system import RLSystem

# Attribute docstrings (the text under each dataclass field) become --help text.
jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

TRAINER_DEFAULTS = {
    # One training step is one rollout batch, so max_steps counts rollout batches (see RLSystem).
    "max_steps": 100,
    # The training stream is infinite: validate every N rollout batches instead of once per epoch.
    "val_check_interval": 10,
    "check_val_every_n_epoch": None,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    # Checkpoints are written to a temporary file and renamed over the target: a crash or a full disk while
    # saving leaves the previous checkpoint loadable (vrpo_pl.checkpoint). Passing --trainer.plugins replaces
    # this list: keep vrpo_pl.checkpoint.AtomicCheckpointIO in it.
    "plugins": [{"class_path": "vrpo_pl.checkpoint.AtomicCheckpointIO"}],
}


class VRPOCLI(LightningCLI):
    """LightningCLI with the project's trainer defaults and checks of the strategy before anything is built."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        check_strategy(_setting_name(trainer.get("strategy")), _setting_name(trainer.get("accelerator")))


def _setting_name(value) -> str:
    """A parsed trainer setting (a name, or ``class_path``/``init_args``) as a name; None as ``auto``."""
    if value is None or isinstance(value, str):
        return value or "auto"
    return getattr(value, "class_path", None) or type(value).__name__


def build_cli(args: list[str], **kwargs) -> VRPOCLI:
    """The CLI parsed from ``args`` alone, without running a subcommand (for export and the benchmarks).

    ``sys.argv`` is set aside while parsing: LightningCLI warns when it holds arguments beside ``args``.
    """
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return VRPOCLI(RLSystem, PromptDataModule, run=False, args=args, trainer_defaults=TRAINER_DEFAULTS, **kwargs)
    finally:
        sys.argv = argv


def cli(args: list[str] | None = None) -> VRPOCLI:
    """Runs the CLI and returns it (``args`` for tests; default: ``sys.argv``)."""
    return VRPOCLI(
        RLSystem,
        PromptDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


# Lightning warnings that describe this design rather than a problem, silenced so real warnings stand out: the
# frozen reference/guide are in eval mode on purpose, and a checkpoint after the rollout batch's optimizer steps is
# exactly the state to resume from.
QUIET_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
)


def main() -> None:
    """Entry point of the ``vrpo`` console script."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    cli()


if __name__ == "__main__":
    main()
