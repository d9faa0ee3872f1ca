"""Bad input and faults, end to end through the ``vrpo`` command: each gives one clear message that names the input
and what to do, and nothing already written is lost.

| case | behaviour |
|---|---|
| unknown config key (flag or YAML), wrong type | parser error naming the key (jsonargparse), exit code 2 |
| model path that does not exist | FileNotFoundError naming the path and the flag |
| tokenizer without a pad token | handled: EOS pads (padding is always masked) |
| prompt longer than --model.prompt.max_prompt_tokens | ``truncate`` (default) keeps its end; ``error`` names it |
| non-UTF-8 data line, empty data file | ValueError naming file (and line) |
| checkpoint from an incompatible configuration | ValueError naming the checkpoint and what differs |
| NaN/inf loss | update skipped and counted (``train/skipped_updates``); stop after max_nonfinite_updates in a row |
| disk full while saving a checkpoint | CheckpointSaveError naming the path; the previous checkpoint stays loadable |
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_CONFIG, data_path_args

from vrpo_pl import losses
from vrpo_pl.checkpoint import CheckpointSaveError

LONG_PROMPTS = [f"State the final answer to the following arithmetic problem: {' + '.join([str(i)] * 40)} =" for i in
                range(12)]


def _checkpoints(directory: Path) -> list[str]:
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath", str(directory), "--trainer.callbacks.save_last", "true",
            "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1"]


def _jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
    return path


def _data(path: Path) -> list[str]:
    return ["--data.source.init_args.path", str(path)]


# ------------------------------------------------------------------------- errors before any training
def _unknown_yaml_key(tmp_path: Path) -> list[str]:
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({"model": {"ppo": {"epochz": 2}}}))
    return ["--config", str(config)]


def _non_utf8(tmp_path: Path) -> list[str]:
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "1 + 1 =", "answer": "2"}).encode()
    path.write_bytes(good + b"\n" + '{"prompt": "caf\u00e9 1 + 2 =", "answer": "3"}'.encode("latin-1") + b"\n")
    return _data(path)


def _empty(tmp_path: Path) -> list[str]:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return _data(path)


def _overlong_error(tmp_path: Path) -> list[str]:
    return [*_data(_jsonl(tmp_path / "long.jsonl", LONG_PROMPTS)), "--model.prompt.max_prompt_tokens", "16",
            "--model.prompt.overlong", "error", "--model.validate_at_start", "false"]


PARSER_ERRORS = [
    pytest.param(lambda t: ["--model.ppo.epochz", "2"], ["--model.ppo.epochz"], id="unknown-flag"),
    pytest.param(_unknown_yaml_key, ["model.ppo.epochz"], id="unknown-yaml-key"),
    pytest.param(lambda t: ["--model.ppo.epochs", "two"], ["model.ppo.epochs", "int", "two"], id="wrong-type"),
    pytest.param(lambda t: ["--model.algorithm", "dpo"], ["model.algorithm", "dpo"], id="wrong-choice"),
]


@pytest.mark.parametrize("make_args, expected", PARSER_ERRORS)
def test_config_errors_name_the_key(run_cli, tmp_path, capsys, make_args, expected):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, *make_args(tmp_path))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    for text in [*expected, "vrpo fit --help"]:
        assert text in message, f"{text!r} not in {message[-800:]!r}"


STARTUP_ERRORS = [
    pytest.param(lambda t: ["--model.policy", "vrpo_pl.models.PretrainedLM", "--model.policy.init_args.path",
                            str(t / "no-such-model")],
                 FileNotFoundError, ["no-such-model", "config.json", "--model.policy.init_args.path"],
                 id="model-path-missing"),
    pytest.param(_non_utf8, ValueError, ["latin1.jsonl:2", "not valid UTF-8", "re-save the file as UTF-8"],
                 id="non-utf8-line"),
    pytest.param(_empty, ValueError, ["empty.jsonl", "no records"], id="empty-dataset"),
    pytest.param(_overlong_error, ValueError, ["--model.prompt.max_prompt_tokens=16", "--model.prompt.overlong",
                                               "State the final answer"], id="overlong-prompt-error"),
]


@pytest.mark.parametrize("make_args, error_type, expected", STARTUP_ERRORS)
def test_bad_input_stops_with_a_message_naming_it(run_cli, tmp_path, make_args, error_type, expected):
    with pytest.raises(error_type) as error:
        run_cli(tmp_path / "run", *make_args(tmp_path), *_checkpoints(tmp_path / "ckpt"), max_steps=1)
    message = str(error.value)
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert not list(tmp_path.rglob("*.ckpt")), "nothing half-trained is saved"


# ------------------------------------------------------------------------- handled inputs
def test_overlong_prompts_are_truncated_by_default(run_cli, tmp_path):
    cli = run_cli(tmp_path, *_data(_jsonl(tmp_path / "long.jsonl", LONG_PROMPTS)),
                  "--model.prompt.max_prompt_tokens", "16", "--model.validate_at_start", "false", max_steps=1)
    assert cli.trainer.global_step == 1


def test_tokenizer_without_pad_token_pads_with_eos(run_cli, tmp_path):
    from vrpo_pl.models import TinyLM

    source = TinyLM()
    model_dir = tmp_path / "no-pad-model"
    source.causal_lm(torch.float32).save_pretrained(model_dir)
    tokenizer = source.tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    cli = run_cli(tmp_path / "run", "--model.policy", "vrpo_pl.models.PretrainedLM",
                  "--model.policy.init_args.path", str(model_dir), max_steps=1)
    assert cli.model.tokenizer.pad_token_id == cli.model.tokenizer.eos_token_id
    assert cli.trainer.global_step == 1


# ------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def one_rollout_checkpoint(run_cli, tmp_path_factory) -> Path:
    """A tiny.yaml (VRPO, full fine-tuning) checkpoint after one rollout batch."""
    root = tmp_path_factory.mktemp("one_rollout")
    run_cli(root, *_checkpoints(root / "ckpt"), max_steps=1)
    return root / "ckpt" / "last.ckpt"


@pytest.mark.parametrize("overrides, differs", [
    pytest.param(["--model.algorithm", "ppo"], "algorithm", id="other-algorithm"),
    pytest.param(["--model.lora", "{r: 4, alpha: 8}"], "trainable", id="lora-instead-of-full"),
    pytest.param(["--model.critic.latent_dim", "8"], "trainable_numel", id="other-critic-head"),
])
def test_checkpoint_from_an_incompatible_config_is_refused(run_cli, one_rollout_checkpoint, tmp_path, overrides,
                                                           differs):
    before = one_rollout_checkpoint.read_bytes()
    with pytest.raises(ValueError) as error:
        run_cli(tmp_path, *overrides, "--ckpt_path", str(one_rollout_checkpoint), max_steps=2)
    message = str(error.value)
    assert str(one_rollout_checkpoint) in message and "incompatible configuration" in message
    assert differs in message and "Resume with the configuration it was written with" in message
    assert one_rollout_checkpoint.read_bytes() == before


def test_disk_full_while_saving_keeps_the_previous_checkpoint(run_cli, tmp_path, monkeypatch):
    """Saving after rollout 2 hits ENOSPC mid-write: a clear error, and last.ckpt of rollout 1 still loads."""
    from vrpo_pl.export import load_trained_system

    ckpt = tmp_path / "ckpt"
    cli = run_cli(tmp_path / "run", *_checkpoints(ckpt), max_steps=3, run=False)
    real_save = torch.save

    def save_until_disk_full(obj, file, *args, **kwargs):
        if cli.model.rollouts < 2:
            return real_save(obj, file, *args, **kwargs)
        file.write(b"PK\x03\x04 partial")  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    with pytest.raises(CheckpointSaveError) as error:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    monkeypatch.undo()
    message = str(error.value)
    assert "no space left" in message and str(ckpt) in message
    assert "is intact" in message and "--ckpt_path" in message
    assert error.value.errno == errno.ENOSPC

    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"], "no partial files"
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["vrpo"]["rollouts"] == 1
    restored = load_trained_system(["--config", str(TINY_CONFIG), *data_path_args(TINY_CONFIG)], ckpt / "last.ckpt")
    assert restored.rollouts == 1


def _nan_loss(original):
    def wrapped(*args, **kwargs):
        first, *rest = original(*args, **kwargs)
        return (first * float("nan"), *rest)

    return wrapped


def test_nan_policy_loss_skips_and_counts_the_update(run_cli, read_events, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "clipped_policy_loss", _nan_loss(losses.clipped_policy_loss))
    cli = run_cli(tmp_path, run=False, max_steps=1)
    cli.model.configure_model()
    policy_before = {n: p.detach().clone() for n, p in cli.model.policy.named_parameters()}
    critic_before = {n: p.detach().clone() for n, p in cli.model.critic.named_parameters()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    skipped = read_events(tmp_path).Scalars("train/skipped_updates")
    # tiny.yaml: 2 epochs x (8 sequences / mini-batches of 4) = 4 policy steps, all skipped; the critic trains.
    assert [(e.step, e.value) for e in skipped] == [(1, 4.0)]
    assert all(torch.equal(p, policy_before[n]) for n, p in cli.model.policy.named_parameters())
    assert any(not torch.equal(p, critic_before[n]) for n, p in cli.model.critic.named_parameters())


def test_nan_losses_in_a_row_stop_the_run_and_keep_checkpoints(run_cli, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    cli = run_cli(tmp_path / "run", "--model.ppo.max_nonfinite_updates", "3", *_checkpoints(ckpt), max_steps=4,
                  run=False)
    model = cli.model

    def nan_from_rollout_2(original):
        def wrapped(*args, **kwargs):
            first, *rest = original(*args, **kwargs)
            return (first * float("nan") if model.rollouts >= 1 else first, *rest)

        return wrapped

    monkeypatch.setattr(losses, "clipped_policy_loss", nan_from_rollout_2(losses.clipped_policy_loss))
    monkeypatch.setattr(losses, "clipped_value_loss", nan_from_rollout_2(losses.clipped_value_loss))
    with pytest.raises(RuntimeError) as error:
        cli.trainer.fit(model, datamodule=cli.datamodule)
    message = str(error.value)
    assert "3 non-finite updates in a row" in message and "--model.ppo.max_nonfinite_updates" in message
    assert "rollout batch 1" in message
    checkpoint = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert checkpoint["vrpo"]["rollouts"] == 1, "the checkpoint before the NaNs is intact"
