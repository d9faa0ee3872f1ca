"""Setting groups check their own values when built and name the flag; cross-group checks name both flags."""

from __future__ import annotations

import pytest

from vrpo_pl.rollout import GenerationSettings, PromptSettings
from vrpo_pl.settings import (
    CriticSettings,
    KLSettings,
    OptimSettings,
    PPOSettings,
    RewardSettings,
    check_algorithm_settings,
    resolve_algorithm_defaults,
)


@pytest.mark.parametrize(("cls", "kwargs", "flag"), [
    (PPOSettings, {"epochs": 0}, "--model.ppo.epochs=0"),
    (PPOSettings, {"mini_batch_size": 8, "micro_batch_size": 3}, "--model.ppo.micro_batch_size=3 must divide"),
    (PPOSettings, {"clip_eps": 1.5}, "--model.ppo.clip_eps=1.5"),
    (PPOSettings, {"value_clip": -0.2}, "--model.ppo.value_clip=-0.2 must be > 0"),
    (PPOSettings, {"lam": 1.2}, "--model.ppo.lam=1.2"),
    (PPOSettings, {"gamma": 0.0}, "--model.ppo.gamma=0.0"),
    (PPOSettings, {"max_nonfinite_updates": 0}, "--model.ppo.max_nonfinite_updates=0"),
    (PPOSettings, {"max_tokens_per_forward": 0}, "--model.ppo.max_tokens_per_forward=0 must be >= 1"),
    (PPOSettings, {"shuffle": "random"}, "--model.ppo.shuffle='random' must be 'prompts' or 'rows'"),
    (OptimSettings, {"critic_lr": 0.0}, "--model.optim.critic_lr=0.0"),
    (OptimSettings, {"policy_max_grad_norm": -1.0}, "--model.optim.policy_max_grad_norm=-1.0"),
    (KLSettings, {"coef": -0.1}, "--model.kl.coef=-0.1"),
    (RewardSettings, {"clip": -1.0}, "--model.rewards.clip=-1.0 must be > 0"),
    (CriticSettings, {"decoder_hidden": 0}, "--model.critic.decoder_hidden=0"),
    (CriticSettings, {"latent_dim": 0}, "--model.critic.latent_dim=0"),
    (CriticSettings, {"beta": -1e-3}, "--model.critic.beta=-0.001"),
    (CriticSettings, {"value_samples": -1}, "--model.critic.value_samples=-1"),
    (GenerationSettings, {"temperature": 0.0}, "--model.generation.temperature=0.0"),
    (GenerationSettings, {"top_p": 0.0}, "--model.generation.top_p=0.0"),
    (GenerationSettings, {"max_new_tokens": 0}, "--model.generation.max_new_tokens=0"),
    (GenerationSettings, {"draw": "gumbel"}, "--model.generation.draw='gumbel'"),
    (PromptSettings, {"max_prompt_tokens": 0}, "--model.prompt.max_prompt_tokens=0"),
])
def test_each_bad_value_names_its_flag(cls, kwargs, flag):
    with pytest.raises(ValueError, match=flag.replace("(", r"\(").replace(".", r"\.")):
        cls(**kwargs)


def test_defaults_are_valid():
    for cls in (PPOSettings, OptimSettings, KLSettings, RewardSettings, CriticSettings, GenerationSettings,
                PromptSettings):
        cls()


@pytest.mark.parametrize(("algorithm", "vib", "aux", "placement", "estimator"), [
    ("ppo", False, "none", "reward", "k1"),
    ("vrpo", True, "predict", "reward", "k1"),
    ("grpo", False, "none", "loss", "k3"),
])
def test_algorithm_defaults(algorithm, vib, aux, placement, estimator):
    critic, kl = CriticSettings(), KLSettings()
    resolve_algorithm_defaults(algorithm, critic, kl)
    assert (critic.vib, critic.aux, kl.placement, kl.estimator) == (vib, aux, placement, estimator)
    explicit = CriticSettings(vib=False, aux="weight")
    resolve_algorithm_defaults(algorithm, explicit, KLSettings(placement="reward"))
    assert (explicit.vib, explicit.aux) == (False, "weight")  # what the user set is kept


def test_cross_group_checks_name_the_flags():
    with pytest.raises(ValueError, match="--model.algorithm='a2c'"):
        check_algorithm_settings("a2c", CriticSettings(vib=False, aux="none"), False)
    with pytest.raises(ValueError, match="grpo has no critic: --model.critic.vib"):
        check_algorithm_settings("grpo", CriticSettings(vib=True, aux="none"), False)
    with pytest.raises(ValueError, match="drop --model.critic_backbone and --model.critic_lora"):
        check_algorithm_settings("grpo", CriticSettings(vib=False, aux="none"), True)
