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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_multiplies_in_its_input_dtype_with_float32_parameters(dtype):
    """--model.lora.compute input (the default): with bf16 base weights the adapters meet bf16 activations (no
    float32 copy of them) while their parameters and gradients stay float32; the state dict is peft's. With float32
    weights it is peft's float32 computation exactly."""
    from vrpo_pl.lora import LoRASpec, apply_lora
    from vrpo_pl.models import TinyLM

    models, seen = {}, {}
    for compute in ("input", "float32"):
        model = apply_lora(TinyLM().causal_lm(dtype), LoRASpec(r=4, alpha=8, compute=compute), causal_lm=True)
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)  # peft starts B at 0, which would hide the adapters' arithmetic
        layer = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
        layer.register_forward_pre_hook(lambda m, args, c=compute: seen.update({c: args[0].dtype}))
        models[compute] = model
    assert models["input"].state_dict().keys() == models["float32"].state_dict().keys()
    models["float32"].load_state_dict(models["input"].state_dict())  # the same adapters in both
    ids = torch.randint(0, 384, (3, 9), generator=torch.Generator().manual_seed(0))
    out = {}
    for compute, model in models.items():
        logits = model(input_ids=ids).logits
        logits.float().square().mean().backward()
        out[compute] = (logits.float(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.dtype == torch.float32 and g.dtype == torch.float32 and torch.isfinite(g).all()
                   for p, g in zip([p for p in model.parameters() if p.requires_grad], out[compute][1].values(),
                                   strict=True))
    assert seen == {"input": dtype, "float32": torch.float32}
    (a, grad_a), (b, grad_b) = out["input"], out["float32"]
    if dtype == torch.float32:
        assert torch.equal(a, b) and all(torch.equal(grad_a[n], grad_b[n]) for n in grad_a)
    else:  # bf16 rounding of the adapters' products, nothing more
        assert (a - b).abs().max() <= 0.02 * b.abs().max(), (a - b).abs().max()
        for name in grad_a:
            assert torch.allclose(grad_a[name], grad_b[name], rtol=0.1, atol=0.05 * grad_b[name].abs().max()), name
