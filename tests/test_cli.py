"""Tests of the ``vrpo`` command: every shipped YAML fits (shrunk), settings errors name the flag to fix, the help
shows the settings' docstrings, the callbacks import from anywhere, and ``validate`` runs from a checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vrpo_pl.cli import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted(
    path for path in (REPO_ROOT / "configs").rglob("*.yaml")
    if path.relative_to(REPO_ROOT / "configs").parts[0] != "data"
)
"""Every YAML under configs/, recursively, except the data files under configs/data/."""


def _config_id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT / "configs"))


def test_shipped_configs_are_found():
    names = {_config_id(p) for p in SHIPPED_CONFIGS}
    assert {"tiny.yaml", "ppo.yaml", "grpo.yaml", "vrpo.yaml"} <= names


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=_config_id)
def test_every_shipped_config_fits(run_cli, read_events, tiny_model_args, tmp_path, config):
    """Each YAML under configs/ (not configs/data/) runs one rollout batch with a TinyLM policy."""
    cli = run_cli(tmp_path, *tiny_model_args, config=config, max_steps=1)
    trainer = cli.trainer
    assert trainer.global_step == 1
    assert Path(trainer.log_dir).resolve().is_relative_to(tmp_path.resolve())
    for callback in trainer.checkpoint_callbacks:
        assert Path(callback.dirpath).resolve().is_relative_to(tmp_path.resolve())
    tags = read_events(tmp_path).Tags()["scalars"]
    assert {"reward/train", "loss/policy", "val/accuracy"} <= set(tags)


# ---------------------------------------------------------------- settings errors name the flag
@pytest.mark.parametrize(
    "overrides, expected",
    [
        pytest.param(["--model.ppo.mini_batch_size", "3", "--model.ppo.micro_batch_size", "1"],
                     ["--model.ppo.mini_batch_size=3", "must divide the rollout batch", "--data.prompts_per_rollout"],
                     id="mini-batch-does-not-divide-rollout"),
        pytest.param(["--model.ppo.micro_batch_size", "3"],
                     ["--model.ppo.micro_batch_size=3", "must divide --model.ppo.mini_batch_size"],
                     id="micro-does-not-divide-mini"),
        pytest.param(["--model.algorithm", "grpo", "--data.samples_per_prompt", "1"],
                     ["--data.samples_per_prompt", "grpo"], id="grpo-one-sample"),
        pytest.param(["--model.algorithm", "vrpo", "--model.critic.aux", "predict", "--trainer.callbacks", "[]"],
                     ["vrpo_pl.callbacks.FrozenLMTargets", "--model.critic.aux"], id="aux-without-guide-callback"),
        pytest.param(["--model.policy", "vrpo_pl.models.PretrainedLM", "--model.policy.init_args.path",
                      "/nonexistent/model-dir"], ["/nonexistent/model-dir"], id="missing-model-path"),
        pytest.param(["--trainer.precision", "16-true"], ["--trainer.precision 16-true"], id="precision-16-true"),
    ],
)
def test_settings_errors_name_the_flag(run_cli, tmp_path, overrides, expected):
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        run_cli(tmp_path, *overrides)
    for text in expected:
        assert text in str(error.value), f"{text!r} not in {str(error.value)!r}"


# ---------------------------------------------------------------- help and print_config
def _flat(text: str) -> str:
    """Help text with line wrapping undone."""
    return " ".join(text.split())


def test_vrpo_console_script_runs_the_cli():
    script = Path(sys.executable).parent / "vrpo"
    assert script.exists(), f"the vrpo console script is not installed next to {sys.executable}"
    assert "vrpo_pl.cli" in script.read_text() and "main" in script.read_text()


def test_fit_help_shows_setting_docstrings(capsys, monkeypatch):
    """``vrpo fit --help`` (the parser, in-process) shows the settings' attribute docstrings."""
    monkeypatch.setattr(sys, "argv", ["vrpo"])
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--help"])
    assert exit_info.value.code == 0
    text = _flat(capsys.readouterr().out)
    assert "--model.ppo.mini_batch_size" in text
    assert "Sequences per optimizer step; must divide the rollout batch" in text  # PPOSettings.mini_batch_size
    assert "GAE lambda (0.95 TRL/MOSS/NeMo; 1.0 OpenRLHF/verl)." in text  # PPOSettings.lam
    assert "VIB KL weight (our choice, measured" in text  # CriticSettings.beta
    assert "LoRA adapters on the policy" in text  # RLSystem's lora argument
    assert "--model.lora.help" in text


def test_lora_help_shows_field_docstrings(capsys, monkeypatch):
    """LoRASpec is an optional dataclass: its fields' docstrings show with ``--model.lora.help``."""
    monkeypatch.setattr(sys, "argv", ["vrpo"])
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--model.lora.help", "vrpo_pl.lora.LoRASpec"])
    assert exit_info.value.code == 0
    text = _flat(capsys.readouterr().out)
    assert "--model.lora.r" in text and "Adapter rank." in text
    assert "Scaling numerator: the update is scaled by alpha / r." in text


def test_print_config_of_vrpo_yaml(capsys, monkeypatch, repo_root):
    monkeypatch.setattr(sys, "argv", ["vrpo"])
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", "--print_config", "--config", str(repo_root / "configs" / "vrpo.yaml")])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["algorithm"] == "vrpo"
    assert config["model"]["critic"]["aux"] == "predict"
    assert config["model"]["ppo"]["mini_batch_size"] == 8
    callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "vrpo_pl.callbacks.FrozenLMTargets" in callbacks


# ---------------------------------------------------------------- callbacks' import name
@pytest.mark.slow
def test_callbacks_import_from_any_directory(tmp_path):
    """``vrpo_pl.callbacks`` imports from an unrelated directory, and the generic name ``callbacks`` is not taken."""
    script = (
        "import vrpo_pl.callbacks as c; print(c.__file__); print(c.KLController.__name__)\n"
        "try:\n    import callbacks\nexcept ModuleNotFoundError:\n    print('NO-TOP-LEVEL')\n"
        "else:\n    print('TOP-LEVEL', callbacks.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split()
    assert lines[0].endswith("__init__.py") and "callbacks" in lines[0]
    assert lines[1] == "KLController"
    assert lines[-1] == "NO-TOP-LEVEL", result.stdout


# ---------------------------------------------------------------- validate from a checkpoint
@pytest.mark.slow
def test_validate_from_last_checkpoint(run_cli, read_events, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    fit = run_cli(tmp_path / "fit", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  "--trainer.callbacks.dirpath", str(checkpoints), "--trainer.callbacks.save_last", "true",
                  max_steps=2)
    assert fit.trainer.global_step == 2
    last = checkpoints / "last.ckpt"
    assert last.exists(), sorted(p.name for p in checkpoints.iterdir())

    validate = run_cli(tmp_path / "validate", "--ckpt_path", str(last), subcommand="validate")
    assert validate.model.rollouts == 2, "the RL state (rollout counter) comes back from the checkpoint"
    assert "val/accuracy" in validate.trainer.callback_metrics
    accuracy = read_events(tmp_path / "validate").Scalars("val/accuracy")
    assert [e.step for e in accuracy] == [2]
    assert 0.0 <= accuracy[0].value <= 1.0
