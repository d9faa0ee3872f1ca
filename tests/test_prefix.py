"""Shared prompt prefix (vrpo_pl.prefix) and packed rows (vrpo_pl.packing): the passes that compute each distinct
prompt once, or each real token once in packed rows, give the plain passes' logits, critic values and LoRA gradients
(float32, left padding, ragged responses, G = 1, 2, 4, shuffled micro-batches that split groups, one pack or
several), actually skip the repeated prompt and padding tokens, fall back to the plain pass where they cannot apply,
and a fit with either setting on matches one with it off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.testing import assert_close

from vrpo_pl.critic import ValueHead, ValueModel
from vrpo_pl.lora import LoRASpec, apply_lora
from vrpo_pl.models import TinyLM, copy_backbone
from vrpo_pl.passes import response_logits, score_rollout
from vrpo_pl.prefix import find_shared_prompts, supports_shared_prefix
from vrpo_pl.rollout import (
    PromptSettings,
    Rollout,
    micro_batch,
    position_ids_from_mask,
    response_mask,
    split_micro_batches,
    tokenize_prompts,
)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["What is 2 + 3?", "Add 14 and 27, then subtract 9. What do you get?", "1 - 1 =", "9 * 8 ="]
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def models():
    """``(tokenizer, policy, critic)``: a TinyLM policy and a VIB critic, each with LoRA on q/k/v/o whose B
    matrices are moved off zero (so the adapters change the function and every adapter matrix gets a gradient)."""
    source = TinyLM()
    lm = source.causal_lm(torch.float32)
    body = copy_backbone(lm)
    spec = LoRASpec(r=4, alpha=8)
    policy = apply_lora(lm, spec, causal_lm=True)
    critic = ValueModel(apply_lora(body, spec, causal_lm=False),
                        ValueHead(lm.config.hidden_size, vib=True, latent_dim=8, aux_targets=2))
    adapters_off_zero(policy, critic)
    return source.tokenizer(), policy, critic


def adapters_off_zero(*models: torch.nn.Module) -> None:
    """Moves the models' LoRA B matrices off zero (seeded), so the adapters change the function and every adapter
    matrix gets a gradient."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=generator))


def _rollout(tokenizer, samples: int, num_response: int = 6, seed: int = 0) -> Rollout:
    """PROMPTS x ``samples`` rows, prompt by prompt as the data module orders them, left-padded, with random
    responses of random length (EOS then padding; some truncated)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [p for p in PROMPTS for _ in range(samples)]
    input_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, PromptSettings())
    assert (prompt_mask == 0).any() and prompt_mask.all(0).any(), "prompts of different lengths, left-padded"
    batch = input_ids.shape[0]
    responses = torch.randint(10, len(tokenizer), (batch, num_response), generator=generator)
    lengths = torch.randint(1, num_response + 1, (batch,), generator=generator)
    for i, n in enumerate(lengths.tolist()):
        if i % 3 != 2:  # every third row runs to the end without EOS (truncated)
            responses[i, n - 1] = tokenizer.eos_token_id
            responses[i, n:] = tokenizer.pad_token_id
    mask, truncated = response_mask(responses, tokenizer.eos_token_id)
    attention = torch.cat([prompt_mask, mask.long()], 1)
    return Rollout(torch.cat([input_ids, responses], 1), attention, position_ids_from_mask(attention), responses,
                   mask, truncated, prompt_width=input_ids.shape[1],
                   group=torch.arange(len(PROMPTS)).repeat_interleave(samples))


def _rows_cases(r: Rollout, samples: int) -> list[torch.Tensor]:
    """Row sets to test: the whole batch, and a shuffled half whose groups are split."""
    order = torch.randperm(r.size, generator=torch.Generator().manual_seed(samples))
    return [torch.arange(r.size), order[: max(2, r.size // 2)]]


@contextmanager
def _count_tokens(model: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the tokens the model's embedding layer sees, pass by pass."""
    seen: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        yield seen
    finally:
        hook.remove()


def test_find_shared_prompts_marks_padding_and_first_occurrences():
    ids = torch.tensor([[0, 5, 6, 1], [7, 7, 6, 2], [0, 5, 6, 3], [7, 7, 6, 4], [9, 5, 6, 5]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    shared = find_shared_prompts(ids, mask, prompt_width=3)
    assert shared.split == 2
    assert sorted(shared.rows.tolist()) == [0, 1, 4]
    assert torch.equal(shared.rows[shared.inverse], torch.tensor([0, 1, 0, 1, 4]))
    # The same tokens with padding in another place are another prompt (row 0's pad id is 0, row 1's token 0).
    assert find_shared_prompts(torch.tensor([[0, 5, 1], [0, 5, 2]]), torch.tensor([[0, 1, 1], [1, 1, 1]]), 2) is None
    assert find_shared_prompts(ids[:2], mask[:2], prompt_width=3) is None  # no prompt repeats
    assert find_shared_prompts(ids, mask, prompt_width=1) is None  # a one-column prompt leaves nothing to cache


def test_only_causal_decoders_share_prompts(models):
    from transformers import BertConfig, BertModel

    _, policy, critic = models
    assert supports_shared_prefix(policy) and supports_shared_prefix(critic.backbone)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16))
    assert not supports_shared_prefix(bert)  # bidirectional: the prompt's states depend on the response


@pytest.mark.parametrize(("share", "pack_tokens"), [
    (True, None),  # shared, not packed
    (True, 512), (False, 512),  # packed, one pack
    (True, 12), (False, 12),  # packed, several packs (groups cut, the shorter packs padded)
])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("samples", [1, 2, 4])
def test_shared_and_packed_passes_equal_the_plain_pass(models, samples, attention, share, pack_tokens, monkeypatch):
    """Micro-batches (trimmed as the update trims them) of the whole batch and of a shuffled half, shared and/or
    packed: logits at the response positions, critic values, VIB means and auxiliary outputs equal the plain
    pass's; packed, the positions past a response's end hold zero logits."""
    import vrpo_pl.packing

    tokenizer, policy, critic = models
    pack = pack_tokens is not None
    if pack:
        monkeypatch.setattr(vrpo_pl.packing, "PACK_TOKENS", pack_tokens)
    for model in (policy, critic.backbone):
        monkeypatch.setattr(model.config, "_attn_implementation", attention)
    r = _rollout(tokenizer, samples)
    with torch.no_grad():
        for rows in _rows_cases(r, samples):
            b = micro_batch(r, rows)
            args = (b.sequences, b.attention_mask, b.position_ids, b.width)
            width = b.prompt_width if share else None
            valid = b.take(r.mask).bool()
            logits = response_logits(policy, *args, prompt_width=width, pack=pack)
            assert_close(logits[valid], response_logits(policy, *args)[valid], **TOL)
            if pack:
                assert not logits[~valid].any()
            out, plain = critic(*args, prompt_width=width, pack=pack), critic(*args)
            for name in ("values", "mu", "logvar", "aux"):
                assert_close(getattr(out, name)[valid], getattr(plain, name)[valid], **TOL, msg=name)


@pytest.mark.parametrize("samples", [2, 4])
def test_shared_pass_computes_each_prompt_once(models, samples):
    """The policy's embedding sees U x (P - 1) prompt tokens + B x A others, against B x T in the plain pass; a
    batch without a repeated prompt takes one plain pass."""
    tokenizer, policy, critic = models
    r = _rollout(tokenizer, samples)
    num, width = r.responses.shape[1], r.prompt_width
    with torch.no_grad(), _count_tokens(policy) as seen, _count_tokens(critic.backbone) as body_seen:
        response_logits(policy, r.sequences, r.attention_mask, r.position_ids, num, prompt_width=width)
        critic(r.sequences, r.attention_mask, r.position_ids, num, prompt_width=width)
        assert seen == body_seen == [len(PROMPTS) * (width - 1), r.size * num]
        seen.clear()
        b = micro_batch(r, torch.arange(0, r.size, samples))  # one row per prompt
        response_logits(policy, b.sequences, b.attention_mask, b.position_ids, b.width, prompt_width=b.prompt_width)
        assert seen == [b.sequences.numel()]


def _losses(policy, critic, b, r: Rollout, prompt_width: int | None,
            pack: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A log-likelihood of the responses (policy) and a squared error of the values (critic) on micro-batch ``b``."""
    args, tokens, mask = (b.sequences, b.attention_mask, b.position_ids, b.width), b.take(r.responses), b.take(r.mask)
    logits = response_logits(policy, *args, prompt_width=prompt_width, pack=pack)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    values = critic(*args, prompt_width=prompt_width, pack=pack).values
    return (logp * mask).sum(), ((values - 1.0) ** 2 * mask).sum()


@pytest.mark.parametrize("samples", [2, 4])
def test_shared_pass_gives_the_plain_lora_gradients(models, samples):
    """Gradients of every LoRA matrix (policy and critic) through the shared prompt's expanded KV cache equal the
    plain pass's, for a micro-batch of whole groups and a shuffled one that splits them."""
    tokenizer, policy, critic = models
    r = _rollout(tokenizer, samples)
    params = [[p for n, p in model.named_parameters() if "lora_" in n] for model in (policy, critic)]
    assert all(params)
    for rows in _rows_cases(r, samples):
        b = micro_batch(r, rows)
        _assert_same_losses_and_gradients(_losses(policy, critic, b, r, b.prompt_width),
                                          _losses(policy, critic, b, r, None), params)


def _assert_same_losses_and_gradients(losses, plain_losses, params) -> None:
    """Each loss and its gradients on its model's LoRA matrices equal the plain pass's (a gradient that is zero
    everywhere would prove nothing)."""
    for loss, loss_plain, tensors in zip(losses, plain_losses, params, strict=True):
        assert_close(loss, loss_plain, **TOL)
        for grad, grad_plain in zip(torch.autograd.grad(loss, tensors), torch.autograd.grad(loss_plain, tensors),
                                    strict=True):
            assert grad_plain.abs().max() > 0
            assert_close(grad, grad_plain, rtol=1e-5, atol=1e-5 * float(grad_plain.abs().max()))


def test_score_rollout_with_shared_prompts_fills_the_plain_fields(models):
    """The rollout's passes (old log-probs, reference through the adapter-disabled policy, values) with sharing on
    equal those with it off, in slices of 3 rows that cut groups."""
    tokenizer, policy, critic = models
    fields = {}
    for share in (True, False):
        r = _rollout(tokenizer, samples=2)
        score_rollout(r, policy, None, critic, temperature=0.7, chunk=3, share_prefix=share)
        fields[share] = {name: getattr(r, name) * r.mask for name in ("logp", "ref_logp", "values")}
    for name, value in fields[True].items():
        assert_close(value, fields[False][name], **TOL, msg=name)


def test_score_rollout_in_one_wide_pass_fills_the_same_fields(models):
    """--model.ppo.max_tokens_per_forward: the whole rollout in one no-gradient pass gives what slices of 3 rows
    (which cut groups) give, with and without shared prompts."""
    tokenizer, policy, critic = models
    for share in (True, False):
        fields = {}
        for chunk in (3, 64):
            r = _rollout(tokenizer, samples=2)
            score_rollout(r, policy, None, critic, temperature=0.7, chunk=chunk, share_prefix=share)
            fields[chunk] = {name: getattr(r, name) * r.mask for name in ("logp", "ref_logp", "values")}
        for name, value in fields[64].items():
            assert_close(value, fields[3][name], **TOL, msg=name)


def test_micro_batches_by_prompt_keep_the_mini_batch(models):
    """Ordered by prompt (stable within a prompt), then cut: the same rows, whole groups together."""
    tokenizer, _, _ = models
    r = _rollout(tokenizer, samples=2)
    idx = torch.tensor([6, 1, 2, 7, 0, 3])
    plain = split_micro_batches(r, idx, 2, None)
    grouped = split_micro_batches(r, idx, 2, None, by_prompt=True)
    assert [m.tolist() for m in plain] == [[6, 1], [2, 7], [0, 3]]
    assert [m.tolist() for m in grouped] == [[1, 0], [2, 3], [6, 7]]
    assert [r.group[m].unique().numel() for m in grouped] == [1, 1, 1]
    assert sorted(torch.cat(grouped).tolist()) == sorted(idx.tolist())


@pytest.mark.parametrize("setting", ["share_prompt_prefix", "pack_rows", "fuse_update"])
@pytest.mark.parametrize("extra", [
    [],  # tiny.yaml: full fine-tuning, VRPO, micro-batches of 2 in mini-batches of 4
    ["--model.lora", "{r: 4, alpha: 8}", "--model.critic_lora", "{r: 4, alpha: 8}", "--model.ppo.micro_batch_size",
     "4", "--model.generation.sampler_logprobs", "false"],
])
def test_fit_with_shared_prompts_matches_fit_without(run_cli, read_events, tmp_path, extra, setting):
    """One rollout batch of configs/tiny.yaml with ``--model.ppo.share_prompt_prefix``, ``--model.ppo.pack_rows``
    or ``--model.ppo.fuse_update`` on and off: every logged loss and statistic of the first step is the same within
    float32 rounding (timings, whose phases differ with fused passes, and clip fractions aside).

    Without the auxiliary loss: the random tiny model's guide entropies all lie within ~1e-3 of log V, so their
    standardization multiplies float rounding (~1e-6) by ~1000 (measured), which no pass order can avoid.
    """
    scalars = {}
    for share in ("true", "false"):
        root = tmp_path / share
        run_cli(root, f"--model.ppo.{setting}", share, "--trainer.val_check_interval", "100",
                "--model.validate_at_start", "false", "--model.critic.aux", "none", *extra, max_steps=1)
        events = read_events(root)
        scalars[share] = {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]}
    on, off = scalars["true"], scalars["false"]
    exempt = ("perf/", "policy/clipfrac", "value/clipfrac")
    assert {t for t in on if not t.startswith("perf/")} == {t for t in off if not t.startswith("perf/")}
    assert {"loss/policy", "loss/value", "loss/vib_kl"} <= on.keys()
    if setting == "fuse_update":  # fused where both models are LoRA on one base (extra), never with full fine-tuning
        assert ("perf/update_fused_s" in on) == bool(extra) and "perf/update_fused_s" not in off
    differ = {tag: (on[tag], off[tag]) for tag in on
              if not tag.startswith(exempt) and on[tag] != pytest.approx(off[tag], rel=1e-4, abs=1e-6)}
    assert not differ, f"statistics that depend on --model.ppo.{setting}: {differ}"


def test_micro_batches_sharing_prompts_accumulate_to_the_mini_batch_update(run_cli, tmp_path):
    """VRPO's VIB critic and the policy, one rollout batch of 8 in mini-batches of 4: micro-batches of 1 row (no
    prompt to share) and of 4 rows formed prompt by prompt (shared) give the same weights (auxiliary loss off, see
    the test above)."""
    weights = {}
    for micro in (1, 4):
        cli = run_cli(tmp_path / str(micro), "--model.ppo.mini_batch_size", "4", "--model.ppo.micro_batch_size",
                      str(micro), "--model.critic.aux", "none", "--model.validate_at_start", "false", max_steps=1)
        weights[micro] = {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}
    assert weights[1].keys() == weights[4].keys()
    worst = max(weights[1], key=lambda n: (weights[1][n] - weights[4][n]).abs().max().item())
    diff = (weights[1][worst] - weights[4][worst]).abs().max().item()
    assert diff < 1e-4, f"{worst} differs by {diff} between micro-batches of 1 and 4"


def test_fsdp2_takes_the_plain_passes(run_cli, tmp_path, monkeypatch):
    """Under FSDP2 (a device mesh) every pass is plain: a shared pass makes two sharded calls, a plain one one, and
    ranks must make the same calls; without a mesh the setting decides."""
    system = run_cli(tmp_path, run=False).model
    assert system.shares_prompts
    monkeypatch.setattr(system, "_device_mesh", object())
    assert not system.shares_prompts
    monkeypatch.setattr(system, "_device_mesh", None)
    monkeypatch.setattr(system.ppo, "share_prompt_prefix", False)
    assert not system.shares_prompts


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_update_ratio_is_one_with_shared_old_logprobs(run_cli, read_events, tmp_path, dtype):
    """Old log-probs from the shared rollout pass (not the sampler's), the update's micro-batches sharing too: the
    first ratio is 1 within rounding."""
    args = ["--model.lora", "{r: 4, alpha: 8}", "--model.critic_lora", "{r: 4, alpha: 8}", "--model.dtype", dtype,
            "--model.ppo.epochs", "1", "--model.ppo.mini_batch_size", "8", "--model.ppo.micro_batch_size", "4",
            "--model.generation.sampler_logprobs", "false", "--model.ppo.share_prompt_prefix", "true"]
    run_cli(tmp_path, *args, max_steps=1)
    events = read_events(tmp_path)
    ratio = events.Scalars("policy/ratio_mean")[0].value
    tolerance = 1e-5 if dtype == "float32" else 1e-3
    assert abs(ratio - 1) < tolerance, ratio
    assert events.Scalars("policy/clipfrac")[0].value == 0.0


@pytest.mark.parametrize(("greedy", "temperature", "top_p"), [(True, 1.0, 1.0), (False, 1.0, 1.0), (False, 0.7, 0.9)])
def test_loop_sampler_prefilling_each_prompt_once_draws_the_same_tokens(models, greedy, temperature, top_p):
    """PROMPTS x 3 samples, rows shuffled: the loop sampler with its prefill shared draws the tokens (and log-probs)
    it draws without, and those transformers' generate draws, for a seed; its prefill sees each prompt once."""
    from vrpo_pl.rollout import GenerationSettings
    from vrpo_pl.sampling import HFSampler, LoopSampler

    tokenizer, policy, _ = models
    prompts = [p for p in PROMPTS for _ in range(3)]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)).tolist()
    input_ids, prompt_mask = tokenize_prompts(tokenizer, [prompts[i] for i in order], PromptSettings())
    out = {}
    for name, sampler, share in [("shared", LoopSampler(), True), ("plain", LoopSampler(), False),
                                 ("generate", HFSampler(), False)]:
        settings = GenerationSettings(max_new_tokens=10, temperature=temperature, top_p=top_p,
                                      share_prompt_prefill=share, draw="multinomial")
        torch.manual_seed(3)
        with _count_tokens(policy) as seen:
            out[name] = sampler.sample(policy, input_ids, prompt_mask, settings, tokenizer.eos_token_id,
                                       tokenizer.pad_token_id, greedy=greedy, with_logprobs=True)
        if name == "shared":
            assert seen[0] == len(PROMPTS) * input_ids.shape[1]  # the prefill: each prompt once
    for name in ("plain", "generate"):
        assert torch.equal(out["shared"][0], out[name][0]), name
        assert_close(out["shared"][1], out[name][1], atol=1e-5, rtol=1e-5, msg=name)


# Packed passes (vrpo_pl.packing): the rows' real tokens end to end in one call under a block mask.


@pytest.mark.parametrize("share", [True, False])
def test_packed_pass_computes_each_real_token_once(models, share):
    """One call whose real tokens are each (distinct) prompt once and every response but its last token; the rest
    of the packs is padding of the shorter packs only."""
    from vrpo_pl.packing import pack_rows

    tokenizer, policy, _ = models
    r = _rollout(tokenizer, samples=4)
    num = r.responses.shape[1]
    prompts = r.attention_mask[:, : r.prompt_width].sum(1)
    expected = int(prompts[:: 4].sum() if share else prompts.sum()) + int((r.mask.sum(1) - 1).sum())
    packed = pack_rows(r.sequences, r.attention_mask, r.position_ids, num, share_prompts=share)
    assert int((packed.groups >= 0).sum()) == expected
    with torch.no_grad(), _count_tokens(policy) as seen:
        response_logits(policy, r.sequences, r.attention_mask, r.position_ids, num,
                        prompt_width=r.prompt_width if share else None, pack=True)
    assert seen == [packed.input_ids.numel()]


@pytest.mark.parametrize("share", [True, False])
def test_packed_pass_gives_the_plain_lora_gradients(models, share, monkeypatch):
    """Gradients of every LoRA matrix (policy and critic) through a packed pass equal the plain pass's, in one pack
    and in several."""
    import vrpo_pl.packing

    tokenizer, policy, critic = models
    r = _rollout(tokenizer, samples=2)
    params = [[p for n, p in model.named_parameters() if "lora_" in n] for model in (policy, critic)]
    for pack_tokens in (512, 12):
        monkeypatch.setattr(vrpo_pl.packing, "PACK_TOKENS", pack_tokens)
        for rows in _rows_cases(r, 2):
            b = micro_batch(r, rows)
            _assert_same_losses_and_gradients(
                _losses(policy, critic, b, r, b.prompt_width if share else None, pack=True),
                _losses(policy, critic, b, r, None), params)


def test_score_rollout_packed_fills_the_plain_fields(models):
    """The rollout's passes packed (slices of 3 rows that cut groups, and one wide pass) equal the plain ones."""
    tokenizer, policy, critic = models
    fields = {}
    for pack, chunk in ((False, 3), (True, 3), (True, 64)):
        r = _rollout(tokenizer, samples=2)
        score_rollout(r, policy, None, critic, temperature=0.7, chunk=chunk, share_prefix=pack, pack=pack)
        fields[pack, chunk] = {name: getattr(r, name) * r.mask for name in ("logp", "ref_logp", "values")}
    for key in ((True, 3), (True, 64)):
        for name, value in fields[key].items():
            assert_close(value, fields[False, 3][name], **TOL, msg=f"{key} {name}")


def test_packing_only_where_the_mask_is_honoured(models, monkeypatch):
    """Packed only over rows of at most PACK_MAX_TOKENS real tokens, for a causal decoder whose attention takes the
    4D mask as is, without a sliding window narrower than the rows, over left-padded prompts followed by
    right-padded responses; else the other passes."""
    from transformers import BertConfig, BertModel

    from vrpo_pl.packing import packable, rows_are_packable

    tokenizer, policy, _ = models
    r = _rollout(tokenizer, samples=2)
    num = r.responses.shape[1]
    assert packable(policy, r.attention_mask, num)
    holed = r.attention_mask.clone()
    holed[0, r.prompt_width + 1] = 0  # a response that resumes after padding
    assert not rows_are_packable(holed, num) and not packable(policy, holed, num)
    assert not rows_are_packable(r.attention_mask, r.sequences.shape[1])  # no prompt column
    monkeypatch.setattr("vrpo_pl.packing.PACK_MAX_TOKENS", int(r.attention_mask.sum()) - 1)
    assert not packable(policy, r.attention_mask, num)  # wide rows: the shared pass
    monkeypatch.setattr("vrpo_pl.packing.PACK_MAX_TOKENS", int(r.attention_mask.sum()))
    assert packable(policy, r.attention_mask, num)
    config = policy.config
    monkeypatch.setattr(config, "_attn_implementation", "flash_attention_2")
    assert not packable(policy, r.attention_mask, num)
    monkeypatch.setattr(config, "_attn_implementation", "eager")
    monkeypatch.setattr(config, "sliding_window", r.sequences.shape[1] - 1, raising=False)
    assert not packable(policy, r.attention_mask, num)
    monkeypatch.setattr(config, "sliding_window", r.sequences.shape[1], raising=False)
    assert packable(policy, r.attention_mask, num)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16))
    assert not packable(bert, r.attention_mask, num)
    holed_logits = response_logits(policy, r.sequences, holed, r.position_ids, num, pack=True)
    assert_close(holed_logits, response_logits(policy, r.sequences, holed, r.position_ids, num))  # the plain pass


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_rollout_normalizes_the_reference_logits_once_for_its_guide(models, monkeypatch, temperature):
    """With the reference as guide at temperature 1, the reference's log-probs and the guide's entropy and
    surprisal come from one normalization of its logits (two per slice: the policy's and the reference's); at
    another temperature the guide's untempered targets need a third. The fields are those of separate calls."""
    import vrpo_pl.logprobs
    from vrpo_pl.passes import guide_targets, reference_guide

    tokenizer, policy, critic = models
    calls = []
    original = vrpo_pl.logprobs.token_logprobs_and_entropy
    monkeypatch.setattr(vrpo_pl.logprobs, "token_logprobs_and_entropy",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    r = _rollout(tokenizer, samples=2)
    score_rollout(r, policy, None, None, temperature=temperature, chunk=64, guide=reference_guide, pack=True)
    assert len(calls) == (2 if temperature == 1.0 else 3)
    with policy.disable_adapter(), torch.no_grad():
        logits = response_logits(policy, r.sequences, r.attention_mask, r.position_ids, r.responses.shape[1])
    valid = r.mask.bool()
    assert_close(r.guide_raw[valid], guide_targets(logits, r.responses)[valid], **TOL)
