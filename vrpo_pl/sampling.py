"""Samplers: the backends that turn tokenized prompts into responses for the rollout and for validation.

Every backend implements :class:`Sampler`: ``sample`` returns the responses (B, A), padded after their end, and
optionally their log-probs under the distribution they were drawn from; ``update`` is called after each PPO update
of the policy (before the next rollout), for a backend that keeps its own copy of the weights (the in-process ones
read the policy itself and need nothing). Chosen by ``--model.generation.backend``:

- ``loop`` (default): our decode loop. One prefill pass computes logits at the last prompt position only (each
  distinct prompt once, its cache copied to the G rows that repeat it: ``share_prompt_prefill``), the KV cache grows
  by one position per step, and each step samples straight from its last logits: no logits processors or stopping
  criteria. For a Llama-architecture policy the steps after the prefill run through :mod:`vrpo_pl.decode`
  (``lean_decode``: adapters merged into temporary weights, a preallocated KV cache, fewer operator calls; 59
  against 91 ms per 32-row step of SmolLM2 + LoRA in bf16, Intel Xeon with AMX). Measured without them on SmolLM2 +
  LoRA, 32 x 32 tokens, bf16, 2 cores: with ``multinomial`` draws within 5% of ``generate`` (AMD EPYC: 4.6-5.0 s
  against 4.8-5.3 s; a preallocated static cache was slower, 5.2-5.3 s), with inverse transform draws (below) 2.5 s
  against 3.5 s (Intel Xeon with AMX). Neither compiling the layers' blocks for the decode steps (2.8 s) nor
  grouping the query heads instead of SDPA made it faster (``docs/performance.md``). Semantics are those of Hugging
  Face ``generate`` as the system uses it: left-padded prompts, positions that skip the padding, temperature then
  top-p (top-k off), every sequence padded after its first EOS, and the loop ends when all have ended or at
  ``max_new_tokens``. A token is drawn by inverse transform sampling (``draw: cdf``, the same distribution as
  ``torch.multinomial``, tested, at a fraction of its cost on a CPU); with ``draw: multinomial`` the loop draws the
  same tokens as ``generate`` for a seed (tested, float32).
- ``hf``: ``transformers``' ``generate``, for models or cache types the loop does not handle.
- ``vllm``: a vLLM engine in the training process with its own copy of the weights, synced in ``update``
  (:mod:`vrpo_pl.sampling_vllm`, imported only when chosen).

Shapes: B sequences, P prompt length (left-padded), A response length, V vocabulary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from vrpo_pl.rollout import GenerationSettings


class Sampler(ABC):
    """A generation backend (see the module docstring)."""

    @abstractmethod
    def sample(
        self, policy: nn.Module, input_ids: Tensor, attention_mask: Tensor, settings: GenerationSettings,
        eos_token_id: int | list[int], pad_token_id: int, greedy: bool = False, with_logprobs: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Responses to (B, P) left-padded prompts.

        Returns:
            ``(responses, logp)``: (B, A) tokens (A = the longest response; ``pad_token_id`` after each EOS) and,
            with ``with_logprobs``, their (B, A) log-probs under logits / temperature (else None).
        """

    def update(self, policy: nn.Module) -> None:  # noqa: B027 (in-process samplers read the policy directly)
        """Called after each PPO update of the policy: a backend holding its own weights syncs them here."""


def _step_logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def draw_tokens(scores: Tensor, method: str = "cdf") -> Tensor:
    """One token per row from ``softmax(scores)``, (B, V) -> (B,) (``--model.generation.draw``).

    ``cdf`` looks one uniform number per row up in the cumulative probabilities. A token of probability 0 (removed
    by top-p) is never drawn: a row that would land on one (cumulative sums that round unevenly) is drawn again
    with ``torch.multinomial``. ``multinomial`` draws every row with ``torch.multinomial``, as ``generate`` does.
    """
    probs = scores.softmax(dim=-1)
    if method == "multinomial":
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
    token = torch.searchsorted(cdf, u, right=True).squeeze(1)  # the first position whose cumulative sum exceeds u
    stray = probs.gather(1, token[:, None]).squeeze(1) == 0
    if bool(stray.any()):
        token[stray] = torch.multinomial(probs[stray], num_samples=1).squeeze(1)
    return token


def top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering as ``transformers``' ``TopPLogitsWarper``: keeps the smallest set of most likely tokens
    whose probability reaches ``top_p`` (at least one), the others set to -inf. Shape: (B, V).

    >>> top_p_filter(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.7).isinf().tolist()
    [[False, False, True]]
    """
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


class HFSampler(Sampler):
    """``transformers``' ``generate`` with the KV cache."""

    def sample(self, policy, input_ids, attention_mask, settings, eos_token_id, pad_token_id, greedy=False,
               with_logprobs=False):
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
            return out[:, input_ids.shape[1] :], None
        responses = out.sequences[:, input_ids.shape[1] :]
        # One step at a time: never a (B, A, V) float32 copy beside the sampler's own logits.
        logp = torch.stack([_step_logprobs(step, responses[:, t], settings.temperature)
                            for t, step in enumerate(out.logits)], dim=1)
        return responses, logp


def _prefill(policy: nn.Module, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, cache,
             share: bool) -> Tensor:
    """The prompt pass of the decode loop: fills ``cache`` and returns the (B, V) logits at the last position.

    With ``share``, each distinct prompt is computed once and its cache and logits are copied to the rows that hold
    it (:func:`vrpo_pl.prefix.distinct_prompts`); the cache then holds B rows, as without.
    """
    from vrpo_pl.prefix import distinct_prompts

    distinct = distinct_prompts(input_ids, attention_mask, input_ids.shape[1]) if share else None
    rows = slice(None) if distinct is None else distinct[0]
    logits = policy(input_ids=input_ids[rows], attention_mask=attention_mask[rows], position_ids=positions[rows],
                    past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    if distinct is None:
        return logits
    cache.batch_select_indices(distinct[1])
    return logits[distinct[1]]


class LoopSampler(Sampler):
    """Our decode loop (see the module docstring)."""

    @torch.no_grad()
    def sample(self, policy, input_ids, attention_mask, settings, eos_token_id, pad_token_id, greedy=False,
               with_logprobs=False):
        from transformers import DynamicCache

        from vrpo_pl.decode import LeanDecoder

        batch, prompt = input_ids.shape
        device, total = input_ids.device, prompt + settings.max_new_tokens
        eos = torch.as_tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=device)
        config = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
        cache = DynamicCache(config=config)
        # One buffer for the attention mask: the prompt's, then one more column of ones per step.
        mask = torch.ones(batch, total, dtype=attention_mask.dtype, device=device)
        mask[:, :prompt] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = _prefill(policy, input_ids, mask[:, :prompt], positions, cache, settings.share_prompt_prefill)
        lean = LeanDecoder.build(policy) if settings.lean_decode else None
        if lean is not None:  # the steps write into the lean decoder's own buffers from here on
            lean.start(cache, total)
            cache = None
        position = positions[:, -1:]
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        tokens, logps = [], []
        for step in range(settings.max_new_tokens):
            if greedy:
                token = logits.argmax(-1)
            else:
                scores = logits.float() if settings.temperature == 1 else logits.float() / settings.temperature
                token = draw_tokens(top_p_filter(scores, settings.top_p), settings.draw)
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
            tokens.append(token)
            if with_logprobs:
                logps.append(_step_logprobs(logits, token, settings.temperature))
            unfinished &= ~torch.isin(token, eos)
            if step == settings.max_new_tokens - 1 or not bool(unfinished.any()):
                break
            position = position + 1
            if lean is not None:
                logits = lean.step(token, position, mask[:, : prompt + step + 1])
                continue
            logits = policy(input_ids=token[:, None], attention_mask=mask[:, : prompt + step + 1],
                            position_ids=position, past_key_values=cache, use_cache=True).logits[:, -1]
        responses = torch.stack(tokens, dim=1)
        return responses, torch.stack(logps, dim=1) if with_logprobs else None


SAMPLERS: dict[str, type[Sampler]] = {"loop": LoopSampler, "hf": HFSampler}


def make_sampler(backend: str) -> Sampler:
    """The sampler for ``--model.generation.backend``."""
    if backend == "vllm":
        from vrpo_pl.sampling_vllm import VLLMSampler

        return VLLMSampler()
    if backend not in SAMPLERS:
        raise ValueError(f"--model.generation.backend={backend!r}: use one of {', '.join([*SAMPLERS, 'vllm'])}")
    return SAMPLERS[backend]()
