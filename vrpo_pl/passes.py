"""The model passes over a rollout's rows: next-token logits at the response positions (plain, shared-prompt,
packed), the log-probs and guide targets taken from them, and :func:`score_rollout`, a rollout batch's
no-gradient passes (old log-probs unless the sampler gave them, the reference's log-probs, the guide's entropy and
surprisal, the critic's values). The update's passes (:mod:`vrpo_pl.update`) call the same functions.

Shapes: B sequences, P prompt length (left-padded), A response length, T = P + A, V vocabulary.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from vrpo_pl.fused import fusable, fused_passes
from vrpo_pl.logprobs import TokenLogits, logprobs_from_logits, token_logprobs_and_entropy
from vrpo_pl.models import training_attention
from vrpo_pl.packing import packable, packed_logits
from vrpo_pl.prefix import shared_prefix_logits, shared_prompts_for
from vrpo_pl.rollout import Rollout


def response_token_logits(
    model: nn.Module, sequences: Tensor, attention_mask: Tensor, position_ids: Tensor, num_response: int,
    prompt_width: int | None = None, pack: bool = False,
) -> TokenLogits:
    """Next-token logits at the A response positions, computing the LM head only there, kept as the pass made
    them (:class:`~vrpo_pl.logprobs.TokenLogits`): log-probs and entropies are then taken over the response tokens
    only, without spreading the logits into (B, A, V) with their padding.

    Args:
        model: a causal LM.
        sequences: (B, T) prompt + response tokens; attention_mask, position_ids: (B, T).
        num_response: A, the response positions at the end of the rows.
        prompt_width: P, the prompt columns (T = P + A): given, rows that repeat a prompt compute it once
            (:mod:`vrpo_pl.prefix`, ``--model.ppo.share_prompt_prefix``); None, or no prompt repeated: one plain pass.
        pack: one packed call over the rows' real tokens where the model allows (:mod:`vrpo_pl.packing`,
            ``--model.ppo.pack_rows``), sharing prompts when ``prompt_width`` is given.
    """
    if pack and packable(model, attention_mask, num_response):
        return packed_logits(model, sequences, attention_mask, position_ids, num_response,
                             share_prompts=prompt_width is not None)
    valid = attention_mask[:, -num_response:].bool()
    shared = shared_prompts_for(model, sequences, attention_mask, num_response, prompt_width)
    if shared is not None:
        return TokenLogits.from_dense(shared_prefix_logits(model, sequences, attention_mask, position_ids, shared),
                                      valid)
    out = model(
        input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
        logits_to_keep=num_response + 1, use_cache=False,
    )
    return TokenLogits.from_dense(out.logits[:, :-1], valid)


def response_logits(
    model: nn.Module, sequences: Tensor, attention_mask: Tensor, position_ids: Tensor, num_response: int,
    prompt_width: int | None = None, pack: bool = False,
) -> Tensor:
    """(B, A, V) next-token logits at the response positions (:func:`response_token_logits`'s, spread); row t
    predicts response token t. A packed pass gives zeros past each response's end."""
    return response_token_logits(model, sequences, attention_mask, position_ids, num_response, prompt_width,
                                 pack).dense()


def response_logprobs(logits: Tensor | TokenLogits, responses: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, A) log-probs of the response tokens under logits / temperature; from :class:`TokenLogits`, zeros at
    padding."""
    if isinstance(logits, TokenLogits):
        return logits.token_stats(responses, temperature, with_entropy=False)[0]
    return logprobs_from_logits(logits / temperature if temperature != 1.0 else logits, responses)


def guide_targets(logits: Tensor | TokenLogits, responses: Tensor) -> Tensor:
    """Frozen-LM targets per response token: (B, A, 2) = (entropy H_t, surprisal S_t = -log p(y_t)), in nats.

    Computed from the guide's untempered logits; when the guide is the reference these are the logits of the
    reference pass, so no extra forward is needed (and, at temperature 1, no second normalization either:
    :meth:`TokenLogits.token_stats` keeps its last result).
    """
    if isinstance(logits, TokenLogits):
        logp, entropy = logits.token_stats(responses, 1.0, with_entropy=True)
    else:
        logp, entropy = token_logprobs_and_entropy(logits, responses)
    return torch.stack([entropy, -logp], dim=-1)


@contextmanager
def reference_model(policy: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """Yields the reference policy: the frozen copy when there is one, else the adapter-disabled (LoRA) policy."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy


GuideFn = Callable[[Tensor, Tensor, Tensor, Tensor, TokenLogits], Tensor]
"""(sequences, attention_mask, position_ids, responses, reference logits) -> (B, A, 2) guide entropy and surprisal."""


def reference_guide(sequences: Tensor, attention_mask: Tensor, position_ids: Tensor, responses: Tensor,
                    reference_logits: TokenLogits) -> Tensor:
    """The :data:`GuideFn` whose guide is the reference: entropy and surprisal of the reference pass's logits."""
    return guide_targets(reference_logits, responses)


def rows_per_forward(size: int, width: int, budget: int | None, default: int) -> int:
    """Rows of each no-gradient pass over a rollout of ``size`` rows of ``width`` tokens: as many as fit in
    ``budget`` padded tokens (``--model.ppo.max_tokens_per_forward``; at least 1, at most all), else ``default``.

    >>> rows_per_forward(32, 78, 4096, 8), rows_per_forward(32, 78, 100, 8), rows_per_forward(32, 78, None, 8)
    (32, 1, 8)
    """
    if budget is None:
        return default
    return max(1, min(size, budget // max(width, 1)))


@torch.no_grad()
def score_rollout(
    r: Rollout, policy: nn.Module, reference: nn.Module | None, critic: nn.Module | None, *, temperature: float,
    chunk: int, guide: GuideFn | None = None, share_prefix: bool = True, pack: bool = False,
    fused_pairs: list | None = None, fused_chunk: int | None = None,
) -> None:
    """The rollout's no-gradient passes, each once per slice of ``chunk`` sequences; fills ``r`` in place.

    ``r.logp`` from the policy unless the sampler already gave it, ``r.ref_logp`` from the reference (whose logits
    also feed ``guide``, so a guide that is the reference costs no pass), ``r.guide_raw`` with ``guide``, and
    ``r.values`` with a critic. With ``share_prefix`` (``--model.ppo.share_prompt_prefix``) the policy, reference and
    critic passes compute each distinct prompt of a slice once (:mod:`vrpo_pl.prefix`); with ``pack``
    (``--model.ppo.pack_rows``) each pass is one packed call over the slice's real tokens (:mod:`vrpo_pl.packing`).
    With ``fused_pairs`` (``--model.ppo.fuse_update``, :func:`vrpo_pl.fused.adapter_pairs`) the old log-probs and
    the values come from one fused call per slice of ``fused_chunk`` rows (:mod:`vrpo_pl.fused`), in the update's
    attention as the old log-probs always are; a slice the packed pass does not take gets the two passes.
    """
    num, parts = r.responses.shape[1], defaultdict(list)
    width = r.prompt_width if share_prefix else None
    fuse = fused_pairs is not None and critic is not None and r.logp is None

    def old_logprobs(args: tuple, responses: Tensor) -> Tensor:
        # The old log-probs in the update's own numerics (its attention kernel), so the first ratio is 1.
        with training_attention(policy):
            logits = response_token_logits(policy, *args, num, prompt_width=width, pack=pack)
        return response_logprobs(logits, responses, temperature)

    for s in range(0, r.size, chunk):
        sl = slice(s, s + chunk)
        args, responses = (r.sequences[sl], r.attention_mask[sl], r.position_ids[sl]), r.responses[sl]
        if r.logp is None and not fuse:
            parts["logp"].append(old_logprobs(args, responses))
        with reference_model(policy, reference) as ref:
            ref_logits = response_token_logits(ref, *args, num, prompt_width=width, pack=pack)
        # At temperature 1 a guide that reads these logits (the reference) reuses this normalization.
        with_entropy = guide is not None and temperature == 1.0
        parts["ref_logp"].append(ref_logits.token_stats(responses, temperature, with_entropy)[0])
        if guide is not None:
            parts["guide_raw"].append(guide(*args, responses, ref_logits))
        del ref_logits
        if critic is not None and not fuse:
            parts["values"].append(critic(*args, num, prompt_width=width, pack=pack).values)
    step = fused_chunk or chunk
    for s in range(0, r.size, step) if fuse else ():
        sl = slice(s, s + step)
        args, responses = (r.sequences[sl], r.attention_mask[sl], r.position_ids[sl]), r.responses[sl]
        if fusable(policy, fused_pairs, args[1], num):
            with training_attention(policy, critic):
                logits, out = fused_passes(policy, critic, fused_pairs, *args, num, share_prompts=share_prefix)
            parts["logp"].append(response_logprobs(logits, responses, temperature))
            parts["values"].append(out.values)
        else:
            parts["logp"].append(old_logprobs(args, responses))
            parts["values"].append(critic(*args, num, prompt_width=width, pack=pack).values)
    for name, values in parts.items():
        setattr(r, name, torch.cat(values))
