"""bfloat16 weights train without NaNs; the value head stays in float32 (critic NaNs in bf16 are a known pain)."""

from __future__ import annotations

import math

import pytest
import torch


def test_bfloat16_weights_train_with_a_float32_value_head(run_cli, read_events, tmp_path):
    cli = run_cli(tmp_path, "--model.dtype", "bfloat16", max_steps=2)
    model = cli.model
    assert next(model.policy.parameters()).dtype == torch.bfloat16
    assert next(model.critic.backbone.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.critic.head.parameters())
    events = read_events(tmp_path)
    for tag in ("loss/policy", "loss/value", "loss/vib_kl", "loss/aux", "kl/ref"):
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), tag


def test_auto_dtype_is_bf16_only_with_bf16_units_and_lora_everywhere(monkeypatch):
    from vrpo_pl import models

    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.resolve_dtype("auto", all_trained_by_lora=True, device=cpu) == "bfloat16"
    assert models.resolve_dtype("auto", all_trained_by_lora=False, device=cpu) == "float32"  # full fine-tuning
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)  # bf16 would be emulated: slower than float32
    assert models.resolve_dtype("auto", all_trained_by_lora=True, device=cpu) == "float32"
    assert models.resolve_dtype("bfloat16", all_trained_by_lora=False, device=cpu) == "bfloat16"  # asked for


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_dtype_in_a_lora_run_follows_the_cpu(run_cli, tmp_path, monkeypatch, has_bf16):
    """A LoRA run with --model.dtype auto: bf16 base weights (and a separate policy pass for the old log-probs) on a
    CPU with bf16 units, float32 (and the sampler's log-probs) on one without; adapters and head stay float32."""
    from vrpo_pl import models

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: has_bf16)
    lora = ["--model.lora", "{r: 4, alpha: 8}", "--model.critic_lora", "{r: 4, alpha: 8}", "--model.dtype", "auto"]
    model = run_cli(tmp_path, *lora, max_steps=1).model
    base = next(p for n, p in model.policy.named_parameters() if "lora_" not in n)
    assert base.dtype == (torch.bfloat16 if has_bf16 else torch.float32)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert model.sampler_logprobs is (not has_bf16)


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch, tmp_path):
    from vrpo_pl import models

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert isinstance(models.cpu_has_bf16(), bool)  # falls back to /proc/cpuinfo where it exists
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert models.cpu_has_bf16()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_update_ratio_is_one_within_rounding(run_cli, read_events, tmp_path, dtype):
    """One optimizer step over the whole rollout batch, so every ratio is measured before the policy moves: with the
    old log-probs from the precision the update uses, pi/pi_old is 1 within rounding in float32 and in bf16."""
    args = ["--model.lora", "{r: 4, alpha: 8}", "--model.critic_lora", "{r: 4, alpha: 8}", "--model.dtype", dtype,
            "--model.ppo.epochs", "1", "--model.ppo.mini_batch_size", "4", "--data.prompts_per_rollout", "2"]
    run_cli(tmp_path, *args, max_steps=1)
    events = read_events(tmp_path)
    ratio = events.Scalars("policy/ratio_mean")[0].value
    approx_kl = events.Scalars("policy/approx_kl")[0].value
    tolerance = 1e-5 if dtype == "float32" else 1e-3  # measured: exactly 1.0 and 1.00006
    assert abs(ratio - 1) < tolerance and approx_kl < tolerance**2 * 10, (ratio, approx_kl)
    assert events.Scalars("policy/clipfrac")[0].value == 0.0
