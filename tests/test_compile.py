"""``--model.compile``: the decoder layers' blocks compiled for the passes that train, eager everywhere else."""

import pytest
import torch

from vrpo_pl.compile import COMPILED_EAGER_ATTENTION, compile_targets, decoder_layers, prepare_compiled_blocks
from vrpo_pl.lora import LoRASpec, apply_lora
from vrpo_pl.models import TinyLM, training_attention
from vrpo_pl.passes import response_logits
from vrpo_pl.rollout import position_ids_from_mask


def _lora_lm(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    lm = TinyLM().causal_lm(dtype)
    lm.config._attn_implementation = "sdpa"
    lm = apply_lora(lm, LoRASpec(r=4, alpha=8), causal_lm=True)
    for name, p in lm.named_parameters():  # B = 0 at init would hide the adapters from the comparison
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return lm


def test_compile_targets_are_the_blocks_around_the_attention_kernel():
    layer = decoder_layers(_lora_lm(torch.float32))[0]
    names = {name for name, m in layer.named_modules() if any(m is t for t in compile_targets(layer))}
    assert names == {"mlp", "input_layernorm", "post_attention_layernorm",
                     "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}


def test_decoder_layers_refuses_a_model_without_them():
    with pytest.raises(ValueError, match="--model.compile"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("shared_prompts", [False, True])
def test_compiled_passes_match_eager_ones_and_are_undone_after(shared_prompts):
    """bf16 weights on CPU: the compiled blocks and the compiled eager attention give the eager passes' log-probs
    and LoRA gradients within bf16 rounding, also with the shared-prompt passes (a KV cache handed to each layer);
    outside the context every module runs its class's forward and the model's attention again."""
    lm = _lora_lm(torch.bfloat16)
    ids = torch.randint(3, 300, (4, 9))
    ids[2:, :5] = ids[:2, :5]  # two prompts of 5 tokens, each answered twice
    mask = torch.ones_like(ids)
    positions = position_ids_from_mask(mask)
    width = 5 if shared_prompts else None

    def logprobs_and_grad():
        lm.zero_grad()
        logits = response_logits(lm, ids, mask, positions, 4, prompt_width=width)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -4:, None])[..., 0]
        logp.sum().backward()
        grad = next(p.grad for n, p in lm.named_parameters() if "q_proj.lora_A" in n)
        return logp.detach(), grad.clone()

    with training_attention(lm):
        eager_logp, eager_grad = logprobs_and_grad()
    assert prepare_compiled_blocks(lm) == 7 * len(decoder_layers(lm))
    with training_attention(lm):
        assert lm.config._attn_implementation == COMPILED_EAGER_ATTENTION
        compiled_logp, compiled_grad = logprobs_and_grad()
    assert lm.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in lm.modules())
    torch.testing.assert_close(compiled_logp, eager_logp, atol=0.05, rtol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, atol=0.02 * eager_grad.abs().max().item(), rtol=0.05)


def test_first_update_ratio_is_one_with_compiled_blocks(run_cli, read_events, tmp_path):
    """VRPO in bf16 with ``--model.compile``: the old log-probs come from the update's own compiled numerics, so the
    first ratio is 1 within rounding, and the run leaves every module's forward as it found it."""
    args = ["--model.lora", "{r: 4, alpha: 8}", "--model.critic_lora", "{r: 4, alpha: 8}", "--model.dtype",
            "bfloat16", "--model.compile", "true", "--model.ppo.epochs", "1", "--model.ppo.mini_batch_size", "4",
            "--data.prompts_per_rollout", "2"]
    model = run_cli(tmp_path, *args, max_steps=1).model
    events = read_events(tmp_path)
    ratio = events.Scalars("policy/ratio_mean")[0].value
    assert abs(ratio - 1) < 1e-3, ratio
    assert events.Scalars("policy/clipfrac")[0].value == 0.0
    assert not any("forward" in m.__dict__ for m in [*model.policy.modules(), *model.critic.modules()])
    assert sum(hasattr(m, "_vrpo_compiled_forward") for m in model.critic.modules()) > 0
