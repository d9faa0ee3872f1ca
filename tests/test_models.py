"""The critic's body: a private copy, or the policy's own frozen base weights behind a second LoRA adapter."""

import torch

from vrpo_pl.models import LoRASpec, TinyLM, apply_lora, copy_backbone


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
    from vrpo_pl.models import ValueHead

    torch.manual_seed(0)
    hidden = 5.0 * torch.randn(64, 10, 576)
    values = ValueHead(576, vib=False).forward(hidden).values
    assert values.shape == (64, 10)
    assert values.std() < 0.5, float(values.std())
