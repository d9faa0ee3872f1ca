"""Rollout: prompt formatting, sampling (through a :mod:`vrpo_pl.sampling` backend), the :class:`Rollout` record
and its micro-batches.

A training step's first phase is :func:`sample_rollout` (prompts -> tokens -> responses) followed by
:func:`vrpo_pl.passes.score_rollout` (the no-gradient passes over it); :func:`decode_completions` turns the
responses into the text the reward reads.

Shapes: B sequences, P prompt length (left-padded), A response length, T = P + A, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vrpo_pl.rewards.base import Completion
from vrpo_pl.sampling import Sampler


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

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 1:
            raise ValueError(f"--model.prompt.max_prompt_tokens={self.max_prompt_tokens} must be >= 1")


@dataclass
class GenerationSettings:
    """Sampling settings of the rollout (validation always decodes greedily)."""

    backend: Literal["loop", "hf", "vllm"] = "loop"
    """The sampler (:mod:`vrpo_pl.sampling`): ``loop``, our decode loop, sampling straight from the last position's
    logits; ``hf``, transformers' ``generate``; ``vllm``, a vLLM engine in the training process holding its own copy
    of the weights, synced after every update (:mod:`vrpo_pl.sampling_vllm`; needs the vLLM environment, see the
    README). Same prompts, temperature, top-p and EOS handling (``loop`` with ``draw: multinomial`` and ``hf``: the
    same tokens for a seed)."""
    max_new_tokens: int = 64
    """Longest response in tokens; a response cut here has no EOS and is marked truncated."""
    temperature: float = 1.0
    """Sampling temperature; log-probs for PPO are computed from logits / temperature, matching the sampler."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = full distribution, which keeps the PPO ratio exact)."""
    sampler_logprobs: bool | None = None
    """Take the rollout's old log-probs from the logits the sampler already computed, instead of a second forward
    pass of the policy over every response (one pass fewer per rollout). In float32 the two agree to rounding
    (~1e-6); in bf16 the cached decode rounds differently from a full pass (~1e-2 on a log-prob), which shows as
    ratio noise in the first PPO step. None: on in float32, off in bf16 (weights or autocast), so the first
    update's ratio is 1 within rounding either way. Always off with ``vllm``, whose kernels differ from the
    update's."""
    share_prompt_prefill: bool = True
    """``loop`` only: prefill each distinct prompt of the batch once (the G samples of a prompt are G copies of it)
    and copy its KV cache and last logits to its rows before decoding (:mod:`vrpo_pl.prefix`; our choice). Same
    tokens for a seed, to float rounding; a batch without a repeated prompt (validation) prefills as before."""
    lean_decode: bool = True
    """``loop`` only: run the decode steps of a Llama-architecture policy (SmolLM2) through :mod:`vrpo_pl.decode`:
    each LoRA projection's adapter merged into a temporary copy of its weight, a preallocated KV cache, fewer
    operator calls per layer (our choice). Same logits to rounding (bf16: the merged weights round once more, so
    the tokens drawn for a seed can differ from ``false``'s). Other models, and false: the model's forward each
    step."""
    draw: Literal["cdf", "multinomial"] = "cdf"
    """``loop`` only: how a token is drawn from a step's probabilities. ``cdf``: one uniform number per row, looked
    up in the cumulative probabilities (inverse transform sampling; our choice): the same distribution, and on a
    CPU about 45x cheaper than ``multinomial``, whose exponential draw over the whole vocabulary took 27 ms of each
    32-row decoding step of SmolLM2 (a quarter of it; Intel Xeon, 2 threads). ``multinomial``:
    ``torch.multinomial``, as ``generate`` draws, so the same tokens as ``hf`` for a seed."""
    vllm_kv_cache_gib: float = 2.0
    """``vllm`` only: memory for vLLM's KV cache, in GiB. On CPU it sets ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB,
    rounded up); on a GPU ``kv_cache_memory_bytes``, so that vLLM takes this much beside its copy of the weights and
    leaves the rest of the GPU to training (instead of claiming a fraction of the whole GPU)."""

    def __post_init__(self) -> None:
        g = self
        for ok, message in [
            (g.max_new_tokens >= 1, f"max_new_tokens={g.max_new_tokens} must be >= 1"),
            (g.temperature > 0, f"temperature={g.temperature} must be > 0 (validation is greedy)"),
            (0 < g.top_p <= 1, f"top_p={g.top_p} must be in (0, 1]"),
            (g.draw in ("cdf", "multinomial"), f"draw={g.draw!r}: use cdf or multinomial"),
            (g.vllm_kv_cache_gib > 0, f"vllm_kv_cache_gib={g.vllm_kv_cache_gib} must be > 0"),
            (g.backend != "vllm" or not g.sampler_logprobs, "sampler_logprobs=true cannot be used with backend "
             "vllm: the PPO ratio's old log-probs come from the policy's own pass (vLLM's kernels round "
             "differently)"),
        ]:
            if not ok:
                raise ValueError(f"--model.generation.{message}")
        if g.backend == "vllm":
            g.sampler_logprobs = False


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


@dataclass
class Rollout:
    """One rollout batch and everything computed from it, filled phase by phase. Shapes: B sequences,
    T = P + A tokens."""

    sequences: Tensor  # (B, T) prompt + response tokens
    attention_mask: Tensor  # (B, T)
    position_ids: Tensor  # (B, T)
    responses: Tensor  # (B, A)
    mask: Tensor  # (B, A) 1.0 on response tokens up to and including EOS
    truncated: Tensor  # (B,) no EOS before max_new_tokens
    prompt_width: int  # P, the left-padded prompt length
    logp: Tensor | None = None  # (B, A) log pi_old(y_t | s_t)
    ref_logp: Tensor | None = None  # (B, A) log pi_ref(y_t | s_t)
    group: Tensor | None = None  # (B,) prompt index, for GRPO
    values: Tensor | None = None  # (B, A) V(s_t) at rollout
    guide_raw: Tensor | None = None  # (B, A, 2) guide entropy, surprisal
    guide_targets: Tensor | None = None  # (B, A, 2) standardized
    key: Tensor | None = None  # (B, A) key tokens
    scores: Tensor | None = None  # (B,) training reward after normalization
    advantages: Tensor | None = None  # (B, A)
    returns: Tensor | None = None  # (B, A)

    @property
    def size(self) -> int:
        return self.sequences.shape[0]


@dataclass
class MicroBatch:
    """Rows of a rollout, trimmed to their own extent: columns that are padding in every row are dropped (left
    padding of the prompts, right padding after the longest response), so a pass costs what its rows need."""

    rows: Tensor  # (b,) indices into the rollout
    sequences: Tensor  # (b, T') prompt + response tokens
    attention_mask: Tensor  # (b, T')
    position_ids: Tensor  # (b, T')
    width: int  # A', response positions kept (the rows' longest response)
    prompt_width: int  # P', prompt columns kept (T' = P' + A')

    def take(self, x: Tensor) -> Tensor:
        """A per-token (B, A, ...) rollout field (log-probs, advantages, ...) for these rows: (b, A', ...)."""
        return x[self.rows, : self.width]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def micro_batch(r: Rollout, rows: Tensor) -> MicroBatch:
    """:class:`MicroBatch` of ``rows``; a row's result is unchanged (attention never sees padding)."""
    attention = r.attention_mask[rows]
    used = attention.bool().any(0).nonzero().flatten()
    first, end = int(used[0]), int(used[-1]) + 1
    width = end - r.prompt_width
    return MicroBatch(rows, r.sequences[rows, first:end], attention[:, first:end], r.position_ids[rows, first:end],
                      width, prompt_width=r.prompt_width - first)


def mini_batch_order(size: int, group: Tensor | None, by_prompt: bool, generator: torch.Generator) -> Tensor:
    """One PPO epoch's order of the rollout's rows (CPU), cut into consecutive mini-batches by the caller.

    ``by_prompt`` (``--model.ppo.shuffle prompts``) with ``group`` ids: the prompts are shuffled and each keeps its
    rows together, in rollout order, so a mini-batch holds whole groups (where its size is a multiple of the group
    size) and its passes compute each prompt once; verl's mini-batches are whole groups too. Else every row is
    shuffled alone (``--model.ppo.shuffle rows``): one ``randperm`` of the rows, as the generator always drew it.

    >>> g = torch.Generator().manual_seed(0)
    >>> mini_batch_order(6, torch.tensor([0, 0, 1, 1, 2, 2]), True, g).view(3, 2)[:, 0].remainder(2).tolist()
    [0, 0, 0]
    """
    if not by_prompt or group is None:
        return torch.randperm(size, generator=generator)
    ids, inverse = torch.unique(group.cpu(), return_inverse=True)
    rank = torch.randperm(len(ids), generator=generator)[inverse]
    return torch.argsort(rank * size + torch.arange(size))


def split_micro_batches(r: Rollout, idx: Tensor, micro: int, budget: int | None,
                        by_prompt: bool = False) -> list[Tensor]:
    """A mini-batch's rows ``idx`` split into micro-batches: ``micro`` rows each, or, with a token ``budget``
    (``--model.ppo.max_tokens_per_micro_batch``), grouped by length within that many padded tokens.

    With ``by_prompt`` (and the rollout's ``group`` ids) the rows are first ordered by prompt, keeping their order
    within a prompt, so that a micro-batch holds whole groups and its passes share their prompts
    (:mod:`vrpo_pl.prefix`). The mini-batch, and so the update, is the same: only how it is accumulated changes.
    """
    if by_prompt and r.group is not None:
        idx = idx[torch.sort(r.group[idx], stable=True).indices]
    if budget is None:
        return [idx[s : s + micro] for s in range(0, len(idx), micro)]
    lengths = r.attention_mask[idx].sum(1).tolist()
    return [idx[group] for group in token_budget_batches(lengths, budget)]


def token_budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Groups positions into micro-batches whose padded size (rows x longest length) stays within ``budget`` tokens.

    Longest first, so each micro-batch holds sequences of similar length; a sequence longer than the budget gets a
    micro-batch of its own.

    >>> token_budget_batches([5, 1, 4, 2], budget=8)
    [[0], [2, 3], [1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def sample_rollout(
    sampler: Sampler, policy: nn.Module, tokenizer, prompts: list[str], prompt_settings: PromptSettings,
    generation: GenerationSettings, device: torch.device, *, greedy: bool = False, with_logprobs: bool = False,
) -> Rollout:
    """Formats, tokenizes and answers a batch of prompts (KV-cache sampling, or greedy decoding for validation).

    Returns:
        A :class:`Rollout` with the tokens, masks and positions; with ``with_logprobs`` also ``logp``, the responses'
        log-probs under the sampler's own logits / temperature (zero on padding).
    """
    input_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, prompt_settings)
    input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
    responses, logp = sampler.sample(policy, input_ids, prompt_mask, generation, tokenizer.eos_token_id,
                                     tokenizer.pad_token_id, greedy=greedy, with_logprobs=with_logprobs)
    mask, truncated = response_mask(responses, tokenizer.eos_token_id)
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
    return Rollout(torch.cat([input_ids, responses], dim=1), attention_mask, position_ids_from_mask(attention_mask),
                   responses, mask, truncated, prompt_width=input_ids.shape[1],
                   logp=None if logp is None else logp * mask)


def decode_completions(tokenizer, batch: dict[str, Any], r: Rollout) -> tuple[list[str], list[Completion]]:
    """The responses as text, and as the :class:`~vrpo_pl.rewards.base.Completion` records a reward scores."""
    lengths = r.mask.sum(1).long().tolist()
    texts = tokenizer.batch_decode([r.responses[i, :n].tolist() for i, n in enumerate(lengths)],
                                   skip_special_tokens=True)
    answers = batch.get("answer") or [None] * len(texts)
    metadata = batch.get("metadata") or [{} for _ in texts]
    completions = [
        Completion(prompt=p, response=t, answer=a, metadata=m, num_tokens=n, truncated=bool(tr))
        for p, t, a, m, n, tr in zip(batch["prompt"], texts, answers, metadata, lengths, r.truncated.tolist(),
                                     strict=True)
    ]
    return texts, completions
