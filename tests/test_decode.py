"""Lean decode steps (vrpo_pl.decode, ``--model.generation.lean_decode``): the step's logits equal the model's own
forward step's with the same cache (LoRA adapters merged or disabled, left padding, grouped key/value heads, shared
prefill), the sampler draws the same tokens with it on and off in float32, the frozen weights are never written,
and the decoder is built only for the models it handles."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tests.test_prefix import adapters_off_zero
from vrpo_pl.decode import LeanDecoder, effective_weight
from vrpo_pl.lora import LoRASpec
from vrpo_pl.models import TinyLM, build_models, with_pad_token
from vrpo_pl.rollout import GenerationSettings
from vrpo_pl.sampling import LoopSampler

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["2 + 2 =", "The capital of France is a city called", "Hi", "Count: 1, 2, 3,"]


def _policy(lora: LoRASpec | None = None, dtype: torch.dtype = torch.float32):
    """``(tokenizer, policy)``: TinyLM (a Llama with 4 query and 2 key/value heads) with LoRA adapters that change the
    function (B matrices off zero)."""
    source = TinyLM()
    policy, _, _ = build_models(source, dtype, lora or LoRASpec(r=4, alpha=8))
    adapters_off_zero(policy)
    return with_pad_token(source.tokenizer()), policy


def _prompts(tokenizer, samples: int = 2):
    """Left-padded prompts of different lengths, each repeated ``samples`` times (as a rollout's groups)."""
    tokenizer.padding_side = "left"
    enc = tokenizer([p for p in PROMPTS for _ in range(samples)], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def _steps_both_ways(policy, input_ids, attention_mask, tokens):
    """Logits of each step feeding ``tokens`` (B, S) after the prompt: the model's own forward and the lean step,
    each from its own prefill of the same prompts."""
    from transformers import DynamicCache

    batch, prompt = input_ids.shape
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    mask = torch.ones(batch, prompt + tokens.shape[1], dtype=attention_mask.dtype)
    mask[:, :prompt] = attention_mask
    caches = [DynamicCache(config=policy.config), DynamicCache(config=policy.config)]
    with torch.no_grad():
        for cache in caches:
            policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                   use_cache=True)
        lean = LeanDecoder.build(policy)
        assert lean is not None
        lean.start(caches[1], mask.shape[1])
        own, fast = [], []
        position = positions[:, -1:]
        for step in range(tokens.shape[1]):
            position = position + 1
            attended = mask[:, : prompt + step + 1]
            own.append(policy(input_ids=tokens[:, step, None], attention_mask=attended, position_ids=position,
                              past_key_values=caches[0], use_cache=True).logits[:, -1])
            fast.append(lean.step(tokens[:, step], position, attended))
    return torch.stack(own, 1), torch.stack(fast, 1)


@pytest.mark.parametrize("adapters", ["on", "disabled", "float32 compute"])
def test_lean_step_logits_equal_the_models_own_step(adapters):
    """Float32: every step's logits equal the model's forward with its KV cache, adapters merged into the weights
    (in input or float32 compute) or disabled (the reference), over left-padded prompts of different lengths."""
    compute = "float32" if adapters == "float32 compute" else "input"
    tokenizer, policy = _policy(LoRASpec(r=4, alpha=8, compute=compute))
    input_ids, attention_mask = _prompts(tokenizer)
    tokens = torch.randint(3, len(tokenizer), (input_ids.shape[0], 6), generator=torch.Generator().manual_seed(1))
    if adapters == "disabled":
        with policy.disable_adapter():
            own, fast = _steps_both_ways(policy, input_ids, attention_mask, tokens)
    else:
        own, fast = _steps_both_ways(policy, input_ids, attention_mask, tokens)
    assert_close(fast, own, rtol=1e-5, atol=1e-5)
    if adapters != "disabled":  # the adapters change the function, so merging them is what made the logits equal
        with torch.no_grad(), policy.disable_adapter():
            assert not torch.allclose(fast, _steps_both_ways(policy, input_ids, attention_mask, tokens)[1], atol=1e-3)


def test_lean_step_in_bf16_is_the_models_step_to_bf16_rounding():
    """bf16 weights: the merged weights round once more, so the logits agree to bf16's precision, not bit for bit."""
    tokenizer, policy = _policy(dtype=torch.bfloat16)
    input_ids, attention_mask = _prompts(tokenizer)
    tokens = torch.randint(3, len(tokenizer), (input_ids.shape[0], 4), generator=torch.Generator().manual_seed(2))
    own, fast = _steps_both_ways(policy, input_ids, attention_mask, tokens)
    assert fast.dtype == torch.bfloat16
    scale = own.float().abs().max()
    assert (fast.float() - own.float()).abs().max() <= 0.05 * scale


@pytest.mark.parametrize("share", [True, False])
def test_sampler_draws_the_same_tokens_with_and_without_lean_steps(share):
    """Float32, seeded: the loop sampler's responses and log-probs are the same with ``lean_decode`` on and off,
    with the prefill shared by a prompt's rows or not; the frozen weights are untouched by the merge."""
    tokenizer, policy = _policy()
    input_ids, attention_mask = _prompts(tokenizer, samples=3)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    out = {}
    for lean in (False, True):
        torch.manual_seed(0)
        settings = GenerationSettings(max_new_tokens=12, lean_decode=lean, share_prompt_prefill=share,
                                      draw="multinomial")
        out[lean] = LoopSampler().sample(policy, input_ids, attention_mask, settings, tokenizer.eos_token_id,
                                         tokenizer.pad_token_id, with_logprobs=True)
    assert torch.equal(out[True][0], out[False][0])
    assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if "lora_" not in n)


def test_lean_decode_off_uses_the_models_forward(monkeypatch):
    """``lean_decode: false`` never builds the lean decoder; on, it is built once per ``sample`` call."""
    import vrpo_pl.decode

    tokenizer, policy = _policy()
    input_ids, attention_mask = _prompts(tokenizer)
    built = []
    original = vrpo_pl.decode.LeanDecoder.build
    monkeypatch.setattr(vrpo_pl.decode.LeanDecoder, "build", classmethod(
        lambda cls, model: built.append(model) or original(model)))
    for lean in (False, True):
        LoopSampler().sample(policy, input_ids, attention_mask, GenerationSettings(max_new_tokens=3, lean_decode=lean),
                             tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert len(built) == int(lean)


def test_effective_weight_merges_plain_lora_and_refuses_the_rest():
    """``W + scaling * B @ A`` for a plain LoRA linear (a new tensor), the frozen weight itself for an unadapted
    linear or a disabled adapter, None for a bias, dropout or DoRA."""
    from peft.tuners.lora import LoraLayer

    _, policy = _policy()
    layer = next(m for m in policy.modules() if isinstance(m, LoraLayer))
    name = layer.active_adapters[0]
    merged = effective_weight(layer)
    expected = layer.base_layer.weight + layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight
    assert_close(merged, expected)
    assert merged is not layer.base_layer.weight
    with policy.disable_adapter():
        assert effective_weight(layer) is layer.base_layer.weight
    assert effective_weight(torch.nn.Linear(3, 2)) is None  # a bias
    _, with_dropout = _policy(LoRASpec(r=4, alpha=8, dropout=0.1))
    assert LeanDecoder.build(with_dropout) is None
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(TinyLM().causal_lm(torch.float32), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert LeanDecoder.build(dora) is None


def test_lean_decoder_is_built_only_for_llama_models():
    """A GPT-2 (another architecture) gets None: the sampler then steps with the model's forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    assert LeanDecoder.build(gpt2) is None
    _, policy = _policy()
    assert LeanDecoder.build(policy) is not None
    assert LeanDecoder.build(policy.get_base_model()) is not None  # a plain causal LM, no peft wrapper
