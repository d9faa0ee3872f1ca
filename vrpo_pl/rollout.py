"""Rollout: prompt formatting, batched sampling with the KV cache, masks and log-prob passes.

Shapes: B sequences, P prompt length (left-padded), A response length, T = P + A, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vrpo_pl.losses import logprobs_from_logits, token_entropy


@dataclass
class PromptSettings:
    """How prompt texts become model inputs."""

    chat_template: bool = True
    """Format each prompt with the tokenizer's chat template (user turn + generation prompt); off: raw text."""
    system_prompt: str | None = None
    """Optional system message prepended when the chat template is used (None keeps the template's default)."""
    max_prompt_tokens: int = 256
    """Longest prompt in tokens; longer prompts are handled by ``overlong``."""
    overlong: Literal["truncate", "error"] = "truncate"
    """``truncate`` keeps the last max_prompt_tokens tokens (the question is usually at the end); ``error``
    stops the run naming the prompt."""


@dataclass
class GenerationSettings:
    """Sampling settings of the rollout (validation always decodes greedily)."""

    max_new_tokens: int = 64
    """Longest response in tokens; a response cut here has no EOS and is marked truncated."""
    temperature: float = 1.0
    """Sampling temperature; log-probs for PPO are computed from logits / temperature, matching the sampler."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = full distribution, which keeps the PPO ratio exact)."""
    sampler_logprobs: bool = True
    """Take the rollout's old log-probs from the logits the sampler already computed, instead of a second forward
    pass of the policy over every response (one pass fewer per rollout). In float32 the two agree to rounding
    (~1e-6); in bf16 the cached decode rounds differently from a full pass (~1e-2 on a log-prob), which shows as
    ratio noise in the first PPO step: set false there for an exact ratio of 1. Costs B x A x V floats of memory
    while sampling."""


def format_prompts(tokenizer, prompts: list[str], settings: PromptSettings) -> list[str]:
    """Applies the chat template (or not) to raw prompt texts."""
    if not settings.chat_template:
        return list(prompts)
    if tokenizer.chat_template is None:
        raise ValueError(
            "the tokenizer has no chat template; set --model.prompt.chat_template false to use raw prompts"
        )
    texts = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if settings.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": settings.system_prompt})
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return texts


def tokenize_prompts(tokenizer, prompts: list[str], settings: PromptSettings) -> tuple[Tensor, Tensor]:
    """Formats and left-pads prompts.

    Returns:
        ``(input_ids, attention_mask)``, each (B, P).

    Raises:
        ValueError: an empty prompt, or a prompt over ``max_prompt_tokens`` with ``overlong='error'``.
    """
    for i, prompt in enumerate(prompts):
        if not prompt or not prompt.strip():
            raise ValueError(f"prompt {i} of the batch is empty; remove empty prompts from the data")
    texts = format_prompts(tokenizer, prompts, settings)
    ids = [tokenizer(text, add_special_tokens=not settings.chat_template)["input_ids"] for text in texts]
    for i, seq in enumerate(ids):
        if len(seq) > settings.max_prompt_tokens:
            if settings.overlong == "error":
                raise ValueError(
                    f"prompt {prompts[i][:60]!r}... has {len(seq)} tokens, over --model.prompt.max_prompt_tokens="
                    f"{settings.max_prompt_tokens}; raise the limit or set --model.prompt.overlong truncate"
                )
            ids[i] = seq[-settings.max_prompt_tokens :]
    width = max(len(seq) for seq in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, seq in enumerate(ids):
        input_ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, width - len(seq) :] = 1
    return input_ids, attention_mask


def response_mask(responses: Tensor, eos_token_id: int | list[int]) -> tuple[Tensor, Tensor]:
    """Marks response tokens up to and including the first EOS.

    Args:
        responses: (B, A) generated tokens (padding after EOS).
        eos_token_id: one or several end-of-sequence ids.

    Returns:
        ``(mask, truncated)``: (B, A) float mask and (B,) bool, True where no EOS was generated.

    >>> response_mask(torch.tensor([[5, 2, 2], [5, 6, 7]]), 2)[0]
    tensor([[1., 1., 0.],
            [1., 1., 1.]])
    """
    eos_ids = torch.as_tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    is_eos = torch.isin(responses, eos_ids.to(responses.device))
    # Tokens after the first EOS: cumulative count of EOS strictly before the position is > 0.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (eos_before == 0).float()
    return mask, ~is_eos.any(dim=1)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` uses them: cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample_responses(
    policy: nn.Module, input_ids: Tensor, attention_mask: Tensor, settings: GenerationSettings, eos_token_id,
    pad_token_id: int, greedy: bool = False, with_logprobs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Samples responses with the KV cache.

    Returns:
        (B, A) response tokens (A = longest response); with ``with_logprobs`` also their (B, A) log-probs under the
        sampler's own logits / temperature (the distribution they were drawn from when ``top_p`` is 1).
    """
    kwargs = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0,
    }
    if with_logprobs:
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    out = policy.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True, **kwargs,
    )
    if not with_logprobs:
        return out[:, input_ids.shape[1] :]
    responses = out.sequences[:, input_ids.shape[1] :]
    # One step at a time: never a (B, A, V) float32 copy beside the sampler's own logits.
    logp = torch.stack([
        response_logprobs(step_logits[:, None], responses[:, t : t + 1], settings.temperature)[:, 0]
        for t, step_logits in enumerate(out.logits)
    ], dim=1)
    return responses, logp


def response_logits(
    model: nn.Module, sequences: Tensor, attention_mask: Tensor, position_ids: Tensor, num_response: int
) -> Tensor:
    """Next-token logits at the A response positions, computing the LM head only there.

    Returns:
        (B, A, V) logits; row t predicts response token t.
    """
    out = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
        logits_to_keep=num_response + 1, use_cache=False,
    )
    return out.logits[:, :-1]


def response_logprobs(logits: Tensor, responses: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, A) log-probs of the response tokens under logits / temperature."""
    return logprobs_from_logits(logits / temperature if temperature != 1.0 else logits, responses)


def guide_targets(logits: Tensor, responses: Tensor) -> Tensor:
    """Frozen-LM targets per response token: (B, A, 2) = (entropy H_t, surprisal S_t = -log p(y_t)), in nats.

    Computed from the guide's untempered logits; when the guide is the reference these are the logits of the
    reference pass, so no extra forward is needed.
    """
    return torch.stack([token_entropy(logits), -logprobs_from_logits(logits, responses)], dim=-1)
