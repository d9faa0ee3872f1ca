"""The critic's body: a private copy, or the policy's own frozen base weights behind a second LoRA adapter."""

import pytest
import torch

from vrpo_pl.lora import LoRASpec, apply_lora
from vrpo_pl.models import TinyLM, copy_backbone


def _base_storages(model: torch.nn.Module) -> set[int]:
    return {p.data_ptr() for n, p in model.named_parameters(remove_duplicate=False) if "lora_" not in n}


def test_copy_backbone_without_sharing_owns_its_weights():
    lm = TinyLM().causal_lm(torch.float32)
    body = copy_backbone(lm)
    assert not _base_storages(body) & _base_storages(lm)
    for (name, a), (_, b) in zip(body.named_parameters(), lm.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_shared_backbone_keeps_adapters_apart():
    """Training the critic's adapter leaves the policy's function unchanged, and one base copy serves both."""
    lm = TinyLM().causal_lm(torch.float32)
    body = copy_backbone(lm, share_weights=True)
    spec = LoRASpec(r=4, alpha=8)
    policy, critic = apply_lora(lm, spec, causal_lm=True), apply_lora(body, spec, causal_lm=False)
    assert _base_storages(critic) <= _base_storages(policy)

    ids = torch.randint(0, 300, (2, 7))
    before = policy(input_ids=ids).logits.detach().clone()
    trainable = [p for p in critic.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for n, p in policy.named_parameters() if "lora_" not in n)
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    for _ in range(2):  # two steps: after the first, lora_B is non-zero and lora_A gets a gradient too
        critic(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        adapted = critic(input_ids=ids).last_hidden_state
        with critic.disable_adapter():
            base = critic(input_ids=ids).last_hidden_state
    assert not torch.allclose(adapted, base), "the critic's adapter did not train"
    assert torch.equal(policy(input_ids=ids).logits, before), "the critic's update leaked into the policy"


def test_plain_value_head_starts_near_zero_on_large_hidden_states():
    """A transformer's last hidden state has a large norm (here 5 per dimension, ~120 in all at H=576); the plain
    head's first values must still sit at the scale of 0/1 rewards, or the critic starts with a very negative
    explained variance (measured: -3.3 on SmolLM2 with std 1/sqrt(H+1))."""
    from vrpo_pl.critic import ValueHead

    torch.manual_seed(0)
    hidden = 5.0 * torch.randn(64, 10, 576)
    values = ValueHead(576, vib=False).forward(hidden).values
    assert values.shape == (64, 10)
    assert values.std() < 0.5, float(values.std())


def _smollm2_like_hidden(batch: int = 64, length: int = 10, size: int = 576) -> torch.Tensor:
    """Hidden states with SmolLM2-135M's statistics: per-dimension std ~2 (norm ~47) and one outlier dimension ~50."""
    generator = torch.Generator().manual_seed(0)
    hidden = 2.0 * torch.randn(batch, length, size, generator=generator)
    hidden[..., 7] = 50.0 + torch.randn(batch, length, generator=generator)
    return hidden


@pytest.mark.parametrize("vib", [False, True])
@pytest.mark.parametrize("normalize_values", [False, True])
def test_value_heads_start_within_the_reward_scale(vib, normalize_values):
    """Both heads' first values sit within a few hundredths of 0 (std < 0.06) on hidden states of SmolLM2's norm;
    before the input LayerNorm the VIB head's spread over +-0.4 and its KL started at 136 nats per token."""
    from vrpo_pl.critic import ValueHead
    from vrpo_pl.losses import vib_kl

    torch.manual_seed(0)
    head = ValueHead(576, vib=vib, normalize_values=normalize_values)
    out = head(_smollm2_like_hidden())
    mean, std = float(out.values.mean()), float(out.values.std())
    assert std < 0.06 and abs(mean) < 0.05, (mean, std)
    assert out.values.abs().max() < 0.25, float(out.values.abs().max())
    if vib:
        kl = vib_kl(out.mu, out.logvar).mean()
        # Unit-scale mu over 64 dims (~32 nats) plus sigma = exp(-1) (~36 nats): far from the old 136.
        assert 40 < kl < 90, float(kl)


def test_vib_rollout_values_average_the_decoder_over_fixed_antithetic_draws():
    from vrpo_pl.critic import ValueHead

    torch.manual_seed(0)
    head = ValueHead(32, vib=True, latent_dim=4, decoder_hidden=8, value_samples=6)
    assert head.value_eps.shape == (6, 4) and torch.equal(head.value_eps[:3], -head.value_eps[3:])
    hidden = torch.randn(2, 3, 32)
    out = head(hidden)
    sigma = torch.exp(0.5 * out.logvar)
    expected = torch.stack([head.decoder(out.mu + sigma * e) for e in head.value_eps]).squeeze(-1).mean(0)
    torch.testing.assert_close(out.values, expected)
    torch.testing.assert_close(head(hidden).values, out.values)  # deterministic: no random state is used
    plain = ValueHead(32, vib=True, latent_dim=4, decoder_hidden=8, value_samples=0)
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if k != "value_eps"})
    torch.testing.assert_close(plain(hidden).values, head.decoder(out.mu).squeeze(-1))


def test_return_normalizer_merges_batches_and_round_trips():
    from vrpo_pl.critic import ReturnNormalizer

    x = torch.randn(1000, dtype=torch.float64) * 3 + 2
    norm = ReturnNormalizer()
    for part in x.split(300):  # uneven parts merge to the whole batch's statistics
        norm.update(part.numel(), float(part.sum()), float((part**2).sum()))
    assert float(norm.count) == 1000
    torch.testing.assert_close(norm.mean, x.mean())
    torch.testing.assert_close(norm.var, x.var(unbiased=False))
    y = torch.randn(5)
    torch.testing.assert_close(norm.denormalize(norm.normalize(y)), y)


def test_return_normalizer_folds_masked_entries_after_the_reduction():
    """update_masked folds only the entries under the mask, after ``reduce`` combined their count and sums (as the
    sum over ranks does): two ranks' halves reduced give the statistics of the whole batch on each."""
    from vrpo_pl.critic import ReturnNormalizer

    x = torch.randn(2, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.float64)
    kept = x[mask.bool()]
    alone = ReturnNormalizer()
    alone.update_masked(x, mask)
    assert float(alone.count) == 8
    torch.testing.assert_close(alone.mean, kept.mean())
    torch.testing.assert_close(alone.var, kept.var(unbiased=False))
    other = torch.stack([mask[1].sum(), (x[1] * mask[1]).sum(), (x[1] ** 2 * mask[1]).sum()])  # the other rank's sums
    rank0 = ReturnNormalizer()
    rank0.update_masked(x[:1], mask[:1], reduce=lambda sums: sums + other)
    for name in ("count", "mean", "var"):
        torch.testing.assert_close(getattr(rank0, name), getattr(alone, name))


def test_vib_critic_fits_a_regression_on_fixed_features():
    """On fixed SmolLM2-scale features whose target is a noisy nonlinear function of a few dimensions, the VIB head
    trained as in PPO's critic update (sampled z, KL weight beta = 1e-3, AdamW lr 1e-3, mini-batches of 16 x 10
    tokens) reaches an explained variance of 0.5 on held-out features within 150 steps."""
    from vrpo_pl.critic import ValueHead
    from vrpo_pl.losses import explained_variance, vib_kl

    torch.manual_seed(0)
    hidden = _smollm2_like_hidden(batch=640)
    signal = torch.tanh(hidden[..., 0] / 2) + 0.5 * (hidden[..., 1] > 0).float()
    target = signal + 0.3 * torch.randn(signal.shape)
    mask = torch.ones_like(target)
    head = ValueHead(576, vib=True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(150):
        idx = torch.randint(0, 512, (16,), generator=generator)
        out = head(hidden[idx], sample=True, generator=generator)
        loss = 0.5 * (out.values - target[idx]).pow(2).mean() + 1e-3 * vib_kl(out.mu, out.logvar).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        ev = explained_variance(head(hidden[512:]).values, target[512:], mask[512:])
    ceiling = 1 - 0.09 / float(target[512:].var())  # the noise's share cannot be explained
    assert ev > 0.5, (float(ev), ceiling)


def test_lm_head_gets_a_contiguous_input_and_the_same_logits():
    """The pre-hook that works around pytorch/pytorch#151934 changes nothing but the input's layout."""
    from vrpo_pl.models import contiguous_lm_head

    lm = TinyLM().causal_lm(torch.float32).eval()
    ids = torch.randint(0, 300, (3, 9))
    with torch.no_grad():
        expected = lm(input_ids=ids, logits_to_keep=4).logits
        seen = []
        lm.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
        contiguous_lm_head(contiguous_lm_head(lm))  # idempotent: one hook
        got = lm(input_ids=ids, logits_to_keep=4).logits
    assert seen == [False]  # the sliced hidden states reach the hooks as a view ...
    assert torch.equal(got, expected)
    assert len(lm.get_output_embeddings()._forward_pre_hooks) == 2  # ... ours (once) made it contiguous after


def test_training_attention_is_eager_for_bf16_on_cpu_and_gives_the_same_gradient():
    from transformers import LlamaForCausalLM

    from vrpo_pl.models import training_attention

    source = TinyLM()
    config = source._config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).to(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding

    def gradient():
        lm.zero_grad()
        lm(input_ids=ids, attention_mask=mask).logits.float().logsumexp(-1)[mask.bool()].sum().backward()
        return lm.model.layers[0].self_attn.q_proj.weight.grad.float().clone()

    fused = gradient()
    with training_attention(lm, None):
        assert lm.config._attn_implementation == "eager"
        eager = gradient()
    assert lm.config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager, fused, atol=0.05, rtol=0.05)  # bf16 rounding
    with training_attention(lm.float()):
        assert lm.config._attn_implementation == "sdpa"  # float32: left alone


def test_lora_on_the_top_layers_only_trains_nothing_below_them():
    """``top_layers=1``: adapters on the last layer alone; the backward pass leaves every lower layer without a
    gradient, and a count outside 1..layers is refused with the flag named."""
    lm = TinyLM().causal_lm(torch.float32)
    layers = lm.config.num_hidden_layers
    assert layers >= 2
    body = apply_lora(copy_backbone(lm), LoRASpec(r=4, alpha=8, top_layers=1), causal_lm=False)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert adapted == {str(layers - 1)}
    seen = []
    body.base_model.model.layers[layers - 2].register_full_backward_hook(lambda *_: seen.append(1))
    body(input_ids=torch.randint(0, 300, (2, 7))).last_hidden_state.pow(2).mean().backward()
    assert not seen, "the backward pass reached a layer below the adapters"
    with pytest.raises(ValueError, match=r"top_layers=0 .*--model.critic_lora.top_layers"):
        apply_lora(copy_backbone(lm), LoRASpec(top_layers=0), causal_lm=False)
