"""Shared fixtures of the integration tests: the repository root and a helper that runs the ``vrpo`` CLI in-process.

The helper shrinks any shipped configuration to seconds on 2 CPU cores and writes every log and checkpoint under
a test's own directory. Paths are absolute so the tests do not depend on the working directory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (absolute)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def single_thread():
    """One intra-op thread for the tiny models: on 2 shared cores, two threads per op are several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data_path_args(config: Path) -> list[str]:
    """Makes a relative ``data.source.init_args.path`` of ``config`` absolute (relative paths resolve from the
    working directory; shipped configs are written relative to the repository root)."""
    data = (yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    path = (source.get("init_args") or {}).get("path")
    if path is None or Path(path).is_absolute():
        return []
    return ["--data.source.init_args.path", str(REPO_ROOT / path)]


def shrink_args(root: Path, *, max_steps: int = 2, max_new_tokens: int = 4) -> list[str]:
    """Overrides that make any shipped config a CPU run of seconds writing under ``root``.

    They keep the config's model, algorithm, callbacks and batch geometry (``tiny_model_args`` shrinks those).
    """
    return [
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.max_steps", str(max_steps),
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--model.generation.max_new_tokens", str(max_new_tokens),
    ]


@pytest.fixture(scope="session")
def tiny_model_args() -> list[str]:
    """Overrides that turn a SmolLM2 config into a tiny one: TinyLM policy, 2 prompts, a 2-prompt validation set.

    With :func:`shrink_args` (applied by ``run_cli``) any shipped config runs a rollout batch in about a second.
    """
    return [
        "--model.policy", "vrpo_pl.models.TinyLM",
        "--trainer.precision", "32-true",
        "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "1",
        "--data.prompts_per_rollout", "2",
        "--data.val_size", "2",
        "--data.val_batch_size", "2",
        "--model.ppo.epochs", "1",
        "--model.ppo.mini_batch_size", "2",
    ]


RunCLI = Callable[..., object]


@pytest.fixture(scope="session")
def run_cli(single_thread) -> RunCLI:
    """``run_cli(root, *overrides, subcommand="fit", config=TINY_CONFIG, max_steps=2, run=True)`` -> the CLI.

    With ``run=False`` it only parses and instantiates (``VRPOCLI(..., run=False)``): call ``cli.trainer.fit``
    yourself. ``subcommand`` is ignored then. Overrides come after the shrinking ones, so they win.
    """
    from vrpo_pl.cli import TRAINER_DEFAULTS, VRPOCLI, cli
    from vrpo_pl.data import PromptDataModule
    from vrpo_pl.system import RLSystem

    def run(root: Path, *overrides: str, subcommand: str = "fit", config: Path = TINY_CONFIG, max_steps: int = 2,
            run: bool = True):
        args = ["--config", str(config), *shrink_args(Path(root), max_steps=max_steps), *data_path_args(config),
                *overrides]
        # LightningCLI warns when sys.argv (here: pytest's) has arguments beside ``args``.
        with mock.patch.object(sys, "argv", ["vrpo"]):
            if not run:
                return VRPOCLI(RLSystem, PromptDataModule, run=False, args=args, trainer_defaults=TRAINER_DEFAULTS,
                               save_config_kwargs={"overwrite": True})
            return cli([subcommand, *args])

    return run


def event_files(root: Path) -> list[Path]:
    return sorted(Path(root).rglob("events.out.tfevents.*"))


@pytest.fixture(scope="session")
def read_events() -> Callable[[Path], object]:
    """``read_events(root)`` -> a loaded ``EventAccumulator`` over the single TensorBoard run under ``root``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(root: Path) -> EventAccumulator:
        files = event_files(root)
        assert len({f.parent for f in files}) == 1, f"expected one TensorBoard run under {root}, found {files}"
        accumulator = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "tensors": 0})
        accumulator.Reload()
        return accumulator

    return read


def trained_looking_system(run_cli, root: Path, *overrides: str):
    """A built system whose trainable weights are moved off their initialization (LoRA's B starts at zero), so
    exports and restores are checked on weights that differ from the base."""
    cli = run_cli(root, *overrides, run=False)
    system = cli.model
    system.configure_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in system.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return system.eval()
