"""Bad input and faults, end to end through the ``vrpo`` command: each gives one clear message that names the input
and what to do, and nothing already written is lost.

| case | behaviour |
|---|---|
| unknown config key (flag or YAML), wrong type or choice | one line naming the key and ``vrpo fit --help``, exit 2 |
| model path missing, a model directory without weights or tokenizer | one line naming it and the flag |
| a broken model cache under ``VRPO_CACHE`` | one line naming the directory: delete it (converted again) |
| a read-only log or checkpoint directory | refused before anything is created, naming it and its setting |
| tokenizer without a pad token | handled: EOS pads (padding is always masked) |
| prompt longer than --model.prompt.max_prompt_tokens | ``truncate`` (default) keeps its end; ``error`` names it |
| non-UTF-8 data line, empty data file | ValueError naming file (and line) |
| checkpoint from an incompatible configuration | ValueError naming the checkpoint and what differs |
| NaN/inf loss | update skipped and counted (``train/skipped_updates``); stop after max_nonfinite_updates in a row |
| disk full while saving (torch's RuntimeError over the OSError) | CheckpointSaveError naming the path; previous kept |
| disk full while writing an FSDP2 sharded checkpoint directory | the same; the previous directory kept whole |
| ``--ckpt_path last`` | resumes the newest last checkpoint of an earlier ``version_N``; none: names where it looked |
| a failed start | leaves no ``version_N`` directory (one it did not create, or that holds more, stays) |
| a reward that stays NaN | each batch skipped; stop after max_nonfinite_updates in a row, checkpoints kept |
| a NaN gold reward | RewardError naming the reward and the sample (not ``val/accuracy = nan``) |
| export into a non-empty directory | refused without ``--overwrite``; with it, replaced whole (no stale adapter) |

A data record without the answer the reward needs is refused at start, naming file:line and ``answer_key``.
Library errors about our inputs are re-raised naming them: a YAML syntax error (file, line, column), a missing,
empty or truncated checkpoint, and the trainer settings that manual optimization ignores (accumulate_grad_batches,
gradient_clip_val, --optimizer, --lr_scheduler: each points to the setting that does the job).

Through ``vrpo``'s entry point (:func:`vrpo_pl.cli.main`) every error of the project's own checks above ends the
command with one line, ``error: <message>``, and exit status 2; ``VRPO_DEBUG=1`` re-raises it with its traceback,
and other exceptions (bugs) always keep theirs. :func:`_assert_one_line` checks each such case: exit status 2, no
traceback, and a last line that names the input and the fix. Values that used to be accepted and silently wrong are
refused there: a negative ``--model.rewards.clip`` or ``--model.ppo.value_clip``, ``--model.prompt.max_prompt_tokens``
<= 0, ``--model.critic.decoder_hidden 0``, a ``KLController`` horizon that can turn the coefficient negative, and a
``--trainer.val_check_interval`` that is not an integer >= 1.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from conftest import REPO_ROOT, TINY_CONFIG, data_path_args, shrink_args

from vrpo_pl import losses
from vrpo_pl.checkpoint import CheckpointSaveError
from vrpo_pl.rewards import RewardFunction

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


def _model_dir(tmp_path: Path, damage: str) -> Path:
    """A saved TinyLM directory (config, weights, tokenizer) with one part missing or cut short."""
    from vrpo_pl.models import TinyLM

    path = tmp_path / f"model-{damage}"
    source = TinyLM()
    source.causal_lm(torch.float32).save_pretrained(path)
    source.tokenizer().save_pretrained(path)
    weights = path / "model.safetensors"
    if damage == "without-weights":
        weights.unlink()
    elif damage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "without-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            (path / name).unlink(missing_ok=True)
    return path


def _pretrained(path: Path) -> list[str]:
    return ["--model.policy", "vrpo_pl.models.PretrainedLM", "--model.policy.init_args.path", str(path)]


HELP = ["run `vrpo fit --help` for the accepted options"]

PARSER_ERRORS = [
    pytest.param(lambda t: ["--model.ppo.epochz", "2"], ["unrecognized arguments: --model.ppo.epochz"], HELP,
                 id="unknown-flag"),
    pytest.param(_unknown_yaml_key, ["model.ppo.epochz"], HELP, id="unknown-yaml-key"),
    pytest.param(lambda t: ["--model.ppo.epochs", "two"], ["model.ppo.epochs", "int", "two"], HELP, id="wrong-type"),
    pytest.param(lambda t: ["--model.algorithm", "dpo"], ["model.algorithm", "dpo"], HELP, id="wrong-choice"),
]


@pytest.mark.parametrize("make_args, names, fix", PARSER_ERRORS)
def test_config_errors_name_the_key(run_main, tmp_path, make_args, names, fix):
    """jsonargparse's own errors, one line too (its 40-line usage is left out)."""
    code, err = run_main(*make_args(tmp_path))
    _assert_one_line(code, err, names, fix)
    assert "usage:" not in err


STARTUP_ERRORS = [
    pytest.param(lambda t: _pretrained(t / "no-such-model"), FileNotFoundError, ["no-such-model", "no config.json"],
                 ["Pass a local directory saved with save_pretrained", "--model.policy.init_args.path"],
                 id="model-path-missing"),
    pytest.param(lambda t: _pretrained(_model_dir(t, "without-tokenizer")), ValueError,
                 ["model-without-tokenizer': its tokenizer cannot be loaded", "none of tokenizer.json"],
                 ["tokenizer.save_pretrained(DIR)", "--model.policy.init_args.path"], id="model-dir-without-tokenizer"),
    pytest.param(lambda t: _pretrained(_model_dir(t, "without-weights")), ValueError,
                 ["model-without-weights': its weights cannot be loaded", "no file named model.safetensors"],
                 ["model.save_pretrained(DIR)", "--model.policy.init_args.path"], id="model-dir-without-weights"),
    pytest.param(lambda t: _pretrained(_model_dir(t, "truncated-weights")), ValueError,
                 ["model-truncated-weights': its weights cannot be loaded", "deserializing header"],
                 ["model.save_pretrained(DIR)", "--model.policy.init_args.path"], id="model-dir-truncated-weights"),
    pytest.param(_non_utf8, ValueError, ["latin1.jsonl:2", "not valid UTF-8"], ["re-save the file as UTF-8"],
                 id="non-utf8-line"),
    pytest.param(_empty, ValueError, ["empty.jsonl", "no records"], ["add at least one 'prompt' record"],
                 id="empty-dataset"),
    pytest.param(_overlong_error, ValueError, ["State the final answer", "over --model.prompt.max_prompt_tokens=16"],
                 ["raise the limit or set --model.prompt.overlong truncate"], id="overlong-prompt-error"),
]


@pytest.mark.parametrize("make_args, error_type, names, fix", STARTUP_ERRORS)
def test_bad_input_stops_with_a_message_naming_it(run_cli, tmp_path, make_args, error_type, names, fix):
    with pytest.raises(error_type) as error:
        run_cli(tmp_path / "run", *make_args(tmp_path), *_checkpoints(tmp_path / "ckpt"), max_steps=1)
    message = str(error.value)
    for text in [*names, *fix]:
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


class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes and then fails each write with ENOSPC, as a full disk does."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)


@pytest.mark.parametrize("torch_writes", [True, False], ids=["torch-runtime-error", "os-error"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(run_cli, tmp_path, monkeypatch, torch_writes):
    """Saving after rollout 2 hits ENOSPC mid-write: a clear error, and last.ckpt of rollout 1 still loads.

    ``torch-runtime-error``: torch.save itself writes into a file that runs out of room, and raises what it really
    raises then (a RuntimeError of its zip writer whose context is the OSError); ``os-error``: an OSError.
    """
    from vrpo_pl.export import load_trained_system

    ckpt = tmp_path / "ckpt"
    cli = run_cli(tmp_path / "run", *_checkpoints(ckpt), max_steps=3, run=False)
    real_save = torch.save

    def save_until_disk_full(obj, file, *args, **kwargs):
        if cli.model.rollouts < 2:
            return real_save(obj, file, *args, **kwargs)
        if torch_writes:
            return real_save(obj, _FullDisk(file, room=4096), *args, **kwargs)
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


# ------------------------------------------------------------------------- one line through `vrpo`'s entry point
@pytest.fixture()
def run_main(single_thread, tmp_path, capsys):
    """``run_main(*overrides, max_steps=1)`` -> (exit status, stderr) of ``vrpo fit`` on tiny.yaml via ``main``."""
    from vrpo_pl.cli import main

    def run(*overrides: str, max_steps: int = 1, subcommand: str = "fit") -> tuple[int | str | None, str]:
        args = [subcommand, "--config", str(TINY_CONFIG), *shrink_args(tmp_path / "run", max_steps=max_steps),
                *data_path_args(TINY_CONFIG), *overrides]
        capsys.readouterr()
        with mock.patch.object(sys, "argv", ["vrpo"]), pytest.raises(SystemExit) as exit_info:
            main(args)
        return exit_info.value.code, capsys.readouterr().err

    return run


def _assert_one_line(code, err: str, names: list[str], fix: list[str]) -> None:
    """What every expected error of the command gives: exit status 2, no traceback (without ``VRPO_DEBUG``), and a
    last line ``error: ...`` that names the input (``names``) and says what to do (``fix``)."""
    assert names and fix, "each case states the input its message names and the fix it gives"
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for text in [*names, *fix]:
        assert text in last, f"{text!r} not in {last!r}"


def _kl_horizon(tmp_path: Path, horizon: int) -> list[str]:
    config = tmp_path / "kl.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "vrpo_pl.callbacks.KLController", "init_args": {"target": 1.0, "horizon": horizon}}]}}))
    return ["--config", str(config)]


def _without_answer(tmp_path: Path) -> Path:
    path = _jsonl(tmp_path / "without-answer.jsonl", [f"{i} + 1 =" for i in range(12)])
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"prompt": "2 + 1 ="})
    path.write_text("\n".join(lines) + "\n")
    return path


def _broken_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  ppo: {epochs: 2\n")
    return path


class RaisingReward(RewardFunction):
    """A reward whose scorer crashes."""

    def score(self, completions):
        raise KeyError("scorer lost its table")


ONE_LINE_ERRORS = [
    pytest.param(lambda t: ["--model.rewards.clip=-1"], ["--model.rewards.clip=-1.0"],
                 ["must be > 0 (or null: no clipping)"], id="reward-clip"),
    pytest.param(lambda t: ["--model.ppo.value_clip=-0.2"], ["--model.ppo.value_clip=-0.2"],
                 ["must be > 0 (or null for plain MSE)"], id="value-clip"),
    pytest.param(lambda t: ["--model.prompt.max_prompt_tokens", "0"], ["--model.prompt.max_prompt_tokens=0"],
                 ["must be >= 1"], id="max-prompt-tokens-0"),
    pytest.param(lambda t: ["--model.prompt.max_prompt_tokens", "-3"], ["--model.prompt.max_prompt_tokens=-3"],
                 ["must be >= 1"], id="max-prompt-tokens-negative"),
    pytest.param(lambda t: ["--model.critic.decoder_hidden", "0"], ["--model.critic.decoder_hidden=0"],
                 ["must be >= 1"], id="decoder-hidden-0"),
    pytest.param(lambda t: ["--trainer.val_check_interval", "0"], ["--trainer.val_check_interval=0"],
                 ["must be an integer >= 1: the number of rollout batches between validations"],
                 id="val-check-interval-0"),
    pytest.param(lambda t: ["--trainer.val_check_interval", "0.5"], ["--trainer.val_check_interval=0.5"],
                 ["must be an integer >= 1"], id="val-check-interval-fraction"),
    pytest.param(lambda t: _kl_horizon(t, 1), ["KLController: horizon=1"], ["must be > 0.2 * 8 = 1.6"],
                 id="kl-horizon-negative-coef"),
    pytest.param(lambda t: ["--model.reward", f"{__name__}.RaisingReward", "--model.validate_at_start", "false"],
                 ["the reward RaisingReward raised on", "KeyError", "scorer lost its table"],
                 ["fix RaisingReward (VRPO_DEBUG=1 shows where it raised)"], id="raising-reward"),
    pytest.param(lambda t: ["--config", str(_broken_yaml(t))],
                 ["--config", "broken.yaml: not valid YAML at line 3, column 1"], ["expected ',' or '}'"],
                 id="yaml-syntax-error"),
    pytest.param(lambda t: ["--trainer.accumulate_grad_batches", "4"],
                 ["--trainer.accumulate_grad_batches=4 does not apply"], ["set --model.ppo.micro_batch_size"],
                 id="accumulate-grad-batches"),
    pytest.param(lambda t: ["--trainer.gradient_clip_val", "1.0"], ["--trainer.gradient_clip_val=1.0 does not apply"],
                 ["set --model.optim.policy_max_grad_norm and --model.optim.critic_max_grad_norm"],
                 id="gradient-clip-val"),
    pytest.param(lambda t: ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"], ["--optimizer does not apply"],
                 ["see --model.optim"], id="optimizer"),
    pytest.param(lambda t: ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1"],
                 ["--lr_scheduler does not apply"], ["no learning-rate schedule"], id="lr-scheduler"),
    pytest.param(lambda t: _data(_without_answer(t)),
                 ["without-answer.jsonl: record without-answer.jsonl:3 ('2 + 1 =') has no 'answer'",
                  "SymmetricFlip (its NumericVerifier)"],
                 ["add it to every record, or set --data.source.init_args.answer_key"], id="record-without-answer"),
    pytest.param(lambda t: ["--data.source.init_args.answer_key", "solution"],
                 ["record arithmetic.jsonl:1", "has no 'solution'"], ["set --data.source.init_args.answer_key"],
                 id="wrong-answer-key"),
    pytest.param(lambda t: ["--trainer.callbacks", "[]"], ["--model.critic.aux predict needs the callback",
                                                         "vrpo_pl.callbacks.FrozenLMTargets"],
                 ["add it under trainer.callbacks", "or set --model.critic.aux none"], id="missing-guide-callback"),
    *[pytest.param(make_args, names, fix, id=case.id) for case in STARTUP_ERRORS
      for make_args, _, names, fix in [case.values]],
]


@pytest.mark.parametrize("make_args, names, fix", ONE_LINE_ERRORS)
def test_expected_errors_print_one_line_and_exit_2(run_main, tmp_path, make_args, names, fix):
    code, err = run_main(*make_args(tmp_path), *_checkpoints(tmp_path / "ckpt"))
    _assert_one_line(code, err, names, fix)
    assert not list(tmp_path.rglob("*.ckpt")), "nothing half-trained is saved"
    assert not list(tmp_path.rglob("version_*")), "a failed start leaves no log directory"


def test_incompatible_checkpoint_is_one_line_and_left_alone(run_main, one_rollout_checkpoint):
    before = one_rollout_checkpoint.read_bytes()
    code, err = run_main("--model.algorithm", "ppo", "--ckpt_path", str(one_rollout_checkpoint), max_steps=2)
    _assert_one_line(code, err, [str(one_rollout_checkpoint), "incompatible configuration", "algorithm"],
                     ["Resume with the configuration it was written with"])
    assert one_rollout_checkpoint.read_bytes() == before


def test_debug_switch_shows_the_traceback(run_main, monkeypatch):
    monkeypatch.setenv("VRPO_DEBUG", "1")
    with pytest.raises(ValueError, match="--model.rewards.clip=-1.0 must be > 0"):
        run_main("--model.rewards.clip=-1")


def test_a_bug_keeps_its_traceback(run_main, monkeypatch):
    from vrpo_pl.system import RLSystem

    def broken_step(self, batch, batch_idx):
        return [1, 2][5]  # stands in for a bug: Python raises, no check of ours does

    monkeypatch.setattr(RLSystem, "training_step", broken_step)
    with pytest.raises(IndexError):
        run_main("--model.validate_at_start", "false")


def test_only_our_own_raise_statements_count_as_expected_errors():
    """A ``raise`` in the package is one of its checks; Python failing inside the package's code is a bug."""
    from vrpo_pl.cli import error_line, is_project_error

    namespace = {"__name__": "vrpo_pl.example"}
    exec(compile("def check(x):\n    raise ValueError(\n        f'--model.x={x} must be >= 1'\n    )\n"
                 "def buggy(x):\n    return int(x)\n", "vrpo_pl/example.py", "exec"), namespace)
    outside = {"__name__": "some_library"}
    exec(compile("def check(x):\n    raise ValueError('bad')\n", "some_library.py", "exec"), outside)
    for function, expected in [(namespace["check"], True), (namespace["buggy"], False), (outside["check"], False)]:
        with pytest.raises(ValueError) as error:
            function("x")
        assert is_project_error(error.value) is expected, function
    with pytest.raises(ValueError) as error:
        namespace["check"]("x")
    assert error_line(error.value) == "error: --model.x=x must be >= 1"
    full = OSError(errno.ENOSPC, "no space left while saving 'a.ckpt'")
    assert error_line(full) == "error: no space left while saving 'a.ckpt'"


@pytest.mark.parametrize("horizon, n_samples, ok", [(2, 8, True), (1, 8, False), (20, 100, False), (21, 100, True)])
def test_kl_horizon_that_could_turn_the_coefficient_negative_is_refused(horizon, n_samples, ok):
    from vrpo_pl.callbacks.kl_control import adaptive_kl_update

    if ok:
        assert adaptive_kl_update(0.1, 0.0, 1.0, horizon, n_samples) > 0  # the largest decrease still leaves > 0
    else:
        with pytest.raises(ValueError, match=f"KLController: horizon={horizon} must be > 0.2 \\* {n_samples}"):
            adaptive_kl_update(0.1, 0.0, 1.0, horizon, n_samples)


def test_vrpo_command_prints_one_line_and_exits_2(tmp_path):
    """The installed console script itself: no traceback, the flag and its range on the last line."""
    args = ["fit", "--config", str(TINY_CONFIG), *shrink_args(tmp_path), *data_path_args(TINY_CONFIG),
            "--model.rewards.clip=-1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VRPO_DEBUG", None)
    result = subprocess.run([str(Path(sys.executable).parent / "vrpo"), *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    _assert_one_line(result.returncode, result.stderr, ["--model.rewards.clip=-1.0"], ["must be > 0 (or null"])


def test_known_harmless_library_warnings_are_silenced_and_others_kept():
    import warnings

    from vrpo_pl.cli import quiet_known_warnings

    emitted = [  # (message, category, the module that triggers it)
        ("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, "lightning.pytorch.utilities"),
        ("Your `IterableDataset` has `__len__` defined. In ...", UserWarning, "lightning.pytorch.utilities"),
        ("\n    ``ArgumentParser.add_instantiator`` was deprecated in v4.49.0 and ...\n", DeprecationWarning,
         "lightning.pytorch.cli"),
        ("\n    skip_none parameter was deprecated in v4.49.0 and\n    will be removed", DeprecationWarning,
         "lightning.pytorch.cli"),
        ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use ...", FutureWarning,
         "transformers.modeling_utils"),
        ("`isinstance(treespec, LeafSpec)` is deprecated", UserWarning, "x"),  # another category: kept
        ("a real problem", FutureWarning, "lightning.pytorch.utilities"),
        ("``x`` was deprecated in v4.49.0", DeprecationWarning, "mine"),  # another module: kept
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        for message, category, module in emitted:
            warnings.warn_explicit(message, category, f"{module}.py", 1, module=module)
    assert [str(w.message) for w in caught] == [m for m, _, _ in emitted[5:]]


def test_lightning_cloud_advertisements_are_dropped_and_other_info_kept(caplog):
    """Lightning logs a litlogger and a litmodels tip on every run: the CLI drops those two, nothing else."""
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from vrpo_pl.cli import quiet_known_warnings

    quiet_known_warnings()
    quiet_known_warnings()  # idempotent: one filter
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert len(log.filters) == 1
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero_info("💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]")
        rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_model_summary_counts_parameters_without_flops(run_cli, tmp_path, monkeypatch):
    """Lightning's summary ends in ``Total FLOPs: 0`` (it measures only an example_input_array RLSystem lacks): the
    command's summary keeps the parameter counts and drops the FLOPs; enable_model_summary false still turns it off."""
    from lightning.pytorch.callbacks import ModelSummary
    from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

    from vrpo_pl.callbacks import ParameterSummary, parameter_summary

    cli = run_cli(tmp_path, "--trainer.enable_model_summary", "true", run=False)
    summaries = [c for c in cli.trainer.callbacks if isinstance(c, ModelSummary)]
    assert [type(c) for c in summaries] == [ParameterSummary]
    printed: list[str] = []
    monkeypatch.setattr(parameter_summary, "rank_zero_info", printed.append)
    cli.model.configure_model()
    summaries[0].on_fit_start(cli.trainer, cli.model)
    (text,) = printed
    assert "flop" not in text.lower()
    trainable = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    assert f"{get_human_readable_count(trainable):<10}Trainable params" in text
    assert "| policy " in text and "| critic " in text
    off = run_cli(tmp_path / "off", run=False)  # shrink_args: --trainer.enable_model_summary false
    assert not [c for c in off.trainer.callbacks if isinstance(c, ModelSummary)]


# ------------------------------------------------------------------------- export into an existing directory
LORA = ["--model.lora", "{r: 4, alpha: 8}", "--model.critic_lora", "{r: 4, alpha: 8}"]


@pytest.fixture(scope="module")
def lora_system(run_cli, tmp_path_factory):
    """A LoRA system whose adapters are moved off their initialization (B starts at zero)."""
    from conftest import trained_looking_system

    return trained_looking_system(run_cli, tmp_path_factory.mktemp("lora_system"), *LORA)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _policy_logits(system, policy_dir: Path, adapter: bool) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if adapter:
        model = PeftModel.from_pretrained(system.policy_source.causal_lm(torch.float32), policy_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(policy_dir)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("first_adapter", [True, False], ids=["adapter-then-merged", "merged-then-adapter"])
def test_export_over_a_previous_export_equals_a_clean_one(lora_system, tmp_path, first_adapter):
    from vrpo_pl.export import write_export

    clean = tmp_path / "clean"
    write_export(lora_system, clean, adapter_only=not first_adapter)
    out = tmp_path / "out"
    write_export(lora_system, out, adapter_only=first_adapter)
    write_export(lora_system, out, adapter_only=not first_adapter, overwrite=True)
    assert _tree(out).keys() == _tree(clean).keys(), "no file of the earlier export is left"
    torch.testing.assert_close(_policy_logits(lora_system, out / "policy", adapter=not first_adapter),
                               _policy_logits(lora_system, clean / "policy", adapter=not first_adapter),
                               rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "out"], "no temporary directory is left"


def test_export_into_a_non_empty_directory_is_refused_and_left_alone(lora_system, tmp_path):
    from vrpo_pl.export import write_export

    out = tmp_path / "out"
    write_export(lora_system, out, adapter_only=True)
    before = _tree(out)
    with pytest.raises(ValueError, match=r"--out .*out' is not empty \(critic, policy\); pass --overwrite"):
        write_export(lora_system, out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds more than a previous export \(notes.txt\)"):
        write_export(lora_system, out, overwrite=True)
    assert _tree(out) == {**before, "notes.txt": b"mine"}


def test_failed_export_leaves_the_previous_one(lora_system, tmp_path, monkeypatch):
    from vrpo_pl import export

    out = tmp_path / "out"
    export.write_export(lora_system, out, adapter_only=True)
    before = _tree(out)

    def disk_full(system, out_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "export_critic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export.write_export(lora_system, out, overwrite=True)
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "the half-written export is removed"


def test_export_directory_follows_the_umask(lora_system, tmp_path):
    from vrpo_pl.export import write_export

    umask = os.umask(0o027)
    try:
        write_export(lora_system, tmp_path / "out")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


def test_export_command_refuses_a_non_empty_out_before_loading(single_thread, tmp_path, capsys):
    from vrpo_pl.export import main

    out = tmp_path / "out"
    (out / "policy").mkdir(parents=True)
    (out / "policy" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt_path", str(tmp_path / "never-read.ckpt"), "--out", str(out)])
    _assert_one_line(exit_info.value.code, capsys.readouterr().err, [str(out), "not empty"], ["pass --overwrite"])
    assert _tree(out) == {"policy/config.json": b"{}"}


def test_atomic_checkpoint_io_on_a_full_disk_and_on_other_errors(tmp_path, monkeypatch):
    """Unit level: torch's RuntimeError over an ENOSPC becomes CheckpointSaveError and the old file stays; a
    RuntimeError that is not about the file propagates as it is; a saved file follows the umask."""
    from vrpo_pl.checkpoint import AtomicCheckpointIO

    io_plugin, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    umask = os.umask(0o022)
    try:
        io_plugin.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644, "not mkstemp's 0600"
    before = path.read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, _FullDisk(f, room=64), *a, **k))
    with pytest.raises(CheckpointSaveError, match="no space left on the device") as error:
        io_plugin.save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, path)
    assert isinstance(error.value.__cause__, RuntimeError), "what torch raises, not a fake OSError"

    def unrelated(*args, **kwargs):
        raise RuntimeError("not about the file")

    monkeypatch.setattr(torch, "save", unrelated)
    with pytest.raises(RuntimeError, match="not about the file") as error:
        io_plugin.save_checkpoint({"step": 3}, path)
    assert not isinstance(error.value, CheckpointSaveError)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _sharded(value: float) -> dict:
    """What Lightning hands a strategy to save: weights, optimizer states and the rest (meta.pt)."""
    return {"state_dict": {"w": torch.full((1000,), value)}, "optimizer_states": [], "rollouts": int(value)}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_sharded_checkpoint_directory_is_replaced_whole(tmp_path):
    """FSDP2's ``save_distributed_checkpoint=True`` on one process: the new save takes the old one's place, and no
    shard of the old one (here: of an earlier save on 2 processes) survives beside the new ones."""
    from torch.distributed.checkpoint import load

    from vrpo_pl.distributed import FSDP2Strategy

    strategy, path = FSDP2Strategy(save_distributed_checkpoint=True), tmp_path / "last.ckpt"
    strategy.save_checkpoint(_sharded(1.0), path)
    (path / "__1_0.distcp").write_bytes(b"a shard of an earlier save on 2 processes")
    strategy.save_checkpoint(_sharded(2.0), path)
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "meta.pt"]
    state = {"state_dict": {"w": torch.zeros(1000)}}
    load(state, checkpoint_id=path)
    assert torch.equal(state["state_dict"]["w"], torch.full((1000,), 2.0))
    assert torch.load(path / "meta.pt", weights_only=True) == {"rollouts": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary directory is left"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("killed_between_renames", [False, True], ids=["previous-in-place", "previous-set-aside"])
def test_a_full_disk_while_writing_shards_keeps_the_previous_directory(tmp_path, monkeypatch, killed_between_renames):
    """The disk fills while torch.distributed.checkpoint writes a shard: a clear error, the previous directory as it
    was. ``previous-set-aside``: an earlier save was killed between its two renames; this one puts it back."""
    from vrpo_pl.distributed import FSDP2Strategy

    strategy, path = FSDP2Strategy(save_distributed_checkpoint=True), tmp_path / "last.ckpt"
    strategy.save_checkpoint(_sharded(1.0), path)
    before = _tree(path)
    if killed_between_renames:
        path.rename(tmp_path / ".last.ckpt.vrpo-old")
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, _FullDisk(f, room=64), *a, **k))
    with pytest.raises(CheckpointSaveError, match="no space left on the device") as error:
        strategy.save_checkpoint(_sharded(2.0), path)
    monkeypatch.undo()
    assert str(path) in str(error.value) and "is intact" in str(error.value)
    assert _tree(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary directory is left"


# ------------------------------------------------------------------------- runs that would do nothing and exit 0
def test_ckpt_path_last_without_a_checkpoint_names_where_it_looked(run_main, tmp_path):
    code, err = run_main("--ckpt_path", "last")
    _assert_one_line(code, err, ["--ckpt_path last: no last checkpoint (last.ckpt) in",
                                 str(tmp_path / "run" / "tiny" / "version_0" / "checkpoints")],
                     ["give a checkpoint file with --ckpt_path PATH"])
    assert not list(tmp_path.rglob("*.ckpt")), "it did not train from scratch"


def test_ckpt_path_last_points_to_the_newest_earlier_run(run_cli, run_main, tmp_path):
    run_cli(tmp_path / "run", max_steps=2)  # the default ModelCheckpoint saves at the validation after rollout 2
    (earlier,) = (tmp_path / "run" / "tiny" / "version_0" / "checkpoints").glob("*.ckpt")
    before = earlier.read_bytes()
    code, err = run_main("--ckpt_path", "last")
    _assert_one_line(code, err, [str(tmp_path / "run" / "tiny" / "version_1" / "checkpoints"),
                                 f"nor in the earlier runs' {str(tmp_path / 'run' / 'tiny' / '*' / 'checkpoints')!r}"],
                     ["the newest checkpoint of an earlier run is not a last one: resume it with "
                      f"--ckpt_path {earlier}"])
    assert earlier.read_bytes() == before and len(list(tmp_path.rglob("*.ckpt"))) == 1


def test_ckpt_path_last_resumes_the_newest_earlier_run(run_cli, tmp_path, capsys):
    """Each run logs to a new version_N: ``last`` takes the newest last.ckpt of an earlier version, and says so."""
    save = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_last",
            "true", "--trainer.callbacks.every_n_train_steps", "1", "--model.validate_at_start", "false"]
    runs = tmp_path / "run" / "tiny"
    run_cli(tmp_path / "run", *save, max_steps=1)
    first = runs / "version_0" / "checkpoints" / "last.ckpt"
    before = first.read_bytes()
    capsys.readouterr()
    resumed = run_cli(tmp_path / "run", *save, "--ckpt_path", "last", max_steps=2)
    assert (f"--ckpt_path last: resuming {str(first)!r}, the newest last checkpoint of an earlier run; this run logs "
            f"to {str(runs / 'version_1')!r}") in capsys.readouterr().out
    assert resumed.model.rollouts == resumed.trainer.global_step == 2
    assert first.read_bytes() == before
    again = run_cli(tmp_path / "run", *save, "--ckpt_path", "last", max_steps=3)
    assert f"resuming {str(runs / 'version_1' / 'checkpoints' / 'last.ckpt')!r}" in capsys.readouterr().out
    assert again.model.rollouts == again.trainer.global_step == 3


def test_a_failed_start_keeps_a_log_directory_it_did_not_create(run_main, tmp_path):
    version = tmp_path / "run" / "tiny" / "version_0"
    version.mkdir(parents=True)
    (version / "notes.txt").write_text("mine")
    code, err = run_main("--trainer.callbacks", "[]", "--trainer.logger.init_args.version", "0")
    _assert_one_line(code, err, ["--model.critic.aux predict needs the callback"], ["or set --model.critic.aux none"])
    assert (version / "notes.txt").read_text() == "mine"


def test_remove_failed_start_removes_only_what_a_start_writes(tmp_path):
    """Unit level: a directory with more than config.yaml, hparams.yaml and event files, or of a run that trained or
    logged, stays; otherwise it goes with the parents this run created, unless another run is in them."""
    import shutil
    from types import SimpleNamespace

    from vrpo_pl.run_directory import first_created, remove_failed_start

    def trainer(global_step: int = 0, callback_metrics: dict | None = None) -> SimpleNamespace:
        return SimpleNamespace(global_step=global_step, callback_metrics=callback_metrics or {}, logged_metrics={})

    quiet = trainer()
    log_dir = tmp_path / "runs" / "tiny" / "version_0"
    created = first_created(log_dir)
    assert created == tmp_path / "runs"

    def start(*extra: str) -> None:
        for name in ("config.yaml", "hparams.yaml", "events.out.tfevents.1.host.1.0", *extra):
            (log_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (log_dir / name).write_text("x")

    start("checkpoints/last.ckpt")
    assert not remove_failed_start(log_dir, created, quiet) and (log_dir / "checkpoints" / "last.ckpt").exists()
    shutil.rmtree(log_dir / "checkpoints")
    assert not remove_failed_start(log_dir, created, trainer(global_step=1)) and log_dir.is_dir()
    assert not remove_failed_start(log_dir, created, trainer(callback_metrics={"val/accuracy": 0.5}))
    (tmp_path / "runs" / "tiny" / "version_1").mkdir()  # another run started beside this one
    assert remove_failed_start(log_dir, created, quiet)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["runs", "runs/tiny",
                                                                                 "runs/tiny/version_1"]
    (tmp_path / "runs" / "tiny" / "version_1").rmdir()
    start()
    assert remove_failed_start(log_dir, created, quiet) and list(tmp_path.iterdir()) == []


class NaNFromSecondBatch(RewardFunction):
    """The verifier's scores for the first rollout batch, NaN for every one after; the gold stays the verifier's."""

    def __init__(self) -> None:
        from vrpo_pl.rewards import NumericVerifier

        self.verifier, self.calls = NumericVerifier(), 0

    def score(self, completions):
        scores, self.calls = self.verifier.score(completions), self.calls + 1
        if self.calls > 1:
            scores.train = torch.full_like(scores.train, float("nan"))
        return scores

    def gold_score(self, completions):
        return self.verifier.gold_score(completions)


def test_a_reward_that_stays_nan_stops_the_run_and_keeps_checkpoints(run_main, tmp_path):
    ckpt = tmp_path / "ckpt"
    code, err = run_main("--model.reward", f"{__name__}.NaNFromSecondBatch", "--model.ppo.max_nonfinite_updates", "2",
                         "--model.validate_at_start", "false", "--trainer.val_check_interval", "100",
                         *_checkpoints(ckpt), max_steps=6)
    _assert_one_line(code, err, ["2 rollout batches in a row had a non-finite reward from NaNFromSecondBatch",
                                 "rollout batch 2"],
                     ["Check the reward function, or raise --model.ppo.max_nonfinite_updates"])
    trained = torch.load(ckpt / "epoch=0-step=1.ckpt", weights_only=True)
    last = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert trained["vrpo"]["rollouts"] == 1 and last["vrpo"]["rollouts"] in (1, 2)
    assert last["state_dict"].keys() == trained["state_dict"].keys()
    assert all(torch.equal(v, trained["state_dict"][k]) for k, v in last["state_dict"].items()), \
        "the checkpoints hold the trained batch's weights, nothing trained on the NaNs"
    assert list((tmp_path / "run").rglob("events.out.tfevents.*")), "a run that logged keeps its log directory"


class NaNGold(RewardFunction):
    """A reward whose gold is NaN (a broken verifier)."""

    def score(self, completions):
        from vrpo_pl.rewards import RewardScores

        return RewardScores(train=torch.zeros(len(completions)), gold=torch.full((len(completions),), float("nan")))


def test_a_nan_gold_reward_at_validation_names_the_reward(run_main, tmp_path):
    code, err = run_main("--model.reward", f"{__name__}.NaNGold", "--trainer.callbacks", "[]",
                         "--model.algorithm", "ppo")  # ppo: no callback is needed
    _assert_one_line(code, err, ["the gold score is not finite: the reward NaNGold returned nan for sample 0 of a "
                                 "validation batch"], ["fix NaNGold's gold"])
    assert not list(tmp_path.rglob("*.ckpt"))


# ------------------------------------------------------------------------- noise across ranks
def _noise_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One process of the 2-process noise test: flips, a checkpoint state, and the draws after it."""
    import torch.distributed as dist

    from vrpo_pl.rewards import NumericVerifier, SymmetricFlip
    from vrpo_pl.rewards.base import Completion

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        completions = [Completion(prompt="1 + 1 =", response=str(2 - i % 2), answer="2") for i in range(2000)]
        noise = SymmetricFlip(NumericVerifier(), p=0.3, seed=0)
        first = noise.score(completions)
        state = noise.state_dict()  # collective, as in Lightning's checkpoint dump on every rank
        expected = noise.score(completions).train
        resumed = SymmetricFlip(NumericVerifier(), p=0.3, seed=99)
        resumed.load_state_dict(_broadcast_state(state))
        torch.save({"flips": first.train != first.gold, "after_resume": resumed.score(completions).train,
                    "expected": expected, "saved_ranks": len(state.get("generator_by_rank", []))},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _broadcast_state(state):
    """Rank 0's state dict on every rank: only rank 0's is written to the checkpoint, every rank loads that one."""
    import torch.distributed as dist

    holder = [state]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def test_noise_draws_differ_across_ranks_and_resume_per_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_noise_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(ranks[0]["flips"], ranks[1]["flips"]), "each rank draws its own flips"
    for r in ranks:
        assert abs(r["flips"].float().mean().item() - 0.3) < 0.035  # 2000 draws: SE 0.010
        assert r["saved_ranks"] == 2
        assert torch.equal(r["after_resume"], r["expected"]), "each rank resumes its own generator"
    assert abs(torch.cat([r["flips"] for r in ranks]).float().mean().item() - 0.3) < 0.025


class RaisesOnRank1(RewardFunction):
    """The verifier on rank 0; a crashing scorer on rank 1 (imported by the ``vrpo`` subprocesses)."""

    def score(self, completions):
        import torch.distributed as dist

        from vrpo_pl.rewards import NumericVerifier

        if dist.is_initialized() and dist.get_rank() == 1:
            raise KeyError("rank 1 scorer lost its table")
        return NumericVerifier().score(completions)


@pytest.mark.slow
def test_an_error_on_rank_1_is_one_line_on_each_rank(tmp_path):
    """2-process DDP: rank 1 names the reward in its line, rank 0 says it lost rank 1; no traceback anywhere."""
    args = ["fit", "--config", str(TINY_CONFIG), *shrink_args(tmp_path), *data_path_args(TINY_CONFIG),
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--model.algorithm", "ppo",
            "--trainer.callbacks", "[]", "--model.validate_at_start", "false",
            "--model.reward", "test_faults.RaisesOnRank1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "tests")}
    env.pop("VRPO_DEBUG", None)
    result = subprocess.run([str(Path(sys.executable).parent / "vrpo"), *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert any(line.startswith("error: [rank 1] the reward RaisesOnRank1 raised on rollout batch 0") and
               "rank 1 scorer lost its table" in line for line in lines), lines
    assert lines[-1].startswith("error: [rank 0] another process of this run stopped (its error is above)"), lines
    assert not list(tmp_path.rglob("*.ckpt"))


# ------------------------------------------------------------------------- library errors re-raised naming the input
@pytest.mark.parametrize("damage, expected", [
    pytest.param(lambda data: b"", "is empty (0 bytes)", id="empty"),
    pytest.param(lambda data: data[: len(data) // 2], "is truncated or damaged", id="truncated"),
    pytest.param(None, "does not exist", id="missing"),
])
def test_unreadable_checkpoint_is_named_on_resume_and_export(run_main, one_rollout_checkpoint, tmp_path, capsys,
                                                            damage, expected):
    from vrpo_pl.export import main as export_main

    ckpt = tmp_path / "copy.ckpt"
    if damage is not None:
        ckpt.write_bytes(damage(one_rollout_checkpoint.read_bytes()))
    before = ckpt.read_bytes() if damage is not None else None
    code, err = run_main("--ckpt_path", str(ckpt))
    _assert_one_line(code, err, [f"--ckpt_path {str(ckpt)!r} {expected}"], ["resume from another checkpoint"])
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--config", str(TINY_CONFIG), *data_path_args(TINY_CONFIG), "--ckpt_path", str(ckpt),
                     "--out", str(tmp_path / "exported")])
    _assert_one_line(exit_info.value.code, capsys.readouterr().err, [f"--ckpt_path {str(ckpt)!r} {expected}"],
                     ["resume from another checkpoint"])
    assert (ckpt.read_bytes() if damage is not None else None) == before and not (tmp_path / "exported").exists()


@pytest.fixture()
def read_only_dir(tmp_path):
    """A directory nothing can be written in: mode 0o555 for a user; for root, which ignores modes, a read-only
    tmpfs (skipped where root cannot mount one)."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {mounted.stderr.strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("make_args, names, fix", [
    pytest.param(lambda ro: ["--trainer.logger.init_args.save_dir", str(ro / "runs")],
                 lambda ro: [f"the log directory {str(ro / 'runs' / 'tiny' / 'version_0')!r} cannot be created: "
                             f"{str(ro)!r} is "], ["set --trainer.logger.init_args.save_dir to a writable directory"],
                 id="logger-save-dir"),
    pytest.param(lambda ro: ["--trainer.logger", "false", "--trainer.default_root_dir", str(ro / "runs")],
                 lambda ro: [f"the log directory {str(ro / 'runs')!r} cannot be created: {str(ro)!r} is "],
                 ["set --trainer.default_root_dir to a writable directory"], id="default-root-dir"),
    pytest.param(lambda ro: _checkpoints(ro / "ckpt"),
                 lambda ro: [f"the checkpoint directory {str(ro / 'ckpt')!r} cannot be created: {str(ro)!r} is "],
                 ["set the ModelCheckpoint callback's dirpath (trainer.callbacks) or "
                  "--trainer.logger.init_args.save_dir to a writable directory"], id="checkpoint-dirpath"),
])
def test_a_read_only_log_or_checkpoint_directory_is_named_before_anything_runs(run_main, read_only_dir, tmp_path,
                                                                              make_args, names, fix):
    code, err = run_main(*make_args(read_only_dir))
    _assert_one_line(code, err, names(read_only_dir), fix)
    assert not list(tmp_path.rglob("version_*"))


def test_a_broken_model_cache_is_named_with_what_to_do(run_main, tmp_path, monkeypatch):
    """A converted SmolLM2 under $VRPO_CACHE whose weights were cut short (a disk that filled, a copy)."""
    broken = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    broken.parent.mkdir()
    _model_dir(tmp_path, "truncated-weights").rename(broken)
    monkeypatch.setenv("VRPO_CACHE", str(tmp_path / "cache"))
    code, err = run_main("--model.policy", "vrpo_pl.models.SmolLM2")
    _assert_one_line(code, err, [f"the model cache {str(broken)!r}", "is broken: its weights cannot be loaded"],
                     ["delete that directory: the next run converts the model again from its package"])
    assert (broken / "config.json").exists(), "named, not deleted behind the user's back"
    assert not list(tmp_path.rglob("version_*"))


def test_atomic_checkpoint_io_names_an_unreadable_file(tmp_path):
    """``Trainer.fit(ckpt_path=...)`` from Python loads through the plugin: the same messages as the command."""
    from vrpo_pl.checkpoint import AtomicCheckpointIO, CheckpointLoadError

    io_plugin, path = AtomicCheckpointIO(), tmp_path / "a.ckpt"
    io_plugin.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    assert torch.equal(io_plugin.load_checkpoint(path, weights_only=True)["w"], torch.ones(1000))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointLoadError, match=r"'.*a.ckpt' is truncated or damaged \(300 bytes; torch: "):
        io_plugin.load_checkpoint(path, weights_only=True)
    path.write_bytes(b"")
    with pytest.raises(CheckpointLoadError, match="is empty"):
        io_plugin.load_checkpoint(path, weights_only=True)


def test_validate_prints_its_metrics(single_thread, one_rollout_checkpoint, tmp_path, capsys):
    from vrpo_pl.cli import main

    with mock.patch.object(sys, "argv", ["vrpo"]):
        main(["validate", "--config", str(TINY_CONFIG), *shrink_args(tmp_path), *data_path_args(TINY_CONFIG),
              "--ckpt_path", str(one_rollout_checkpoint)])
    out = capsys.readouterr().out
    assert f"validation (rollout 1, checkpoint {one_rollout_checkpoint}): {{" in out and "'val/accuracy': " in out


# ------------------------------------------------------------------------- a checkpoint and its base model
def test_lora_checkpoint_is_refused_on_another_base_of_the_same_shape(run_cli, run_main, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_cli(tmp_path / "first", *LORA, *_checkpoints(ckpt), max_steps=1)
    before = (ckpt / "last.ckpt").read_bytes()
    code, err = run_main(*LORA, "--model.policy.init_args.seed", "1", "--ckpt_path", str(ckpt / "last.ckpt"),
                         max_steps=2)
    _assert_one_line(code, err, ["incompatible configuration", "base: ['TinyLM(", "seed=0)'] in the checkpoint",
                                 "seed=1)'] now"], ["Resume with the configuration it was written with"])
    assert (ckpt / "last.ckpt").read_bytes() == before


def test_pretrained_identity_follows_the_weights_not_the_path(tmp_path):
    import shutil

    from vrpo_pl.models import PretrainedLM, TinyLM

    for seed in (0, 1):
        TinyLM(seed=seed).causal_lm(torch.float32).save_pretrained(tmp_path / f"seed{seed}")
    shutil.copytree(tmp_path / "seed0", tmp_path / "moved")
    ids = {name: PretrainedLM(str(tmp_path / name)).identity() for name in ("seed0", "seed1", "moved")}
    assert ids["seed0"] == ids["moved"] != ids["seed1"]
    assert ids["seed0"].startswith("PretrainedLM(config and weights sha1 ")


# ------------------------------------------------------------------------- guide statistics across ranks
def _guide_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's (B, A, 2) raw targets and (B, A) mask: other lengths and scales on each rank."""
    generator = torch.Generator().manual_seed(rank)
    width = 5 + 3 * rank
    raw = torch.rand(4, width, 2, generator=generator) * (1 + 2 * rank)
    mask = (torch.arange(width) < torch.tensor([width, width - 1, 2, 3])[:, None]).float()
    return raw, mask


def _guide_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from vrpo_pl.callbacks import FrozenLMTargets

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        targets = FrozenLMTargets()
        for _ in range(2):
            out = targets.finalize(*_guide_batch(rank))
        torch.save({"state": targets.state_dict(), "key": out.key, "standardized": out.standardized},
                   f"{out_dir}/guide{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_guide_statistics_and_key_tokens_are_global_across_ranks(tmp_path):
    """Two gloo processes standardize and mark key tokens as one process does on their concatenated batch."""
    import torch.multiprocessing as mp

    from vrpo_pl.callbacks import FrozenLMTargets

    mp.spawn(_guide_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"guide{r}.pt", weights_only=True) for r in range(2)]
    batches = [_guide_batch(r) for r in range(2)]
    width = max(raw.shape[1] for raw, _ in batches)
    raw = torch.cat([torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) for r, _ in batches])
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for _, m in batches])
    single = FrozenLMTargets()
    for _ in range(2):
        expected = single.finalize(raw, mask)
    for r, result in enumerate(ranks):
        for got, want in zip(result["state"]["moments"], single.state_dict()["moments"], strict=True):
            assert got == pytest.approx(want, rel=1e-9), "every rank holds the global running moments"
        rows, cols = slice(4 * r, 4 * r + 4), slice(0, batches[r][0].shape[1])
        assert torch.equal(result["key"], expected.key[rows, cols]), "a key token is the same on every rank"
        torch.testing.assert_close(result["standardized"], expected.standardized[rows, cols])
    assert ranks[0]["state"] == ranks[1]["state"]


def test_a_ckpt_path_directory_must_be_a_sharded_checkpoint(tmp_path):
    """A directory passes the readability check only when it holds Lightning's meta.pt (an FSDP2 sharded save)."""
    from vrpo_pl.checkpoint import SHARDED_METADATA, CheckpointLoadError, check_readable

    directory = tmp_path / "epoch=0-step=1.ckpt"
    directory.mkdir()
    with pytest.raises(CheckpointLoadError, match=r"is a directory but not a sharded checkpoint .*no meta\.pt"):
        check_readable(directory)
    (directory / SHARDED_METADATA).write_bytes(b"x")
    check_readable(directory)
