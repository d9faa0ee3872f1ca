"""Unit tests of the rollout's pure helpers: response masks, position ids under left padding, guide targets."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical
from torch.testing import assert_close

from vrpo_pl.passes import guide_targets
from vrpo_pl.rollout import position_ids_from_mask, response_mask


@pytest.mark.parametrize(
    "row,eos,expected_mask,truncated",
    [
        ([5, 2, 7, 7], 2, [1, 1, 0, 0], False),  # EOS in the middle, then padding
        ([5, 6, 7, 2], 2, [1, 1, 1, 1], False),  # EOS at the last position
        ([5, 6, 7, 8], 2, [1, 1, 1, 1], True),  # no EOS: truncated, every token counts
        ([2, 6, 7, 8], 2, [1, 0, 0, 0], False),  # EOS first: only the EOS token
        ([5, 2, 2, 2], 2, [1, 1, 0, 0], False),  # padding with the EOS id: only the first EOS counts
        ([5, 9, 2, 7], [2, 9], [1, 1, 0, 0], False),  # several EOS ids: the first of any ends it
        ([5, 6, 2, 9], [9, 2], [1, 1, 1, 0], False),
        ([5, 6, 7, 8], [2, 9], [1, 1, 1, 1], True),
        ([5, 6, 9, 8], [9], [1, 1, 1, 0], False),  # a one-element list
    ],
)
def test_response_mask_cases(row, eos, expected_mask, truncated):
    """The mask covers tokens up to and including the first EOS; truncated is True when no EOS was generated."""
    mask, trunc = response_mask(torch.tensor([row]), eos)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, torch.tensor([expected_mask], dtype=torch.float32))
    assert trunc.dtype == torch.bool
    assert trunc.tolist() == [truncated]


def test_response_mask_batch_matches_naive_loop():
    """A random batch with EOS at random places matches a per-row loop."""
    g = torch.Generator().manual_seed(0)
    eos_ids = [3, 4]
    responses = torch.randint(0, 12, (16, 9), generator=g)
    mask, truncated = response_mask(responses, eos_ids)
    for b, row in enumerate(responses.tolist()):
        ends = [t for t, tok in enumerate(row) if tok in eos_ids]
        length = ends[0] + 1 if ends else len(row)
        assert mask[b].tolist() == [1.0] * length + [0.0] * (len(row) - length)
        assert truncated[b].item() == (not ends)
    # Masks are contiguous from position 0, as gae_advantages and token_rewards assume.
    assert torch.equal(mask, torch.sort(mask, dim=1, descending=True).values)


def test_position_ids_skip_left_padding():
    """Left-padded rows count positions from their first real token; padding gets 0."""
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    assert torch.equal(position_ids_from_mask(attention_mask), expected)


def test_position_ids_continue_through_response():
    """Prompt (left-padded) + response: positions run on without a gap; a bool or float mask gives the same."""
    prompt = torch.tensor([[0, 1, 1], [1, 1, 1]])
    response = torch.tensor([[1, 1, 0], [1, 1, 1]])  # response padding at the end of row 0
    full = torch.cat([prompt, response], dim=1)
    pos = position_ids_from_mask(full)
    assert pos[0].tolist() == [0, 0, 1, 2, 3, 3]
    assert pos[1].tolist() == [0, 1, 2, 3, 4, 5]
    assert pos.dtype == torch.long
    assert torch.equal(position_ids_from_mask(full.bool()), pos)
    assert torch.equal(position_ids_from_mask(full.float()), pos)


def test_guide_targets_shape_entropy_and_surprisal():
    """(B, A, 2): channel 0 is the Categorical entropy, channel 1 is the surprisal -log p(y_t)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 17, generator=g) * 2
    responses = torch.randint(0, 17, (3, 5), generator=g)
    targets = guide_targets(logits, responses)
    assert targets.shape == (3, 5, 2)
    assert targets.dtype == torch.float32
    assert_close(targets[..., 0], Categorical(logits=logits).entropy())
    surprisal = -torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)
    assert_close(targets[..., 1], surprisal)
    assert torch.all(targets >= 0)


def test_guide_targets_extremes():
    """Uniform logits: H = S = log V; a confident correct guess: H ~ S ~ 0; a confident wrong one: S large."""
    vocab = 8
    uniform = guide_targets(torch.zeros(1, 1, vocab), torch.tensor([[3]]))
    assert_close(uniform, torch.full((1, 1, 2), torch.log(torch.tensor(float(vocab))).item()))
    peaked = torch.full((1, 2, vocab), -30.0)
    peaked[..., 5] = 30.0
    out = guide_targets(peaked, torch.tensor([[5, 0]]))
    assert out[0, 0, 0] < 1e-6 and out[0, 0, 1] < 1e-6
    assert out[0, 1, 1] > 50.0


def test_guide_targets_surprisal_mean_is_log_perplexity():
    """exp(mean_t S_t) is the sequence perplexity exp(-mean_t log p(y_t))."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 6, 10, generator=g)
    responses = torch.randint(0, 10, (1, 6), generator=g)
    probs = torch.softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)
    perplexity = probs.prod() ** (-1 / 6)
    assert_close(guide_targets(logits, responses)[..., 1].mean().exp(), perplexity)


def _tiny_prompts():
    from vrpo_pl.models import TinyLM
    from vrpo_pl.rollout import PromptSettings, tokenize_prompts

    source = TinyLM()
    tokenizer, policy = source.tokenizer(), source.causal_lm(torch.float32).eval()
    prompts = ["What is 2 + 3?", "Add 14 and 27, then subtract 9. What do you get?", "1 - 1 =", "9 * 8 ="]
    input_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, PromptSettings())
    assert (prompt_mask == 0).any(), "the prompts must have different lengths (left padding)"
    return tokenizer, policy, input_ids, prompt_mask


@pytest.mark.parametrize("backend", ["loop", "hf"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_a_full_forward_pass(backend, temperature):
    """The log-probs taken from the sampler's logits are those a second pass of the policy computes (fp32, left
    padding, temperature), so the rollout can skip that pass."""
    from vrpo_pl.passes import response_logits, response_logprobs
    from vrpo_pl.rollout import GenerationSettings
    from vrpo_pl.sampling import make_sampler

    tokenizer, policy, input_ids, prompt_mask = _tiny_prompts()
    settings = GenerationSettings(max_new_tokens=12, temperature=temperature)
    torch.manual_seed(0)
    responses, logp = make_sampler(backend).sample(policy, input_ids, prompt_mask, settings, tokenizer.eos_token_id,
                                                   tokenizer.pad_token_id, with_logprobs=True)
    mask, _ = response_mask(responses, tokenizer.eos_token_id)
    sequences = torch.cat([input_ids, responses], 1)
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
    with torch.no_grad():
        logits = response_logits(policy, sequences, attention_mask, position_ids_from_mask(attention_mask),
                                 responses.shape[1])
    full = response_logprobs(logits, responses, temperature)
    assert_close(logp * mask, full * mask, atol=1e-4, rtol=1e-4)
    assert (logp * mask).abs().sum() > 0


@pytest.mark.parametrize(("greedy", "temperature", "top_p"), [(True, 1.0, 1.0), (False, 1.0, 1.0), (False, 0.7, 0.9)])
def test_loop_sampler_draws_the_tokens_generate_draws(greedy, temperature, top_p):
    """Same seed, same tokens and log-probs as transformers' generate: greedy, sampling, temperature + top-p."""
    from vrpo_pl.rollout import GenerationSettings
    from vrpo_pl.sampling import HFSampler, LoopSampler

    tokenizer, policy, input_ids, prompt_mask = _tiny_prompts()
    settings = GenerationSettings(max_new_tokens=10, temperature=temperature, top_p=top_p, draw="multinomial")
    out = {}
    for sampler in (HFSampler(), LoopSampler()):
        torch.manual_seed(3)
        out[type(sampler).__name__] = sampler.sample(policy, input_ids, prompt_mask, settings, tokenizer.eos_token_id,
                                                     tokenizer.pad_token_id, greedy=greedy, with_logprobs=True)
    (hf_tokens, hf_logp), (loop_tokens, loop_logp) = out["HFSampler"], out["LoopSampler"]
    assert torch.equal(loop_tokens, hf_tokens)
    assert_close(loop_logp, hf_logp, atol=1e-5, rtol=1e-5)


def test_loop_sampler_pads_after_eos_and_stops_when_all_ended():
    """A sequence that emits EOS gets padding after it; the loop ends once every sequence has (here: the first
    greedy token of each prompt is declared an EOS, so all end at step 1 or 2)."""
    from vrpo_pl.rollout import GenerationSettings
    from vrpo_pl.sampling import HFSampler, LoopSampler

    tokenizer, policy, input_ids, prompt_mask = _tiny_prompts()
    settings = GenerationSettings(max_new_tokens=8)
    first, _ = LoopSampler().sample(policy, input_ids, prompt_mask, GenerationSettings(max_new_tokens=1),
                                    tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    eos = sorted(set(first[:, 0].tolist()))[:1]  # the first prompts' opening token is an EOS now
    pad = tokenizer.pad_token_id
    loop, _ = LoopSampler().sample(policy, input_ids, prompt_mask, settings, eos, pad, greedy=True)
    hf, _ = HFSampler().sample(policy, input_ids, prompt_mask, settings, eos, pad, greedy=True)
    assert torch.equal(loop, hf)
    ended = (loop == eos[0]).any(1)
    assert ended.any()
    for row in loop[ended]:
        after = row[(row == eos[0]).nonzero()[0, 0] + 1 :]
        assert (after == pad).all()


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_inverse_cdf_draws_follow_the_distribution(top_p):
    """``draw: cdf`` draws each token with its probability (after top-p), like ``multinomial``; filtered tokens never.
    200,000 rows of one 12-token distribution: each frequency within 5 standard errors of its probability."""
    from vrpo_pl.sampling import draw_tokens, top_p_filter

    scores = top_p_filter(torch.randn(1, 12, generator=torch.Generator().manual_seed(1)) * 2, top_p)
    probs = scores.softmax(-1)[0]
    n = 200_000
    torch.manual_seed(0)
    counts = torch.bincount(draw_tokens(scores.expand(n, -1), "cdf"), minlength=12).double()
    stderr = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((counts / n - probs.double()).abs() <= 5 * stderr + 1e-12).all(), (counts / n, probs)
    assert counts[probs == 0].sum() == 0
    if top_p < 1:
        assert (probs == 0).any()


def test_inverse_cdf_never_draws_a_zero_probability_token():
    """Rows whose mass sits on one token among -inf scores (what top-p leaves at its tightest) always draw it, at
    every position of a large vocabulary, edges included."""
    from vrpo_pl.sampling import draw_tokens

    vocab = 49_152
    target = torch.tensor([0, 1, 17, vocab // 2, vocab - 2, vocab - 1])
    scores = torch.full((len(target), vocab), float("-inf"))
    scores[torch.arange(len(target)), target] = 0.0
    for seed in range(20):
        torch.manual_seed(seed)
        assert torch.equal(draw_tokens(scores, "cdf"), target)


def test_loop_sampler_first_tokens_follow_the_policy():
    """The loop sampler's default draw: the first response token of 20,000 copies of one prompt is distributed as
    the policy's softmax(logits / temperature) at the prompt's last position (every token's frequency within 5
    standard errors of its probability)."""
    from vrpo_pl.rollout import GenerationSettings
    from vrpo_pl.sampling import LoopSampler

    tokenizer, policy, input_ids, prompt_mask = _tiny_prompts()
    with torch.no_grad():
        logits = policy(input_ids=input_ids[:1], attention_mask=prompt_mask[:1]).logits[0, -1]
    probs = torch.softmax(logits.float() / 0.7, -1)
    n = 20_000
    torch.manual_seed(0)
    tokens, _ = LoopSampler().sample(policy, input_ids[:1].expand(n, -1), prompt_mask[:1].expand(n, -1),
                                     GenerationSettings(max_new_tokens=1, temperature=0.7),
                                     tokenizer.eos_token_id, tokenizer.pad_token_id)
    freq = torch.bincount(tokens[:, 0], minlength=probs.numel()).double() / n
    stderr = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * stderr).all()


def test_top_p_filter_matches_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper

    from vrpo_pl.sampling import top_p_filter

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 2
    for top_p in (0.3, 0.9, 1.0):
        expected = TopPLogitsWarper(top_p)(None, scores.clone()) if top_p < 1 else scores
        assert torch.equal(top_p_filter(scores.clone(), top_p).isinf(), expected.isinf())


def test_split_micro_batches_by_rows_or_by_token_budget():
    from vrpo_pl.rollout import Rollout, split_micro_batches

    attention = torch.tensor([[1] * 8, [1] * 2 + [0] * 6, [1] * 8, [1] * 3 + [0] * 5], dtype=torch.float)
    r = Rollout(sequences=torch.zeros(4, 8, dtype=torch.long), attention_mask=attention,
                position_ids=torch.zeros(4, 8, dtype=torch.long), responses=torch.zeros(4, 4, dtype=torch.long),
                mask=torch.ones(4, 4), truncated=torch.zeros(4, dtype=torch.bool), prompt_width=4)
    idx = torch.tensor([3, 0, 1, 2])
    assert [b.tolist() for b in split_micro_batches(r, idx, 3, None)] == [[3, 0, 1], [2]]
    budget = split_micro_batches(r, idx, 3, 16)  # two rows of 8 tokens fit; the short rows share one
    assert sorted(sorted(b.tolist()) for b in budget) == [[0, 2], [1, 3]]


def test_mini_batch_order_deals_whole_prompts_or_single_rows():
    from vrpo_pl.rollout import mini_batch_order

    group = torch.arange(6).repeat_interleave(4)  # 6 prompts x 4 samples, in rollout order
    seen = set()
    for seed in range(5):
        order = mini_batch_order(24, group, True, torch.Generator().manual_seed(seed))
        assert sorted(order.tolist()) == list(range(24))  # a permutation of the rows
        for mini in order.view(3, 8):  # mini-batches of 8 rows: two whole prompts each, rows in rollout order
            prompts = group[mini]
            assert len(set(prompts.tolist())) == 2 and (prompts.view(2, 4) == prompts.view(2, 4)[:, :1]).all()
            assert all(torch.equal(mini[prompts == p], torch.arange(4 * p, 4 * p + 4)) for p in prompts.unique())
        seen.add(tuple(group[order][::4].tolist()))
    assert len(seen) > 1  # the prompts' order is shuffled, seed by seed
    # rows: the draw the update always made (a resumed or earlier run deals the same mini-batches)
    rows = mini_batch_order(24, group, False, torch.Generator().manual_seed(3))
    assert torch.equal(rows, torch.randperm(24, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(mini_batch_order(24, None, True, torch.Generator().manual_seed(3)), rows)
    # prompt ids need not be 0..P-1 (any ids, in any order of first appearance)
    ids = torch.tensor([7, 2, 7, 2, 9, 9])
    pairs = ids[mini_batch_order(6, ids, True, torch.Generator().manual_seed(0))].view(3, 2)
    assert (pairs[:, 0] == pairs[:, 1]).all() and sorted(pairs[:, 0].tolist()) == [2, 7, 9]
