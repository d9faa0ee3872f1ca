"""The training system: PPO, GRPO and VRPO on one Lightning code path, with manual optimization.

One ``training_step`` consumes one rollout batch and runs, in order:

1. rollout: sample responses; log-probs of the policy and the reference, the guide's entropy/surprisal (from the
   reference pass when the guide is the reference) and the critic's values, all without gradients
   (:mod:`vrpo_pl.rollout`, :mod:`vrpo_pl.passes`);
2. score: the reward function's training reward and, beside it, the gold reward (:mod:`vrpo_pl.scoring`);
3. shape: the KL penalty, per token in the reward (PPO/VRPO) or in the loss (GRPO);
4. advantages: GAE + whitening (PPO/VRPO) or group normalization (GRPO) (:mod:`vrpo_pl.advantages`);
5. update: PPO epochs over shuffled mini-batches, the policy and the critic with their own optimizers, gradient
   accumulation over micro-batches, gradient averaging over ranks and clipping (:mod:`vrpo_pl.update`, with
   :mod:`vrpo_pl.losses` and :mod:`vrpo_pl.distributed`);
6. log: the metrics, each reduced as it declares (:mod:`vrpo_pl.metrics`), at step = rollout batches done.

Beside the phases: greedy validation and the key-token view read their rollouts through :mod:`vrpo_pl.validation`,
and what a checkpoint holds beside the weights is :mod:`vrpo_pl.checkpoint`'s.

How VRPO departs from PPO (Zhu et al., arXiv 2508.03058): only the critic changes. Its head is a variational
information bottleneck (z ~ N(mu, sigma^2), KL to N(0, I) weighted by beta) and an auxiliary loss ties z to a
frozen LM's entropy and surprisal. Our choices where the paper is silent: d_z=64, beta=1e-4, lambda_aux=0.03,
the ``predict``/``weight`` forms of the auxiliary loss, key tokens by a 0.8 quantile of entropy, and the head's
scale (:class:`~vrpo_pl.models.ValueHead`).

Counting: ``trainer.global_step`` equals the number of rollout batches done (one per ``training_step``), so
``--trainer.max_steps N`` trains N rollout batches and checkpoints' ``every_n_train_steps`` count rollouts.

Contracts with the callbacks: the KL controller reads :attr:`RLSystem.last_rollout_stats` after each rollout batch
and sets :attr:`RLSystem.kl_coef`; ``FrozenLMTargets`` is found in :meth:`RLSystem.setup` and gives the guide's
raw targets per slice (``raw_targets``) and their standardized form and key-token marks per rollout batch
(``finalize``). Observers (the throughput benchmark) read :attr:`RLSystem.phase_seconds` (the last step's phase
times, also logged as ``perf/*``) and :attr:`RLSystem.last_rollout`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from vrpo_pl import checkpoint, distributed, validation
from vrpo_pl import losses as L
from vrpo_pl.advantages import RunningMoments, compute_advantages
from vrpo_pl.compile import prepare_compiled_blocks
from vrpo_pl.critic import ValueModel
from vrpo_pl.fused import adapter_pairs
from vrpo_pl.lora import LoRASpec
from vrpo_pl.metrics import PhaseTimer, rollout_metrics, sample_records
from vrpo_pl.models import (
    DType,
    LMSource,
    all_trained_by_lora,
    build_models,
    resolve_dtype,
    torch_dtype,
    with_pad_token,
)
from vrpo_pl.passes import GuideFn, reference_guide, rows_per_forward, score_rollout
from vrpo_pl.rewards.base import RewardFunction, call_reward, needs_groups
from vrpo_pl.rollout import GenerationSettings, PromptSettings, Rollout, decode_completions, sample_rollout
from vrpo_pl.sampling import make_sampler
from vrpo_pl.scoring import count_skipped, score_batch, training_scores
from vrpo_pl.settings import (
    CriticSettings,
    KLSettings,
    OptimSettings,
    PPOSettings,
    RewardSettings,
    check_algorithm_settings,
    check_batch_geometry,
    resolve_algorithm_defaults,
)
from vrpo_pl.update import PPOUpdate

Algorithm = Literal["ppo", "grpo", "vrpo"]


class RLSystem(pl.LightningModule):
    """Policy, value model and frozen models for PPO/GRPO/VRPO; see the module docstring for the phases."""

    def __init__(
        self,
        policy: LMSource,
        reward: RewardFunction,
        algorithm: Algorithm = "vrpo",
        critic_backbone: LMSource | None = None,
        dtype: DType = "auto",
        lora: LoRASpec | None = None,
        critic_lora: LoRASpec | None = None,
        prompt: PromptSettings = PromptSettings(),
        generation: GenerationSettings = GenerationSettings(),
        ppo: PPOSettings = PPOSettings(),
        optim: OptimSettings = OptimSettings(),
        kl: KLSettings = KLSettings(),
        rewards: RewardSettings = RewardSettings(),
        critic: CriticSettings = CriticSettings(),
        validate_at_start: bool = True,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        """
        Args:
            policy: where the policy (and by default the reference, guide and critic body) comes from:
                ``vrpo_pl.models.PretrainedLM`` (a local HF directory), ``vrpo_pl.models.SmolLM2`` or
                ``vrpo_pl.models.TinyLM``.
            reward: the training reward (``class_path``), e.g. a noise model around a verifier; its gold signal
                is logged beside it.
            algorithm: ``ppo`` (plain critic), ``grpo`` (no critic, group-normalized rewards) or ``vrpo`` (VIB
                critic with the frozen-LM auxiliary loss).
            critic_backbone: the critic's body; None copies the policy's initial weights (a reward model's
                directory is the other common choice).
            dtype: weights' dtype: ``auto`` (bfloat16 base weights when every trained model uses LoRA and the CPU
                or GPU has bf16 matrix units, else float32; :func:`vrpo_pl.models.resolve_dtype`), ``float32`` or
                ``bfloat16``. Adapters, the value head and optimizer states are float32 in every case.
            lora: LoRA adapters on the policy; the reference is then the adapter-disabled policy (no second
                copy of the weights). None: full fine-tuning with a frozen reference copy.
            critic_lora: LoRA adapters on the critic's body (its head always trains fully).
            prompt: prompt formatting and length limits.
            generation: sampling settings.
            ppo: update settings (epochs, batch sizes, clipping, advantages).
            optim: optimizers (learning rates, clipping).
            kl: KL penalty to the reference.
            rewards: training-reward normalization and NaN handling.
            critic: value head, VIB and auxiliary loss.
            validate_at_start: run the greedy validation once before the first rollout (logged at step 0).
            seed: seed of the update's shuffling and of the VIB's sampling.
            compile: ``torch.compile`` the decoder layers' blocks for the update's passes (:mod:`vrpo_pl.compile`):
                VRPO's rollout batch 1.04-1.07x faster on 2 Xeon cores (its critic's update 1.1-1.2x, GRPO
                unchanged), after 33-36 s of compilation on a cold cache (``docs/performance.md``); the decode loop
                and the frozen passes stay eager. Not with FSDP2.
        """
        super().__init__()
        self.automatic_optimization = False
        # Frozen weights are rebuilt from their sources; checkpoints hold only what trains (see on_save_checkpoint).
        self.strict_loading = False
        self.policy_source, self.critic_source, self.reward = policy, critic_backbone, reward
        self.algorithm, self.dtype_name = algorithm, dtype
        self.lora_spec, self.critic_lora_spec = lora, critic_lora
        # Defaults are shared instances: keep a private copy of each settings group.
        self.prompt, self.generation = dataclasses.replace(prompt), dataclasses.replace(generation)
        self.ppo, self.optim, self.kl = dataclasses.replace(ppo), dataclasses.replace(optim), dataclasses.replace(kl)
        self.reward_settings, self.critic_settings = dataclasses.replace(rewards), dataclasses.replace(critic)
        self.validate_at_start, self.seed, self.compile_blocks = validate_at_start, seed, compile
        resolve_algorithm_defaults(algorithm, self.critic_settings, self.kl)
        check_algorithm_settings(algorithm, self.critic_settings, has_critic_model=critic_backbone is not None
                                 or critic_lora is not None)
        if not isinstance(reward, RewardFunction):
            raise TypeError(f"--model.reward must be a vrpo_pl.rewards.RewardFunction (class_path + init_args), got "
                            f"{type(reward).__name__}")
        self.kl_coef = float(self.kl.coef)
        self.reward_moments = RunningMoments()
        self.tokenizer = with_pad_token(self.policy_source.tokenizer())
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the policy's tokenizer has no EOS token; responses could never end")
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.critic: ValueModel | None = None
        self.rollouts = 0
        self._shuffle_gen = torch.Generator().manual_seed(seed)
        self._vib_gen: torch.Generator | None = None
        self._vib_noise: Tensor | None = None
        self._nonfinite_in_row = {"policy": 0, "critic": 0}
        self.guide_callback = None
        self.timer = PhaseTimer()
        self.sampler = make_sampler(self.generation.backend)
        self.last_rollout: Rollout | None = None
        self.last_rollout_stats: dict[str, float] | None = None
        self.last_samples: list[dict[str, Any]] = []
        self.val_accuracy, self.val_length = MeanMetric(), MeanMetric()
        self._val_outcomes: list[dict[str, Any]] = []
        self.last_validation: dict[str, Any] | None = None  # this rank's per-question results of the last validation

    # ------------------------------------------------------------------ set-up
    @property
    def uses_critic(self) -> bool:
        return self.algorithm != "grpo"

    @property
    def needs_guide(self) -> bool:
        return self.uses_critic and self.critic_settings.aux != "none"

    @property
    def model_dtype(self) -> torch.dtype:
        """The weights' dtype, ``--model.dtype`` with ``auto`` resolved for the training device."""
        device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        lora_everywhere = all_trained_by_lora(self.algorithm, self.lora_spec, self.critic_lora_spec)
        return torch_dtype(resolve_dtype(self.dtype_name, lora_everywhere, device))

    @property
    def sampler_logprobs(self) -> bool:
        """``--model.generation.sampler_logprobs`` resolved: by default only when the policy computes in float32
        (in bf16 the sampler's cached decode rounds differently from the update's full pass)."""
        if self.generation.sampler_logprobs is not None:
            return self.generation.sampler_logprobs
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        return self.model_dtype == torch.float32 and not precision.startswith("bf16")

    @property
    def shares_prompts(self) -> bool:
        """``--model.ppo.share_prompt_prefix``, except under FSDP2: a shared pass calls the model twice and a plain
        one once, and a sharded model's every call is a collective that all ranks must make alike (ranks whose
        micro-batches differ in repeated prompts would wait on each other)."""
        return self.ppo.share_prompt_prefix and self.device_mesh is None

    @property
    def phase_seconds(self) -> dict[str, float]:
        """Seconds of each phase of the last training step (``rollout``, ``generation``, ``score``, ``update``,
        ``update_policy``, ``update_critic``, ``update_fused``: the phases that ran)."""
        return dict(self.timer.seconds)

    def configure_model(self) -> None:
        """Builds the policy, the reference (only without LoRA) and the critic once, inside the strategy; under
        FSDP2 (a ``ModelParallelStrategy``) it then shards the trainable models (:mod:`vrpo_pl.distributed`)."""
        if self.policy is not None:
            return
        self.policy, self.reference, self.critic = build_models(
            self.policy_source, self.model_dtype, self.lora_spec, critic=self.critic_settings if self.uses_critic
            else None, critic_source=self.critic_source, critic_lora=self.critic_lora_spec,
            # One copy of the base weights for policy and critic, except under FSDP2 (each model is sharded alone).
            share_base=self.device_mesh is None)
        if self.device_mesh is not None:
            if self.compile_blocks:
                raise ValueError("--model.compile does not run under FSDP2 (--trainer.strategy); turn one of them off")
            distributed.shard_trainable_models(self.device_mesh, self.policy, self.critic)
        if self.compile_blocks:
            prepare_compiled_blocks(self.policy, self.critic)

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise ValueError(
                f"--trainer.precision {precision} needs a gradient scaler, which this manual-optimization loop does "
                "not run; use bf16-mixed, bf16-true or 32-true"
            )
        if self.needs_guide:
            from vrpo_pl.callbacks import FrozenLMTargets

            found = [cb for cb in self.trainer.callbacks if isinstance(cb, FrozenLMTargets)]
            if not found:
                raise ValueError(
                    f"--model.critic.aux {self.critic_settings.aux} needs the callback "
                    "vrpo_pl.callbacks.FrozenLMTargets: add it under trainer.callbacks (configs/vrpo.yaml does), "
                    "or set --model.critic.aux none"
                )
            self.guide_callback = found[0]
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "rollout_batch_size"):
            check_batch_geometry(self.algorithm, self.ppo.mini_batch_size, datamodule.rollout_batch_size,
                                 getattr(datamodule, "samples_per_prompt", None), type(self.reward).__name__,
                                 reward_needs_groups=needs_groups(self.reward))
        self.reward.to(self.device)

    def configure_optimizers(self):
        o = self.optim
        policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizers = [torch.optim.AdamW(policy_params, lr=o.policy_lr, weight_decay=o.weight_decay)]
        if self.critic is not None:
            critic_params = [p for p in self.critic.parameters() if p.requires_grad]
            optimizers.append(torch.optim.AdamW(critic_params, lr=o.critic_lr, weight_decay=o.weight_decay))
        return optimizers

    # --------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.timer.reset()
        start = time.perf_counter()
        # 1. Rollout: sample and score every token with the frozen and current models, no gradients.
        with self.timer("rollout"):
            rollout = self._rollout(batch)
        self.last_rollout = rollout
        # 2. Score: training reward (maybe noisy) and gold reward (:mod:`vrpo_pl.scoring`).
        with self.timer("score"):
            scored = score_batch(self.reward, self.tokenizer, batch, rollout, where=f"rollout batch {self.rollouts}",
                                 on_nonfinite=self.reward_settings.on_nonfinite, device=self.device, warn=self.print)
        # A non-finite reward: nothing trains on this batch; too many in a row stop the run.
        count_skipped(self._nonfinite_in_row, scored.train is None, self.reward, self.ppo.max_nonfinite_updates,
                      self.rollouts)
        if scored.train is None:
            self._count_rollout()
            self._log_metrics({"reward/skipped_batches": 1.0})
            return
        train_scores, gold = scored.train, scored.gold
        rollout.scores = training_scores(train_scores, self.reward_moments, self.reward_settings)
        # 3. Shape: per-token KL to the reference.
        kl = L.kl_estimate(rollout.logp, rollout.ref_logp, self.kl.estimator) * rollout.mask
        # 4. Advantages.
        self._advantages(rollout, kl)
        # 5. PPO update: epochs over mini-batches, policy then critic.
        with self.timer("update"):
            update_metrics = self._ppo_update(rollout)
            self.sampler.update(self.policy)  # a backend with its own weights syncs them before the next rollout
        # 6. Log.
        self._count_rollout()
        measured = rollout_metrics(rollout, kl, train_scores, gold, kl_coef=self.kl_coef, rollouts=self.rollouts)
        metrics = {**measured.compute(distributed.all_reduce_sum), **scored.metrics, **update_metrics}
        world = self.trainer.world_size
        metrics.update({f"perf/{name}_s": seconds for name, seconds in self.timer.seconds.items()})
        metrics["perf/samples_per_s"] = rollout.size * world / (time.perf_counter() - start)
        self.last_rollout_stats = {"kl": float(metrics["kl/ref"]), "n_samples": rollout.size * world}
        self.last_samples = sample_records(batch, scored.texts, rollout, train_scores, gold)
        self._log_metrics(metrics)
        self.log_dict({"reward": float(metrics["reward/train"]), "kl": float(metrics["kl/ref"])}, prog_bar=True,
                      logger=False, on_step=True, on_epoch=False, batch_size=rollout.size)

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        """Writes metrics to every logger at step = rollout batches done (0 = before training).

        Lightning's own step for ``self.log`` lags the rollout counter by one inside ``training_step``; logging
        directly keeps training and validation curves on the same x-axis. Values are already reduced over ranks.
        """
        metrics = {k: float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.rollouts)

    @property
    def fused_pairs(self) -> list | None:
        """The policy's and the critic's LoRA linears paired for fused passes (``--model.ppo.fuse_update`` with
        ``pack_rows``, :func:`vrpo_pl.fused.adapter_pairs`): the rollout's old log-probs and values, and the update's
        policy and critic passes, then share one call per slice. None where the two models cannot share a call."""
        if not (self.ppo.fuse_update and self.ppo.pack_rows):
            return None
        return adapter_pairs(self.policy, self.critic)

    def _score(self, r: Rollout, chunk: int, guide: GuideFn | None) -> None:
        """The rollout's no-gradient passes (:func:`vrpo_pl.passes.score_rollout`) in slices of ``chunk`` rows, with
        the run's prompt sharing, packing and fused passes."""
        score_rollout(r, self.policy, self.reference, self.critic, temperature=self.generation.temperature,
                      chunk=chunk, guide=guide, share_prefix=self.shares_prompts, pack=self.ppo.pack_rows,
                      fused_pairs=self.fused_pairs, fused_chunk=self.ppo.micro_rows)

    def _count_rollout(self) -> None:
        """Advances the rollout counter and makes ``trainer.global_step`` follow it.

        Lightning counts every optimizer step as a global step under manual optimization (Lightning issue
        #17958), which would make ``max_steps`` depend on epochs and mini-batches. The inner steps call the raw
        optimizers, and this adds exactly one step per rollout batch to the loop's counter.
        """
        self.rollouts += 1
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _rollout(self, batch: dict[str, Any]) -> Rollout:
        reuse = self.sampler_logprobs
        with self.timer("generation"):
            rollout = sample_rollout(self.sampler, self.policy, self.tokenizer, list(batch["prompt"]), self.prompt,
                                     self.generation, self.device, with_logprobs=reuse)
        rollout.group = torch.as_tensor(batch["group"], device=self.device)
        guide = self.guide_callback.raw_targets if self.guide_callback is not None else None
        p = self.ppo
        budget = p.max_tokens_per_forward if self.device_mesh is None else None  # FSDP2: the same calls on every rank
        chunk = rows_per_forward(rollout.size, rollout.sequences.shape[1], budget, default=p.micro_rows)
        self._score(rollout, chunk, guide)
        if rollout.guide_raw is not None:
            targets = self.guide_callback.finalize(rollout.guide_raw, rollout.mask)
            rollout.guide_targets, rollout.key = targets.standardized, targets.key
        return rollout

    def _advantages(self, r: Rollout, kl: Tensor) -> None:
        p = self.ppo
        r.advantages, r.returns = compute_advantages(
            "gae" if self.uses_critic else "group", r.scores, kl, r.mask, kl_coef=self.kl_coef,
            kl_in_reward=self.kl.placement == "reward", values=r.values, group=r.group, gamma=p.gamma, lam=p.lam,
            whiten=p.whiten_advantages, scale_by_std=p.grpo_scale_by_std, reduce=distributed.all_reduce_sum)
        normalizer = self.critic.head.return_norm if self.critic is not None else None
        if normalizer is not None:
            normalizer.update_masked(r.returns, r.mask, reduce=distributed.all_reduce_sum)

    # ----------------------------------------------------------------- update
    def _ppo_update(self, r: Rollout) -> dict[str, float]:
        """Phase 5 (:class:`vrpo_pl.update.PPOUpdate`) on this system's models, settings and update state."""
        optimizers = self.optimizers(use_pl_optimizer=True)
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        vib = self.critic is not None and bool(self.critic_settings.vib)
        update = PPOUpdate(
            self.policy, self.critic, [o.optimizer for o in optimizers], self.ppo, self.optim, self.kl,
            self.critic_settings, temperature=self.generation.temperature, kl_coef=self.kl_coef,
            rollouts=self.rollouts, shares_prompts=self.shares_prompts, packs_rows=self.ppo.pack_rows,
            fused_pairs=self.fused_pairs,
            shuffle_gen=self._shuffle_gen,
            vib_gen=self._vib_generator() if vib else None, nonfinite_in_row=self._nonfinite_in_row,
            wrapped_model=self.trainer.model, world_size=self.trainer.world_size, device=self.device,
            backward=self.manual_backward, timer=self.timer, warn=self.print)
        return update.run(r)

    def _vib_generator(self) -> torch.Generator:
        """The VIB's sampling generator, created on the training device at first use (seed + 1)."""
        if self._vib_gen is None or self._vib_gen.device != self.device:
            self._vib_gen = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        return self._vib_gen

    # ------------------------------------------------------------- validation
    @torch.no_grad()
    def _greedy(self, batch: dict[str, Any], where: str) -> tuple[Rollout, Tensor | None, list[str]]:
        """Greedy responses to a batch of prompts, their gold rewards ((B,), or None without a verifier) and texts."""
        rollout = sample_rollout(self.sampler, self.policy, self.tokenizer, list(batch["prompt"]), self.prompt,
                                 self.generation, self.device, greedy=True)
        texts, completions = decode_completions(self.tokenizer, batch, rollout)
        gold = call_reward(self.reward, completions, where, gold_only=True)
        return rollout, None if gold is None else gold.to(self.device), texts

    @torch.no_grad()
    def token_view(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Per-token quantities of greedy responses, for the key-token view (``KeyTokenView`` callback); the
        records are :func:`vrpo_pl.validation.token_view`'s."""
        r, gold, _ = self._greedy(batch, "the key-token view's validation prompts")
        self._score(r, r.size, self.guide_callback.raw_targets if self.guide_callback is not None else reference_guide)
        return validation.token_view(r, gold, batch["prompt"], self.tokenizer, kl_estimator=self.kl.estimator,
                                     kl_coef=self.kl_coef, gamma=self.ppo.gamma, lam=self.ppo.lam)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        r, gold, texts = self._greedy(batch, f"a validation batch after rollout batch {self.rollouts}")
        if gold is not None:
            self.val_accuracy.update(gold)
        self.val_length.update(r.mask.sum(1).float())
        self._val_outcomes += validation.outcome_records(batch, r, gold, texts)

    def on_validation_epoch_end(self) -> None:
        metrics = self._compute_val_metrics()
        # For callbacks (checkpoint monitors, progress bar); TensorBoard gets them at the rollout step below.
        self.log_dict(metrics, logger=False, prog_bar=True)
        self._log_metrics(metrics)

    def _compute_val_metrics(self) -> dict[str, float]:
        """Reduces the validation metrics over batches and ranks, then resets them."""
        metrics = validation.reduce_metrics(self.val_accuracy, self.val_length)
        self.last_validation = {"rollout": self.rollouts, "outcomes": self._val_outcomes}
        self._val_outcomes = []
        return metrics

    def on_train_start(self) -> None:
        if not self.validate_at_start or self.rollouts > 0 or self.trainer.datamodule is None:
            return
        for batch in self.trainer.datamodule.val_dataloader():
            self.validation_step(batch, 0)
        metrics = self._compute_val_metrics()
        self.print(f"validation before training (rollout 0): {metrics}")
        self._log_metrics(metrics)

    # --------------------------------------------------------- checkpointing
    def on_save_checkpoint(self, checkpoint_dict: dict[str, Any]) -> None:
        """Keeps only what trains (frozen weights are rebuilt from their sources) and adds the RL state.

        The ``vrpo`` section (:func:`vrpo_pl.checkpoint.rl_section`) holds the rollout counter, KL coefficient,
        running reward statistics, the reward function's state (its noise generator), the update's shuffling and VIB
        generators, the global RNG states, the non-finite streaks and a fingerprint of the configuration. Lightning
        adds the optimizers, loops, the data module's stream position and the callbacks' states (KL controller,
        guide running moments); the value head's buffers (return statistics) are in the weights.
        """
        checkpoint_dict["state_dict"] = checkpoint.trainable_entries(checkpoint_dict["state_dict"], self)
        checkpoint_dict["vrpo"] = checkpoint.rl_section(
            rollouts=self.rollouts, kl_coef=self.kl_coef, reward_moments=self.reward_moments, reward=self.reward,
            shuffle_gen=self._shuffle_gen, vib_gen=self._vib_gen, nonfinite_in_row=self._nonfinite_in_row,
            fingerprint=self._fingerprint(), device=self.device)

    def on_load_checkpoint(self, checkpoint_dict: dict[str, Any]) -> None:
        """Checks the fingerprint, then restores the RL state saved by :meth:`on_save_checkpoint`."""
        where = str(self._trainer.ckpt_path) if self._trainer is not None and self._trainer.ckpt_path else ""
        # The VIB generator must live where the update will use it; DDP restores before moving the model there.
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        restored = checkpoint.restore_rl_section(
            checkpoint_dict, self._fingerprint(), where, reward_moments=self.reward_moments, reward=self.reward,
            shuffle_gen=self._shuffle_gen, device=device)
        self.rollouts, self.kl_coef = restored.rollouts, restored.kl_coef
        self._nonfinite_in_row = restored.nonfinite_in_row
        if restored.vib_gen is not None:
            self._vib_gen = restored.vib_gen

    def _fingerprint(self) -> dict[str, Any]:
        settings = {"algorithm": self.algorithm, "vib": self.critic_settings.vib, "aux": self.critic_settings.aux,
                    "base": [s.identity() for s in (self.policy_source, self.critic_source) if s is not None]}
        return checkpoint.config_fingerprint(settings, ((n, p) for n, p in self.named_parameters() if p.requires_grad))
