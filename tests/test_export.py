"""Export: the policy as a plain Hugging Face directory (LoRA merged, or the adapter alone) and the critic with its
head, each reloading to the same outputs; ``python -m vrpo_pl.export`` from a training checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, data_path_args, trained_looking_system

from vrpo_pl.export import HEAD_CONFIG, HEAD_WEIGHTS, export_critic, export_policy, load_critic

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA = ["--model.lora", "{r: 4, alpha: 8}", "--model.critic_lora", "{r: 4, alpha: 8}"]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as in rollouts
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    ids, mask, positions = _inputs()
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@torch.no_grad()
def _values(critic):
    ids, mask, positions = _inputs()
    out = critic(ids, mask, positions, num_response=5)
    return out.values, out.aux


@pytest.fixture(scope="module")
def systems(run_cli, tmp_path_factory):
    return {"lora": trained_looking_system(run_cli, tmp_path_factory.mktemp("lora"), *LORA),
            "full": trained_looking_system(run_cli, tmp_path_factory.mktemp("full"))}


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_exported_policy_loads_with_automodel_and_gives_the_same_logits(systems, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    system = systems[kind]
    out = export_policy(system, tmp_path / "policy", merge_lora=True)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in loaded.state_dict()), "adapters are merged into plain weights"
    torch.testing.assert_close(_logits(loaded), _logits(system.policy), rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("1 + 1 =")["input_ids"] == system.tokenizer("1 + 1 =")["input_ids"]
    assert tokenizer.chat_template == system.tokenizer.chat_template


def test_adapter_only_export_loads_with_peft(systems, tmp_path):
    from peft import PeftModel

    system = systems["lora"]
    out = export_policy(system, tmp_path / "adapter", merge_lora=False)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists(), "the adapter alone, without the base weights"
    base = system.policy_source.causal_lm(torch.float32)
    loaded = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(_logits(loaded), _logits(system.policy), rtol=1e-6, atol=1e-6)
    assert _logits(system.policy).sub(_logits(system.policy_source.causal_lm(torch.float32))).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_exported_critic_reloads_with_the_same_values(systems, tmp_path, kind):
    system = systems[kind]
    out = export_critic(system, tmp_path / "critic")
    assert (out / HEAD_CONFIG).exists() and (out / HEAD_WEIGHTS).exists() and (out / "config.json").exists()
    critic = load_critic(out)
    assert critic.head.vib and critic.head.aux is not None  # tiny.yaml is VRPO: VIB head with auxiliary outputs
    (values, aux), (expected_values, expected_aux) = _values(critic), _values(system.critic)
    torch.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, expected_aux, rtol=1e-5, atol=1e-5)


def test_grpo_has_no_critic_to_export(run_cli, tmp_path):
    system = trained_looking_system(run_cli, tmp_path, "--model.algorithm", "grpo")
    with pytest.raises(ValueError, match="grpo has no critic"):
        export_critic(system, tmp_path / "critic")


@pytest.mark.slow
def test_export_command_from_a_training_checkpoint(run_cli, tmp_path):
    """``python -m vrpo_pl.export`` rebuilds the run's system from its flags, loads the checkpoint, writes both."""
    from transformers import AutoModelForCausalLM

    config = ["--config", str(TINY_CONFIG), *data_path_args(TINY_CONFIG), *LORA]
    trained = run_cli(tmp_path / "run", *LORA, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                      "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"), "--trainer.callbacks.every_n_train_steps",
                      "1", max_steps=1).model.eval()
    result = subprocess.run(
        [sys.executable, "-m", "vrpo_pl.export", *config, "--ckpt_path", str(tmp_path / "ckpt" / "epoch=0-step=1.ckpt"),
         "--out", str(tmp_path / "exported")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "exported" / "policy").eval()
    torch.testing.assert_close(_logits(policy), _logits(trained.policy), rtol=1e-5, atol=1e-5)
    values, _ = _values(load_critic(tmp_path / "exported" / "critic"))
    torch.testing.assert_close(values, _values(trained.critic)[0], rtol=1e-5, atol=1e-5)
