"""bfloat16 weights train without NaNs; the value head stays in float32 (critic NaNs in bf16 are a known pain)."""

from __future__ import annotations

import math

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
