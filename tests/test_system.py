"""Integration tests of RLSystem on the tiny random model: fit through the CLI for each algorithm, the documented
TensorBoard metrics and their steps, which parameters train, micro-batch accumulation, training with no callbacks,
and the callbacks (KLController with a mock module, SampleLogger in a real run)."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from vrpo_pl.callbacks import FrozenLMTargets, KLController, SampleLogger, adaptive_kl_update
from vrpo_pl.models import TinyLM
from vrpo_pl.rewards import NumericVerifier
from vrpo_pl.system import RLSystem

COMMON_TAGS = {
    "reward/train", "reward/gold", "loss/policy", "kl/ref", "kl/coef", "policy/clipfrac", "policy/approx_kl",
    "policy/entropy", "response/length", "perf/samples_per_s", "perf/rollout_s", "perf/update_s",
}
"""Training metrics every algorithm logs once per rollout batch."""
CRITIC_TAGS = {"loss/value", "value/explained_variance"}
VRPO_TAGS = {"loss/vib_kl", "loss/aux"}
EXPECTED_TAGS = {
    "ppo": COMMON_TAGS | CRITIC_TAGS,
    "grpo": COMMON_TAGS,
    "vrpo": COMMON_TAGS | CRITIC_TAGS | VRPO_TAGS,
}
MAX_STEPS, VAL_EVERY = 4, 2  # tiny.yaml's: validation at rollouts 0, 2 and 4


@pytest.fixture(scope="module", params=["ppo", "grpo", "vrpo"])
def tiny_run(request, run_cli, read_events, tmp_path_factory):
    """``vrpo fit --config configs/tiny.yaml --model.algorithm ALGO`` (4 rollout batches), once per module."""
    algorithm = request.param
    root = tmp_path_factory.mktemp(f"fit_{algorithm}")
    cli = run_cli(root, "--model.algorithm", algorithm, "--trainer.val_check_interval", str(VAL_EVERY),
                  max_steps=MAX_STEPS)
    return SimpleNamespace(algorithm=algorithm, cli=cli, root=root, events=read_events(root))


def test_fit_logs_documented_tags(tiny_run):
    tags = set(tiny_run.events.Tags()["scalars"])
    missing = (EXPECTED_TAGS[tiny_run.algorithm] | {"val/accuracy"}) - tags
    assert not missing, f"{tiny_run.algorithm}: missing TensorBoard tags {sorted(missing)}"
    if tiny_run.algorithm == "grpo":
        assert not (CRITIC_TAGS | VRPO_TAGS) & tags, "grpo has no critic"
    if tiny_run.algorithm == "ppo":
        assert not VRPO_TAGS & tags, "ppo has no VIB and no auxiliary loss by default"


def test_metrics_are_logged_at_rollout_steps(tiny_run):
    events = tiny_run.events
    for tag in EXPECTED_TAGS[tiny_run.algorithm]:
        steps = [e.step for e in events.Scalars(tag)]
        assert steps == list(range(1, MAX_STEPS + 1)), f"{tag} logged at steps {steps}"
        values = [e.value for e in events.Scalars(tag)]
        assert all(v == v for v in values), f"{tag} has NaN values {values}"
    val_steps = [e.step for e in events.Scalars("val/accuracy")]
    assert val_steps == list(range(0, MAX_STEPS + 1, VAL_EVERY))
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("val/accuracy"))


def test_one_global_step_per_rollout_batch(tiny_run):
    trainer, model = tiny_run.cli.trainer, tiny_run.cli.model
    assert trainer.global_step == MAX_STEPS
    assert model.rollouts == MAX_STEPS
    assert (model.critic is None) == (tiny_run.algorithm == "grpo")


def test_sample_logger_writes_text_summary(tiny_run):
    """tiny.yaml's SampleLogger (every 2 rollouts) writes the ``samples`` table at rollouts 1 and 3."""
    tensors = tiny_run.events.Tags()["tensors"]
    tag = next((t for t in tensors if t.startswith("samples")), None)
    assert tag is not None, f"no 'samples' text summary among {tensors}"
    events = tiny_run.events.Tensors(tag)
    assert [e.step for e in events] == [1, 3]
    text = events[0].tensor_proto.string_val[0].decode()
    assert "| prompt | response | answer | reward_train | reward_gold | advantage |" in text
    assert "arithmetic" in text  # a prompt of configs/data/arithmetic.jsonl


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trainable_parameters_change_and_frozen_do_not(run_cli, tmp_path, lora):
    """vrpo for 2 rollout batches (2 epochs x 2 mini-batches each): every trainable tensor moves, no frozen one."""
    extra = ["--model.lora", "{r: 4, alpha: 8}", "--model.critic_lora", "{r: 4, alpha: 8}"] if lora else []
    cli = run_cli(tmp_path, *extra, run=False)
    model = cli.model
    model.configure_model()
    before = _snapshot(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = set(before) - trainable

    cli.trainer.fit(model, datamodule=cli.datamodule)

    assert cli.trainer.global_step == 2
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert {name for name, p in after.items() if p.requires_grad} == trainable
    unchanged = sorted(name for name in trainable if torch.equal(before[name], after[name]))
    assert not unchanged, f"trainable parameters that did not change: {unchanged}"
    moved = sorted(name for name in frozen if not torch.equal(before[name], after[name]))
    assert not moved, f"frozen parameters that changed: {moved}"

    assert any(name.startswith("critic.head.") for name in trainable)
    if lora:
        assert model.reference is None, "with LoRA the reference is the adapter-disabled policy"
        assert frozen, "LoRA must freeze the base weights"
        policy_trainable = [n for n in trainable if n.startswith("policy.")]
        assert policy_trainable and all("lora_" in n for n in policy_trainable)
        body_trainable = [n for n in trainable if n.startswith("critic.backbone.")]
        assert body_trainable and all("lora_" in n for n in body_trainable)
        assert all(not p.requires_grad for n, p in after.items() if n.startswith("policy.") and "lora_" not in n)
        # One copy of the base weights: the critic's body holds the policy's own frozen tensors.
        policy_base = {p.data_ptr() for n, p in model.policy.named_parameters() if "lora_" not in n}
        critic_base = [p for n, p in model.critic.backbone.named_parameters(remove_duplicate=False)
                       if "lora_" not in n]
        assert critic_base and all(p.data_ptr() in policy_base for p in critic_base)
    else:
        assert model.reference is not None
        assert all(n.startswith("reference.") for n in frozen) and frozen
        assert all(after[n].requires_grad for n in after if n.startswith(("policy.", "critic.")))


_LENGTH_REWARD = ('{"class_path": "vrpo_pl.rewards.LengthBias", "init_args": {"base": {"class_path": '
                  '"vrpo_pl.rewards.NumericVerifier"}, "coef": 0.1, "unit": "chars"}}')


@pytest.fixture(scope="module", params=["vrpo", "grpo"])
def micro_runs(request, run_cli, read_events, tmp_path_factory):
    """One rollout batch of 8 with mini-batches of 4, split into micro-batches of 1 and of 4, from the same seed.

    Returns ``{micro: (weights after the update, last value of every logged scalar)}``.
    """
    runs = {}
    for micro in (1, 4, "budget"):
        root = tmp_path_factory.mktemp(f"{request.param}_micro{micro}")
        # "budget": micro-batches grouped by length within 40 padded tokens (2-3 of these tiny sequences)
        split = (["--model.ppo.micro_batch_size", str(micro)] if micro != "budget" else
                 ["--model.ppo.max_tokens_per_micro_batch", "40"])
        # A reward that differs within every group (the response's length in characters), so that GRPO's gradient
        # is signal: with equal rewards its advantages are 0, the gradient is rounding noise (~1e-9), and Adam's
        # first step turns noise of either sign into a step of ~lr, which no accumulation scheme can reproduce.
        # Plain passes: the rollout's passes are chunked by the micro-batch size, and shared-prompt chunks of 1 and
        # of 4 rows round differently (~1e-6), which the tiny model's guide standardization amplifies into other
        # key tokens (its entropies lie within ~1e-3 of log V). test_prefix.py checks accumulation with sharing on.
        cli = run_cli(root, "--model.algorithm", request.param, "--model.ppo.mini_batch_size", "4", *split,
                      "--model.reward", _LENGTH_REWARD, "--model.ppo.share_prompt_prefix", "false", max_steps=1)
        assert cli.trainer.global_step == 1
        events = read_events(root)
        scalars = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
        runs[micro] = (_snapshot(cli.model), scalars)
    return runs


@pytest.mark.slow
def test_micro_batches_accumulate_to_the_mini_batch_gradient(micro_runs):
    """Micro-batches of 1 and 4 give the same weights and the same gradient norms before clipping.

    The weights alone are a weak check (Adam's update does not see a constant scale of the gradient), so the
    logged pre-clipping gradient norms are compared too: a loss normalized per micro-batch would scale them.
    """
    w1, s1 = micro_runs[1]
    for other in (4, "budget"):
        w4, s4 = micro_runs[other]
        assert w1.keys() == w4.keys()
        worst = max(w1, key=lambda n: (w1[n] - w4[n]).abs().max().item())
        diff = (w1[worst] - w4[worst]).abs().max().item()
        assert diff < 1e-4, f"{worst} differs by {diff} between micro-batch 1 and {other}"
        grad_tags = [t for t in s1 if t.endswith("grad_norm")]
        assert "policy/grad_norm" in grad_tags
        for tag in [*grad_tags, "loss/policy"] + [t for t in ("loss/value", "loss/kl") if t in s1]:
            assert s1[tag] == pytest.approx(s4[tag], rel=1e-4, abs=1e-6), f"{tag}: {s1[tag]} vs {s4[tag]} ({other})"


@pytest.mark.slow
def test_update_statistics_do_not_depend_on_micro_batch_size(micro_runs):
    """Every logged statistic is the same for micro-batches of 1 and 4, except timings and clip fractions.

    Clip fractions count tokens beyond a threshold, so a token at the boundary may flip with float noise.
    """
    (_, s1), (_, s4) = micro_runs[1], micro_runs[4]
    assert s1.keys() == s4.keys()
    exempt = ("perf/", "policy/clipfrac", "value/clipfrac")
    differ = {tag: (s1[tag], s4[tag]) for tag in s1
              if not tag.startswith(exempt) and s1[tag] != pytest.approx(s4[tag], rel=1e-4, abs=1e-6)}
    assert not differ, f"statistics that depend on --model.ppo.micro_batch_size (1 vs 4): {differ}"


@pytest.mark.parametrize("algorithm", ["ppo", "vrpo"])
def test_trains_with_no_callbacks(run_cli, tmp_path, algorithm):
    """The module trains without any callback (fixed KL coefficient; vrpo needs ``--model.critic.aux none``)."""
    extra = ["--model.critic.aux", "none"] if algorithm == "vrpo" else []
    cli = run_cli(tmp_path, "--model.algorithm", algorithm, "--trainer.callbacks", "[]",
                  "--trainer.enable_checkpointing", "false", *extra)
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == 2
    user_callbacks = [cb for cb in trainer.callbacks if type(cb).__module__.startswith("vrpo_pl")]
    assert not user_callbacks
    assert not any(isinstance(cb, FrozenLMTargets | KLController | SampleLogger) for cb in trainer.callbacks)
    assert model.kl_coef == model.kl.coef, "without KLController the coefficient stays fixed"
    assert model.guide_callback is None


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_fp16_precision_is_refused_at_setup(precision):
    """fp16 needs a gradient scaler that the manual-optimization loop does not run.

    Lightning replaces ``16-mixed`` by ``bf16-mixed`` on CPU before the module sees it, so the check is driven
    with a mock trainer reporting what a GPU trainer would (test_cli runs ``16-true`` through the CLI).
    """
    model = RLSystem(policy=TinyLM(), reward=NumericVerifier())
    model.trainer = SimpleNamespace(precision=precision, callbacks=[], datamodule=None)
    with pytest.raises(ValueError, match=f"--trainer.precision {precision}"):
        model.setup("fit")


# --------------------------------------------------------------- callbacks with a mock module
def _mock_module(kl_coef: float = 0.05, kl: float | None = None, n_samples: int = 100) -> SimpleNamespace:
    stats = None if kl is None else {"kl": kl, "n_samples": n_samples}
    return SimpleNamespace(kl_coef=kl_coef, last_rollout_stats=stats)


@pytest.mark.parametrize("kl, direction", [(5.0, 1), (0.2, -1)])
def test_kl_controller_moves_coefficient_toward_target(kl, direction):
    controller = KLController(target=1.0, horizon=1000)
    module = _mock_module(kl_coef=0.05, kl=kl)
    controller.on_train_start(None, module)
    assert controller.coef == 0.05
    controller.on_train_batch_end(None, module, None, None, 0)
    expected = adaptive_kl_update(0.05, kl, 1.0, 1000, 100)
    assert module.kl_coef == pytest.approx(expected) and controller.coef == module.kl_coef
    assert (module.kl_coef - 0.05) * direction > 0  # KL above target raises the coefficient, below lowers it


def test_kl_controller_fixed_and_before_first_rollout():
    fixed = KLController(target=None)
    module = _mock_module(kl_coef=0.1, kl=50.0)
    fixed.on_train_start(None, module)
    fixed.on_train_batch_end(None, module, None, None, 0)
    assert module.kl_coef == 0.1
    adaptive = KLController(target=1.0)
    module = _mock_module(kl_coef=0.1, kl=None)  # no rollout stats yet
    adaptive.on_train_start(None, module)
    adaptive.on_train_batch_end(None, module, None, None, 0)
    assert module.kl_coef == 0.1


def test_kl_controller_state_dict_round_trip():
    controller = KLController(target=1.0, horizon=100)
    module = _mock_module(kl_coef=0.05, kl=3.0, n_samples=50)
    controller.on_train_start(None, module)
    for _ in range(3):
        controller.on_train_batch_end(None, module, None, None, 0)
    state = controller.state_dict()
    assert state == {"coef": controller.coef} and state["coef"] != 0.05

    restored = KLController(target=1.0, horizon=100)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    resumed = _mock_module(kl_coef=0.05)  # a fresh module starts from --model.kl.coef ...
    restored.on_train_start(None, resumed)
    assert resumed.kl_coef == state["coef"]  # ... and the callback restores the adapted value


@pytest.mark.parametrize("bad", [{"target": 0.0}, {"target": -1.0}, {"horizon": 0}])
def test_kl_controller_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="KLController"):
        KLController(**{"target": 1.0, **bad})


def test_critic_epochs_and_warmup_schedule_the_optimizer_steps(run_cli, tmp_path):
    """Three rollout batches, one policy epoch, three critic epochs, the first rollout critic-only: the critic
    steps 3 x mini-batches per rollout, the policy 1 x mini-batches from the second rollout on."""
    from vrpo_pl.update import PPOUpdate

    cli = run_cli(tmp_path, "--model.ppo.epochs", "1", "--model.ppo.critic_epochs", "3",
                  "--model.ppo.critic_warmup_rollouts", "1", max_steps=3, run=False)
    model = cli.model
    rollout_size = cli.datamodule.prompts_per_rollout * cli.datamodule.samples_per_prompt
    minis = rollout_size // model.ppo.mini_batch_size
    steps: list[tuple[int, str]] = []
    original = PPOUpdate.optimizer_step

    def counted(self, names, *args, **kwargs):
        steps.extend((self.rollouts, name) for name in names)  # fused passes step both models at once
        return original(self, names, *args, **kwargs)

    with mock.patch.object(PPOUpdate, "optimizer_step", counted):
        cli.trainer.fit(model, datamodule=cli.datamodule)
    rollouts = sorted({k for k, _ in steps})
    assert len(rollouts) == 3
    for i, k in enumerate(rollouts):
        assert steps.count((k, "critic")) == 3 * minis
        assert steps.count((k, "policy")) == (0 if i == 0 else minis)


def test_critic_epochs_must_be_positive():
    from vrpo_pl.settings import PPOSettings

    with pytest.raises(ValueError, match=r"--model\.ppo\.critic_epochs=0 must be >= 1"):
        PPOSettings(critic_epochs=0)
