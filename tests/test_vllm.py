"""The ``vllm`` sampler (:mod:`vrpo_pl.sampling_vllm`) against the policy it samples for.

Needs vLLM, which lives in its own environment (``bash scripts/setup.sh --vllm``, then
``.venv-vllm/bin/python -m pytest tests/test_vllm.py``); skipped where it is not importable. One engine serves
the module's unit tests (it takes ~25 s to start and warm up on 2 CPU cores): each test brings a new policy, which
the sampler syncs in full on first sight.

The tiny Llama has head_dim 64 (hidden 128, 2 heads): vLLM's CPU attention refuses TinyLM's default head_dim 16
(``Unsupported CPU attention configuration: head_dim=16``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vrpo_pl.passes import response_logits, response_logprobs
from vrpo_pl.rollout import GenerationSettings, position_ids_from_mask, response_mask
from vrpo_pl.sampling_vllm import weights_fingerprint

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed here: run in .venv-vllm (bash scripts/setup.sh --vllm)")

TINY = {"hidden_size": 128, "num_layers": 2, "num_heads": 2}
PROMPTS = ["What is 2 + 3?", "Add 14 and 27, then subtract 9. What do you get?", "1 - 1 =", "9 * 8 ="]
# Largest |log-prob difference| between vLLM and the policy's own pass that counts as bf16 rounding (measured:
# see test_sampled_logprobs_come_from_the_updated_policy). The update moves the log-probs by far more.
BF16_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def sampler():
    from vrpo_pl.sampling import make_sampler

    return make_sampler("vllm")


def _policy(dtype: torch.dtype, lora: list[str] | None):
    from vrpo_pl.lora import LoRASpec, apply_lora
    from vrpo_pl.models import TinyLM
    from vrpo_pl.rollout import PromptSettings, tokenize_prompts

    source = TinyLM(**TINY)
    tokenizer, policy = source.tokenizer(), source.causal_lm(dtype).eval()
    if lora is not None:
        policy = apply_lora(policy, LoRASpec(r=8, alpha=16, target_modules=lora), causal_lm=True).eval()
    input_ids, prompt_mask = tokenize_prompts(tokenizer, PROMPTS, PromptSettings())
    return tokenizer, policy, input_ids, prompt_mask


@torch.no_grad()
def _update(policy, scale: float, seed: int) -> None:
    """A large in-place change of every trainable tensor, as an optimizer step writes it: noise of ``scale`` times
    the tensor's own spread, or of ``scale`` for a constant tensor (LoRA's B starts at zero, norms at one)."""
    g = torch.Generator().manual_seed(seed)
    for p in policy.parameters():
        if p.requires_grad:
            spread = float(p.float().std()) or 1.0
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale * spread)


@torch.no_grad()
def _own_logprobs(policy, input_ids, prompt_mask, responses, eos, temperature):
    mask, _ = response_mask(responses, eos)
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
    logits = response_logits(policy, torch.cat([input_ids, responses], 1), attention_mask,
                             position_ids_from_mask(attention_mask), responses.shape[1])
    return response_logprobs(logits, responses, temperature), mask


def _max_gap(sampler, lora, temperature=1.0):
    """Samples after an update; returns (max |vLLM - policy| log-prob gap, max change the update made)."""
    tokenizer, policy, input_ids, prompt_mask = _policy(torch.bfloat16, lora)
    settings = GenerationSettings(backend="vllm", max_new_tokens=12, temperature=temperature)
    args = (policy, input_ids, prompt_mask, settings, tokenizer.eos_token_id, tokenizer.pad_token_id)
    sampler.sample(*args)  # engine (first test only) and the full sync of this policy
    before = [(n, p.detach().clone()) for n, p in policy.named_parameters() if p.requires_grad]
    _update(policy, scale=0.3, seed=1)
    sampler.update(policy)
    torch.manual_seed(0)
    responses, logp = sampler.sample(*args, with_logprobs=True)
    own, mask = _own_logprobs(policy, input_ids, prompt_mask, responses, tokenizer.eos_token_id, temperature)
    with torch.no_grad():
        after = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        for n, p in policy.named_parameters():
            if p.requires_grad:
                p.copy_(dict(before)[n])
        stale, _ = _own_logprobs(policy, input_ids, prompt_mask, responses, tokenizer.eos_token_id, temperature)
        for n, p in policy.named_parameters():
            if p.requires_grad:
                p.copy_(after[n])
    gaps = ((logp - own) * mask).abs()
    gap, mean_gap = float(gaps.max()), float(gaps.sum() / mask.sum())
    moved = float(((stale - own) * mask).abs().max())
    print(f"lora={lora} T={temperature}: |vllm - policy| max {gap:.4f} mean {mean_gap:.4f}; the update moved "
          f"log-probs by up to {moved:.3f}; {int(mask.sum())} tokens")
    return gap, moved


@needs_vllm
@pytest.mark.parametrize("lora", [["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "v_proj"], None],
                         ids=["lora-qkvo", "lora-qv", "full"])
def test_sampled_logprobs_come_from_the_updated_policy(sampler, lora):
    """After an update and ``update(policy)``, vLLM's log-probs of the tokens it sampled are the updated policy's
    own (its full forward pass, bf16), within bf16 rounding; the update itself moved them by much more. LoRA on only
    q and v checks that k, packed with them in vLLM's qkv_proj, survives the partial sync."""
    gap, moved = _max_gap(sampler, lora, temperature=0.7 if lora is None else 1.0)
    assert gap < BF16_TOLERANCE
    assert moved > 10 * BF16_TOLERANCE


@needs_vllm
def test_a_skipped_sync_is_caught(sampler, monkeypatch):
    """With the weight sync after the first one made a no-op, vLLM samples from the stale weights and the check
    above fails: the gap is then of the size of the update."""
    real_sync, calls = type(sampler).sync, []

    def first_only(self, policy):
        calls.append(1)
        if len(calls) == 1:
            real_sync(self, policy)
        else:  # the stale engine believes it is synced
            self._policy_id, self._fingerprint = id(policy), weights_fingerprint(policy)

    monkeypatch.setattr(type(sampler), "sync", first_only)
    gap, moved = _max_gap(sampler, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert len(calls) >= 2
    assert gap > BF16_TOLERANCE


def test_only_a_partial_reload_is_quieted():
    """The reload logger goes to ERROR for a partial sync only, and gets its level back after either. (vLLM's
    "<Layer>: Failed to load weights" lines came ~130 per sync in a SmolLM2 quickstart; the tiny model here does not
    provoke them, so this checks the switch itself.)"""
    import logging

    from vrpo_pl.sampling_vllm import RELOAD_LOGGER, quiet_partial_reload

    logger = logging.getLogger(RELOAD_LOGGER)
    level = logger.level
    with quiet_partial_reload(False):
        assert logger.level == level
    with quiet_partial_reload(True):
        assert logger.getEffectiveLevel() == logging.ERROR
        assert not logging.getLogger(f"{RELOAD_LOGGER}.layerwise").isEnabledFor(logging.WARNING)
    assert logger.level == level


@needs_vllm
def test_weights_changed_without_update_are_synced_before_sampling(sampler):
    """A restored checkpoint writes the weights in place without an ``update``: the fingerprint check syncs them."""
    tokenizer, policy, input_ids, prompt_mask = _policy(torch.bfloat16, ["q_proj", "v_proj"])
    settings = GenerationSettings(backend="vllm", max_new_tokens=12)
    args = (policy, input_ids, prompt_mask, settings, tokenizer.eos_token_id, tokenizer.pad_token_id)
    sampler.sample(*args)
    state = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in policy.named_parameters() if p.requires_grad}
    policy.load_state_dict(state, strict=False)  # no sampler.update
    responses, logp = sampler.sample(*args, with_logprobs=True)
    own, mask = _own_logprobs(policy, input_ids, prompt_mask, responses, tokenizer.eos_token_id, 1.0)
    assert float(((logp - own) * mask).abs().max()) < BF16_TOLERANCE


@needs_vllm
def test_greedy_equals_the_loop_sampler(sampler):
    """Greedy decoding (validation) gives the loop sampler's tokens, float32 weights, an EOS inside the budget and
    padding after it: the same prompts, stopping rule and padding."""
    from vrpo_pl.sampling import LoopSampler

    tokenizer, policy, input_ids, prompt_mask = _policy(torch.float32, None)
    _update(policy, scale=1.0, seed=2)  # varied answers (the random init repeats one token)
    settings = GenerationSettings(backend="vllm", max_new_tokens=16)
    args = (policy, input_ids, prompt_mask, settings)
    free, _ = LoopSampler().sample(*args, -1, tokenizer.pad_token_id, greedy=True)
    # An EOS id that the greedy answers emit, ending some of them early and others not at all: padding follows.
    for eos in dict.fromkeys(free.flatten().tolist()):
        loop, _ = LoopSampler().sample(*args, eos, tokenizer.pad_token_id, greedy=True)
        if loop.shape[1] > 1 and (loop == tokenizer.pad_token_id).any():
            break
    else:
        pytest.fail(f"no token of the greedy answers ends one of them early: {free.tolist()}")
    ours, _ = sampler.sample(*args, eos, tokenizer.pad_token_id, greedy=True)
    assert torch.equal(ours, loop), f"eos {eos}: vllm {ours.tolist()} loop {loop.tolist()}"


def test_vllm_forces_the_policys_own_old_logprobs():
    """The PPO ratio's old log-probs never come from vLLM's kernels."""
    assert GenerationSettings(backend="vllm").sampler_logprobs is False
    with pytest.raises(ValueError, match="sampler_logprobs=true cannot be used with backend vllm"):
        GenerationSettings(backend="vllm", sampler_logprobs=True)


@needs_vllm
def test_fit_with_vllm_syncs_after_every_update(tmp_path, run_cli):
    """``vrpo fit --model.generation.backend vllm`` trains (tiny config): the first sample syncs the whole policy,
    each of the 2 updates syncs it again, and the old log-probs come from the policy's own pass."""
    from vrpo_pl.sampling_vllm import VLLMSampler

    cli = run_cli(tmp_path, "--model.generation.backend", "vllm", *(f"--model.policy.init_args.{k}={v}"
                                                                     for k, v in TINY.items()), max_steps=2)
    assert isinstance(cli.model.sampler, VLLMSampler)
    assert cli.model.rollouts == 2 and not cli.model.sampler_logprobs
    assert len(cli.model.sampler.sync_seconds) == 3
