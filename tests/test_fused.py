"""Fused update passes (vrpo_pl.fused): one call gives the policy's logits and the critic's values (plain and VIB
heads, auxiliary outputs) of the two separate packed passes, each loss's gradient reaches only its own model's
adapters and equals the separate pass's, the call leaves the models as it found them, and the models pair up only
where one call computes what two would. The fit with fusing on and off is compared in tests/test_prefix.py."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import vrpo_pl.packing
import vrpo_pl.passes
from tests.test_prefix import TOL, _rollout, adapters_off_zero
from vrpo_pl.fused import adapter_pairs, fusable, fused_passes
from vrpo_pl.lora import LoRASpec
from vrpo_pl.models import TinyLM, build_models
from vrpo_pl.passes import response_logits, response_logprobs
from vrpo_pl.rollout import micro_batch
from vrpo_pl.settings import CriticSettings

pytestmark = pytest.mark.usefixtures("single_thread")


def _models(vib: bool = True, critic_lora: LoRASpec | None = None, lora: LoRASpec | None = None,
            share_base: bool = True):
    """``(tokenizer, policy, critic)`` as RLSystem builds them (the critic's body on the policy's base tensors), the
    adapters' B matrices moved off zero so that every adapter matrix gets a gradient."""
    source = TinyLM()
    lora = lora or LoRASpec(r=4, alpha=8)
    critic = CriticSettings(vib=vib, aux="predict" if vib else "none")
    policy, _, value_model = build_models(source, torch.float32, lora, critic=critic,
                                          critic_lora=critic_lora or lora, share_base=share_base)
    adapters_off_zero(policy, value_model)
    return source.tokenizer(), policy, value_model


def _adapters(model) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if "lora_" in name]


@pytest.mark.parametrize("vib", [True, False])
@pytest.mark.parametrize("share_prompts", [True, False])
@pytest.mark.parametrize("pack_tokens", [256, 24])  # one pack; several (a group cut across packs)
@pytest.mark.parametrize("compute", ["input", "float32"])
def test_fused_passes_equal_the_two_packed_passes(monkeypatch, vib, share_prompts, pack_tokens, compute):
    """Logits, values, VIB means and log-variances, auxiliary outputs and the LoRA gradients of both losses equal
    those of the policy's and the critic's own packed passes over a shuffled micro-batch that splits groups."""
    monkeypatch.setattr(vrpo_pl.packing, "PACK_TOKENS", pack_tokens)
    tokenizer, policy, critic = _models(vib=vib, lora=LoRASpec(r=4, alpha=8, compute=compute))
    pairs = adapter_pairs(policy, critic)
    assert pairs is not None and len(pairs) == 4 * policy.config.num_hidden_layers  # q/k/v/o of every layer
    r = _rollout(tokenizer, samples=2)
    b = micro_batch(r, torch.tensor([5, 0, 1, 6, 3, 2]))
    args = (b.sequences, b.attention_mask, b.position_ids, b.width)
    noise = torch.randn(*b.take(r.mask).shape, CriticSettings().latent_dim) if vib else None
    assert fusable(policy, pairs, b.attention_mask, b.width)
    width = b.prompt_width if share_prompts else None

    logits, out = fused_passes(policy, critic, pairs, *args, share_prompts=share_prompts, sample=vib, noise=noise)
    logits = logits.dense()
    logits_apart = response_logits(policy, *args, prompt_width=width, pack=True)
    out_apart = critic(*args, sample=vib, noise=noise, prompt_width=width, pack=True)

    mask = b.take(r.mask)
    valid = mask.bool()
    assert_close(logits[valid], logits_apart[valid], **TOL)
    for field in ("values", "mu", "logvar", "aux"):
        fused, apart = getattr(out, field), getattr(out_apart, field)
        assert (fused is None) == (apart is None), field
        if fused is not None:
            assert_close(fused[valid], apart[valid], **TOL, msg=field)

    def losses(logits, out):
        policy_loss = -(response_logprobs(logits, b.take(r.responses)) * mask).sum()
        critic_loss = ((out.values - 1.0) ** 2 * mask).sum() + (0 if out.aux is None else out.aux.square().sum())
        return policy_loss, critic_loss

    fused_losses, apart_losses = losses(logits, out), losses(logits_apart, out_apart)
    for loss, loss_apart, model in zip(fused_losses, apart_losses, (policy, critic), strict=True):
        assert_close(loss, loss_apart, **TOL)
        grads = torch.autograd.grad(loss, _adapters(model), retain_graph=True)
        for grad, grad_apart in zip(grads, torch.autograd.grad(loss_apart, _adapters(model)), strict=True):
            assert grad_apart.abs().max() > 0
            assert_close(grad, grad_apart, rtol=1e-5, atol=1e-5 * float(grad_apart.abs().max()))


def test_each_loss_reaches_only_its_own_adapters():
    """The policy's loss from the fused call has no gradient on the critic's adapters, and the other way round."""
    tokenizer, policy, critic = _models()
    pairs = adapter_pairs(policy, critic)
    r = _rollout(tokenizer, samples=2)
    b = micro_batch(r, torch.arange(4))
    logits, out = fused_passes(policy, critic, pairs, b.sequences, b.attention_mask, b.position_ids, b.width)
    mask = b.take(r.mask)
    policy_loss = response_logprobs(logits, b.take(r.responses)).sum()
    critic_loss = (out.values * mask).sum()
    for loss, own, other in ((policy_loss, policy, critic), (critic_loss, critic, policy)):
        grads = torch.autograd.grad(loss, _adapters(own) + _adapters(other), retain_graph=True, allow_unused=True)
        own_grads, other_grads = grads[: len(_adapters(own))], grads[len(_adapters(own)) :]
        assert all(g is not None and g.abs().max() > 0 for g in own_grads)
        assert all(g is None or not g.any() for g in other_grads)


def test_the_call_leaves_the_models_as_it_found_them():
    """After a fused call, also one that raised, the policy's adapters, LM head and decoder run as before: no
    forward swapped, no hook left behind."""
    tokenizer, policy, critic = _models()
    pairs = adapter_pairs(policy, critic)
    r = _rollout(tokenizer, samples=2)
    b = micro_batch(r, torch.arange(4))
    args = (b.sequences, b.attention_mask, b.position_ids, b.width)
    before = response_logits(policy, *args, pack=True).detach()
    modules = [policy.get_output_embeddings(), policy.get_base_model().get_decoder()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules]
    fused_passes(policy, critic, pairs, *args)
    with pytest.raises(RuntimeError):  # a critic head that fails after the call
        fused_passes(policy, critic, pairs, *args, sample=True, noise=torch.zeros(3, 5, 7))
    bad = b.sequences.clone()
    bad[:, b.prompt_width - 1] = 10**6  # a token the embedding does not have: fails inside the model call
    with pytest.raises(IndexError):
        fused_passes(policy, critic, pairs, bad, b.attention_mask, b.position_ids, b.width)
    for mine, _ in pairs:
        assert "forward" not in vars(mine)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules] == hooks
    assert_close(response_logits(policy, *args, pack=True), before)


def test_models_pair_only_where_one_call_computes_both():
    """Paired: LoRA on both models over the same base tensors. Not paired: no critic, a critic body with its own
    base tensors (FSDP2's), adapters of different ranks or on different modules, DoRA, full fine-tuning."""
    _, policy, critic = _models()
    assert adapter_pairs(policy, critic) is not None
    assert adapter_pairs(policy, None) is None
    assert adapter_pairs(*_models(share_base=False)[1:]) is None
    assert adapter_pairs(*_models(critic_lora=LoRASpec(r=2, alpha=4))[1:]) is None
    assert adapter_pairs(*_models(critic_lora=LoRASpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))[1:]) is None
    assert adapter_pairs(*_models(critic_lora=LoRASpec(r=4, alpha=8, top_layers=1))[1:]) is None
    source = TinyLM()
    full, _, full_critic = build_models(source, torch.float32, None, critic=CriticSettings(vib=False))
    assert adapter_pairs(full, full_critic) is None
    _, policy, critic = _models()
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in critic.backbone.modules() if isinstance(m, LoraLayer))
    layer.use_dora["default"] = True  # any adapter variant (DoRA, ...) is registered in lora_variant
    layer.lora_variant = {"default": object()}
    assert adapter_pairs(policy, critic) is None


def test_a_micro_batch_too_long_to_pack_is_not_fused(monkeypatch):
    """Over more real tokens than the packed pass takes (PACK_MAX_TOKENS), the update steps the two models apart."""
    tokenizer, policy, critic = _models()
    pairs = adapter_pairs(policy, critic)
    b = micro_batch(_rollout(tokenizer, samples=2), torch.arange(8))
    assert fusable(policy, pairs, b.attention_mask, b.width)
    monkeypatch.setattr(vrpo_pl.packing, "PACK_MAX_TOKENS", int(b.attention_mask.sum()) - 1)
    assert not fusable(policy, pairs, b.attention_mask, b.width)
    assert not fusable(policy, None, b.attention_mask, b.width)


@pytest.mark.parametrize("fused_chunk", [4, 64])  # slices of whole groups; one slice past PACK_MAX_TOKENS
def test_score_rollout_with_fused_passes_fills_the_same_fields(monkeypatch, fused_chunk):
    """The rollout's old log-probs and values from fused calls equal those of the policy's and the critic's own
    passes (in the update's attention either way), and the reference's and guide's fields are untouched; a slice
    the packed pass does not take gets the two passes."""
    from vrpo_pl.models import training_attention
    from vrpo_pl.passes import reference_guide, score_rollout

    tokenizer, policy, critic = _models()
    pairs = adapter_pairs(policy, critic)
    if fused_chunk == 64:
        monkeypatch.setattr(vrpo_pl.packing, "PACK_MAX_TOKENS", 40)
    calls = []
    monkeypatch.setattr(vrpo_pl.passes, "fused_passes", lambda *a, **k: calls.append(1) or fused_passes(*a, **k))
    fields = {}
    for fused in (True, False):
        r = _rollout(tokenizer, samples=2)
        with training_attention(critic):  # the values in the update's attention, as the fused call computes them
            score_rollout(r, policy, None, critic, temperature=1.0, chunk=3, guide=reference_guide, pack=True,
                          fused_pairs=pairs if fused else None, fused_chunk=fused_chunk)
        fields[fused] = {name: getattr(r, name)[r.mask.bool()] for name in ("logp", "ref_logp", "values", "guide_raw")}
    assert len(calls) == (2 if fused_chunk == 4 else 0)  # 8 rows in slices of 4; or none packable
    for name, value in fields[True].items():
        assert_close(value, fields[False][name], **TOL, msg=name)
