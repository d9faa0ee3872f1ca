"""The training system: PPO, GRPO and VRPO on one Lightning code path, with manual optimization.

One ``training_step`` consumes one rollout batch and runs, in order:

1. rollout: sample responses with the KV cache; log-probs of the policy and the reference, the guide's
   entropy/surprisal (from the reference pass when the guide is the reference) and the critic's values,
   all without gradients;
2. score: the reward function's training reward and, beside it, the gold reward;
3. shape: the KL penalty, per token in the reward (PPO/VRPO) or in the loss (GRPO);
4. advantages: GAE + whitening (PPO/VRPO) or group normalization (GRPO);
5. update: PPO epochs over shuffled mini-batches, the policy and the critic with their own optimizers,
   gradient clipping and accumulation;
6. log: one ``log_dict``.

How VRPO departs from PPO (Zhu et al., arXiv 2508.03058): only the critic changes. Its head is a variational
information bottleneck (z ~ N(mu, sigma^2), KL to N(0, I) weighted by beta) and an auxiliary loss ties z to a
frozen LM's entropy and surprisal. Our choices where the paper is silent: d_z=64, beta=1e-3, lambda_aux=0.1,
the ``predict``/``weight`` forms of the auxiliary loss, key tokens by a 0.8 quantile of entropy.

Counting: ``trainer.global_step`` equals the number of rollout batches done (one per ``training_step``), so
``--trainer.max_steps N`` trains N rollout batches and checkpoints' ``every_n_train_steps`` count rollouts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import MeanMetric

from vrpo_pl import losses as L
from vrpo_pl.advantages import (
    RunningMoments,
    gae_advantages,
    group_normalize,
    masked_mean,
    masked_whiten,
    token_rewards,
)
from vrpo_pl.models import (
    DType,
    LMSource,
    LoRASpec,
    ValueHead,
    ValueModel,
    apply_lora,
    copy_backbone,
    disable_dropout,
    hidden_size_of,
    torch_dtype,
)
from vrpo_pl.rewards.base import Completion, RewardFunction
from vrpo_pl.rollout import (
    GenerationSettings,
    PromptSettings,
    guide_targets,
    position_ids_from_mask,
    response_logits,
    response_logprobs,
    response_mask,
    sample_responses,
    tokenize_prompts,
)
from vrpo_pl.settings import CriticSettings, KLSettings, OptimSettings, PPOSettings, RewardSettings

Algorithm = Literal["ppo", "grpo", "vrpo"]


@dataclasses.dataclass
class Rollout:
    """One rollout batch and everything computed from it. Shapes: B sequences, T = P + A tokens."""

    sequences: Tensor  # (B, T) prompt + response tokens
    attention_mask: Tensor  # (B, T)
    position_ids: Tensor  # (B, T)
    responses: Tensor  # (B, A)
    mask: Tensor  # (B, A) 1.0 on response tokens up to and including EOS
    truncated: Tensor  # (B,) no EOS before max_new_tokens
    logp: Tensor  # (B, A) log pi_old(y_t | s_t)
    ref_logp: Tensor  # (B, A) log pi_ref(y_t | s_t)
    group: Tensor  # (B,) prompt index, for GRPO
    values: Tensor | None = None  # (B, A) V(s_t), z = mu
    guide_raw: Tensor | None = None  # (B, A, 2) guide entropy, surprisal
    guide_targets: Tensor | None = None  # (B, A, 2) standardized
    key: Tensor | None = None  # (B, A) key tokens
    scores: Tensor | None = None  # (B,) training reward after normalization
    advantages: Tensor | None = None  # (B, A)
    returns: Tensor | None = None  # (B, A)

    @property
    def size(self) -> int:
        return self.sequences.shape[0]


class RLSystem(pl.LightningModule):
    """Policy, value model and frozen models for PPO/GRPO/VRPO; see the module docstring for the phases."""

    def __init__(
        self,
        policy: LMSource,
        reward: RewardFunction,
        algorithm: Algorithm = "vrpo",
        critic_backbone: LMSource | None = None,
        dtype: DType = "float32",
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
            dtype: weights' dtype, ``float32`` or ``bfloat16``.
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
        """
        super().__init__()
        self.automatic_optimization = False
        # Frozen weights are rebuilt from their sources; checkpoints hold only what trains (see on_save_checkpoint).
        self.strict_loading = False
        self.policy_source, self.critic_source, self.reward = policy, critic_backbone, reward
        self.algorithm, self.dtype_name = algorithm, dtype
        self.lora_spec, self.critic_lora_spec = lora, critic_lora
        copy = dataclasses.replace  # defaults are shared instances: keep a private copy of each
        self.prompt, self.generation, self.ppo = copy(prompt), copy(generation), copy(ppo)
        self.optim, self.kl = copy(optim), copy(kl)
        self.reward_settings, self.critic_settings = copy(rewards), copy(critic)
        self.validate_at_start, self.seed = validate_at_start, seed
        self._resolve_algorithm()
        self._validate_settings()
        self.kl_coef = float(self.kl.coef)
        self.reward_moments = RunningMoments()
        self.tokenizer = self._load_tokenizer()
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.critic: ValueModel | None = None
        self.rollouts = 0
        self._shuffle_gen = torch.Generator().manual_seed(seed)
        self._vib_gen: torch.Generator | None = None
        self._nonfinite_in_row = {"policy": 0, "critic": 0}
        self.guide_callback = None
        self.last_rollout_stats: dict[str, float] | None = None
        self.last_samples: list[dict[str, Any]] = []
        self._reward_metrics: dict[str, float] = {}
        self.val_accuracy, self.val_length = MeanMetric(), MeanMetric()

    # ------------------------------------------------------------------ set-up
    def _resolve_algorithm(self) -> None:
        """Fills the settings that default by algorithm (see each setting's docstring)."""
        c, k = self.critic_settings, self.kl
        if c.vib is None:
            c.vib = self.algorithm == "vrpo"
        if c.aux is None:
            c.aux = "predict" if self.algorithm == "vrpo" else "none"
        if k.placement is None:
            k.placement = "loss" if self.algorithm == "grpo" else "reward"
        if k.estimator is None:
            k.estimator = "k3" if k.placement == "loss" else "k1"

    def _validate_settings(self) -> None:
        p, c = self.ppo, self.critic_settings
        checks = [
            (self.algorithm in ("ppo", "grpo", "vrpo"), f"--model.algorithm={self.algorithm!r}: use ppo, grpo or vrpo"),
            (p.epochs >= 1, f"--model.ppo.epochs={p.epochs} must be >= 1"),
            (p.mini_batch_size >= 1, f"--model.ppo.mini_batch_size={p.mini_batch_size} must be >= 1"),
            (p.micro_batch_size is None or (p.micro_batch_size >= 1 and p.mini_batch_size % p.micro_batch_size == 0),
             (f"--model.ppo.micro_batch_size={p.micro_batch_size} must divide --model.ppo.mini_batch_size="
              f"{p.mini_batch_size}")),
            (0 < p.clip_eps < 1, f"--model.ppo.clip_eps={p.clip_eps} must be in (0, 1)"),
            (0 <= p.lam <= 1 and 0 < p.gamma <= 1, "--model.ppo.lam must be in [0, 1] and --model.ppo.gamma in (0, 1]"),
            (self.generation.max_new_tokens >= 1, "--model.generation.max_new_tokens must be >= 1"),
            (self.generation.temperature > 0, "--model.generation.temperature must be > 0 (validation is greedy)"),
            (0 < self.generation.top_p <= 1, "--model.generation.top_p must be in (0, 1]"),
            (self.kl.coef >= 0, f"--model.kl.coef={self.kl.coef} must be >= 0"),
            (c.beta >= 0 and c.aux_coef >= 0, "--model.critic.beta and --model.critic.aux_coef must be >= 0"),
            (c.latent_dim >= 1, "--model.critic.latent_dim must be >= 1"),
            (not (self.algorithm == "grpo" and (c.vib or c.aux != "none")),
             "--model.algorithm grpo has no critic: --model.critic.vib and --model.critic.aux do not apply"),
            (not (self.algorithm == "grpo" and (self.critic_source is not None or self.critic_lora_spec is not None)),
             "--model.algorithm grpo has no critic: drop --model.critic_backbone and --model.critic_lora"),
            (self.optim.policy_lr > 0 and self.optim.critic_lr > 0, "--model.optim learning rates must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if not isinstance(self.reward, RewardFunction):
            raise TypeError(
                f"--model.reward must be a vrpo_pl.rewards.RewardFunction (class_path + init_args), got "
                f"{type(self.reward).__name__}"
            )

    @property
    def uses_critic(self) -> bool:
        return self.algorithm != "grpo"

    @property
    def needs_guide(self) -> bool:
        return self.uses_critic and self.critic_settings.aux != "none"

    @property
    def model_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    def _load_tokenizer(self):
        tokenizer = self.policy_source.tokenizer()
        if tokenizer.pad_token_id is None:
            # Padding positions are always masked, so any id works; EOS is the conventional choice.
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            raise ValueError("the policy's tokenizer has no EOS token; responses could never end")
        return tokenizer

    def configure_model(self) -> None:
        """Builds the policy, the reference (only without LoRA) and the critic once, inside the strategy.

        Under FSDP2 (``--trainer.strategy fsdp2``, a ``ModelParallelStrategy``) it then shards the trainable models;
        the frozen reference copy stays whole on every process (see :mod:`vrpo_pl.distributed`).
        """
        if self.policy is not None:
            return
        lm = self.policy_source.causal_lm(self.model_dtype)
        disable_dropout(lm)
        body = None
        if self.uses_critic:
            # LoRA on both models: the critic's body shares the policy's frozen base weights (one copy in memory).
            # FSDP2 shards each trainable model separately, so there each keeps its own copy.
            share = self.lora_spec is not None and self.critic_lora_spec is not None and self.device_mesh is None
            body = (self.critic_source.backbone(self.model_dtype) if self.critic_source
                    else copy_backbone(lm, share_weights=share))
            disable_dropout(body)
        if self.lora_spec is not None:
            self.policy = apply_lora(lm, self.lora_spec, causal_lm=True)
        else:
            self.reference = _frozen_copy(lm)
            self.policy = lm
        if body is not None:
            if self.critic_lora_spec is not None:
                body = apply_lora(body, self.critic_lora_spec, causal_lm=False)
            c = self.critic_settings
            head = ValueHead(hidden_size_of(body), vib=bool(c.vib), latent_dim=c.latent_dim,
                             decoder_hidden=c.decoder_hidden, aux_targets=2 if c.aux == "predict" else 0,
                             input_norm=c.input_norm, init_logvar=c.init_logvar, value_samples=c.value_samples,
                             normalize_values=c.normalize_values)
            self.critic = ValueModel(body, head)
        if self.device_mesh is not None:
            self._shard_trainable_models()

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
            self._check_batch_sizes(datamodule.rollout_batch_size, getattr(datamodule, "samples_per_prompt", None))
        self.reward.to(self.device)

    def _check_batch_sizes(self, rollout_batch: int, samples_per_prompt: int | None) -> None:
        mini = self.ppo.mini_batch_size
        if rollout_batch % mini != 0:
            raise ValueError(
                f"--model.ppo.mini_batch_size={mini} must divide the rollout batch B = --data.prompts_per_rollout x "
                f"--data.samples_per_prompt = {rollout_batch}"
            )
        if self.algorithm == "grpo" and samples_per_prompt is not None and samples_per_prompt < 2:
            raise ValueError(
                f"--model.algorithm grpo compares responses to the same prompt: --data.samples_per_prompt="
                f"{samples_per_prompt} must be >= 2"
            )

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
        start = time.perf_counter()
        # 1. Rollout: sample and score every token with the frozen and current models, no gradients.
        rollout = self._rollout(batch)
        rollout_s = time.perf_counter() - start
        # 2. Score: training reward (maybe noisy) and gold reward.
        texts, scores = self._score(batch, rollout)
        score_s = time.perf_counter() - start - rollout_s
        if scores is None:  # a non-finite reward: nothing trains on this batch
            self._count_rollout()
            self._log_metrics({"reward/skipped_batches": 1.0})
            return
        train_scores, gold = scores
        rollout.scores = self._transform_scores(train_scores)
        # 3. Shape: per-token KL to the reference.
        kl = L.kl_estimate(rollout.logp, rollout.ref_logp, self.kl.estimator) * rollout.mask
        # 4. Advantages.
        self._advantages(rollout, kl)
        # 5. PPO update: epochs over mini-batches, policy then critic.
        update_start = time.perf_counter()
        stats = self._ppo_update(rollout)
        update_s = time.perf_counter() - update_start
        # 6. Log.
        self._count_rollout()
        metrics = self._rollout_metrics(rollout, kl, train_scores, gold)
        metrics.update(stats)
        total = time.perf_counter() - start
        world = self.trainer.world_size
        metrics.update({
            "perf/rollout_s": rollout_s, "perf/score_s": score_s, "perf/update_s": update_s,
            "perf/samples_per_s": rollout.size * world / total,
        })
        self.last_rollout_stats = {"kl": float(metrics["kl/ref"]), "n_samples": rollout.size * world}
        self._remember_samples(batch, texts, rollout, train_scores, gold)
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

    @torch.no_grad()
    def _rollout(self, batch: dict[str, Any]) -> Rollout:
        reuse = self.generation.sampler_logprobs
        sequences, attention_mask, position_ids, responses, mask, truncated, *sampler_logp = self._sample(
            batch, greedy=False, with_logprobs=reuse)
        group = torch.as_tensor(batch["group"], device=self.device)
        parts = defaultdict(list)
        chunk = self.ppo.micro_batch_size or self.ppo.mini_batch_size
        for s in range(0, responses.shape[0], chunk):
            sl = slice(s, s + chunk)
            for key, value in self._score_tokens(sequences[sl], attention_mask[sl], position_ids[sl],
                                                 responses[sl], with_policy=not reuse).items():
                parts[key].append(value)
        cat = {key: torch.cat(values) for key, values in parts.items()}
        if reuse:
            cat["logp"] = sampler_logp[0]
        rollout = Rollout(sequences, attention_mask, position_ids, responses, mask, truncated, cat["logp"],
                          cat["ref_logp"], group, values=cat.get("values"))
        if "guide_raw" in cat:
            targets = self.guide_callback.finalize(cat["guide_raw"], mask)
            rollout.guide_raw, rollout.guide_targets, rollout.key = targets.raw, targets.standardized, targets.key
        return rollout

    @torch.no_grad()
    def _sample(self, batch: dict[str, Any], greedy: bool, with_logprobs: bool = False) -> tuple[Tensor, ...]:
        """Formats, tokenizes and answers a batch of prompts with the KV cache.

        Returns:
            ``(sequences, attention_mask, position_ids, responses, mask, truncated)``: (B, T) x 3 for prompt +
            response, (B, A) x 2 for the response tokens and their mask, (B,) for "no EOS before the limit";
            with ``with_logprobs`` a seventh (B, A): the responses' log-probs under the sampler's logits.
        """
        input_ids, prompt_mask = tokenize_prompts(self.tokenizer, list(batch["prompt"]), self.prompt)
        input_ids, prompt_mask = input_ids.to(self.device), prompt_mask.to(self.device)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        out = sample_responses(self.policy, input_ids, prompt_mask, self.generation, eos, pad, greedy=greedy,
                               with_logprobs=with_logprobs)
        responses, logp = out if with_logprobs else (out, None)
        mask, truncated = response_mask(responses, eos)
        sequences = torch.cat([input_ids, responses], dim=1)
        attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
        result = (sequences, attention_mask, position_ids_from_mask(attention_mask), responses, mask, truncated)
        return (*result, logp * mask) if with_logprobs else result

    def _score_tokens(self, sequences: Tensor, attention_mask: Tensor, position_ids: Tensor,
                      responses: Tensor, with_guide: bool = False, with_policy: bool = True) -> dict[str, Tensor]:
        """Old log-probs, reference log-probs, guide targets and values for a slice; each pass runs once.

        ``with_guide`` adds the guide targets even when the critic does not need them (for the key-token view);
        ``with_policy=False`` skips the policy's pass (the sampler's log-probs are used instead).
        """
        num = responses.shape[1]
        temperature = self.generation.temperature
        out = {}
        if with_policy:
            out["logp"] = response_logprobs(
                response_logits(self.policy, sequences, attention_mask, position_ids, num), responses, temperature)
        with self._reference_context() as reference:
            ref_logits = response_logits(reference, sequences, attention_mask, position_ids, num)
        out["ref_logp"] = response_logprobs(ref_logits, responses, temperature)
        if self.guide_callback is not None:
            out["guide_raw"] = self.guide_callback.raw_targets(sequences, attention_mask, position_ids, responses,
                                                               ref_logits)
        elif with_guide:
            out["guide_raw"] = guide_targets(ref_logits, responses)
        del ref_logits
        if self.critic is not None:
            out["values"] = self.critic(sequences, attention_mask, position_ids, num).values
        return out

    @contextmanager
    def _reference_context(self):
        """Yields the reference model: the adapter-disabled policy with LoRA, else the frozen copy."""
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy.disable_adapter():
                yield self.policy

    def _completions(self, batch: dict[str, Any], rollout_responses: Tensor, mask: Tensor,
                     truncated: Tensor) -> tuple[list[str], list[Completion]]:
        lengths = mask.sum(1).long().tolist()
        rows = [rollout_responses[i, :n].tolist() for i, n in enumerate(lengths)]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        answers = batch.get("answer") or [None] * len(texts)
        metadata = batch.get("metadata") or [{} for _ in texts]
        completions = [
            Completion(prompt=p, response=t, answer=a, metadata=m, num_tokens=n, truncated=bool(tr))
            for p, t, a, m, n, tr in zip(
                batch["prompt"], texts, answers, metadata, lengths, truncated.tolist(), strict=True
            )
        ]
        return texts, completions

    def _score(self, batch: dict[str, Any], rollout: Rollout) -> tuple[list[str], tuple[Tensor, Tensor | None] | None]:
        texts, completions = self._completions(batch, rollout.responses, rollout.mask, rollout.truncated)
        with self._reward_errors(f"rollout batch {self.rollouts}", completions):
            result = self.reward.score(completions)
        train = result.train.to(self.device, torch.float32)
        gold = None if result.gold is None else result.gold.to(self.device, torch.float32)
        self._reward_metrics = {f"reward/{k}": float(v) for k, v in result.metrics.items()}
        bad = (~torch.isfinite(train)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            message = (
                f"the reward {type(self.reward).__name__} returned {train[i].item()} for sample {i} of rollout batch "
                f"{self.rollouts} (prompt {completions[i].prompt[:60]!r}, response {completions[i].response[:60]!r}); "
                f"{len(bad)} non-finite in the batch"
            )
            if self.reward_settings.on_nonfinite == "error":
                raise RuntimeError(message + "; stopping (--model.rewards.on_nonfinite error)")
            self.print(f"warning: {message}; skipping this rollout batch (--model.rewards.on_nonfinite skip)")
            return texts, None
        return texts, (train, gold)

    @contextmanager
    def _reward_errors(self, where: str, completions: list[Completion]):
        """Re-raises a reward function's exception with the reward's name, where it happened and the first prompt."""
        try:
            yield
        except Exception as error:
            raise RuntimeError(
                f"the reward {type(self.reward).__name__} raised on {where} "
                f"(first prompt: {completions[0].prompt[:80]!r}): {type(error).__name__}: {error}"
            ) from error

    def _transform_scores(self, scores: Tensor) -> Tensor:
        r = self.reward_settings
        if r.normalize:
            self.reward_moments.update(self._all_gather_flat(scores))
            scores = (scores - self.reward_moments.mean) / max(self.reward_moments.std, 1e-6)
        if r.clip is not None:
            scores = scores.clamp(-r.clip, r.clip)
        return scores

    def _advantages(self, rollout: Rollout, kl: Tensor) -> None:
        mask = rollout.mask
        if self.algorithm == "grpo":
            per_seq = group_normalize(rollout.scores, rollout.group, scale_by_std=self.ppo.grpo_scale_by_std)
            rollout.advantages = per_seq[:, None] * mask
            if self.kl.placement == "reward":
                # KL in the reward for GRPO: subtract each sequence's summed KL penalty before normalizing.
                penalized = rollout.scores - self.kl_coef * kl.sum(1)
                per_seq = group_normalize(penalized, rollout.group, self.ppo.grpo_scale_by_std)
                rollout.advantages = per_seq[:, None] * mask
            return
        kl_in_reward = kl if self.kl.placement == "reward" else torch.zeros_like(kl)
        rewards = token_rewards(rollout.scores, kl_in_reward, mask, self.kl_coef)
        advantages, returns = gae_advantages(rewards, rollout.values, mask, self.ppo.gamma, self.ppo.lam)
        rollout.advantages = self._whiten(advantages, mask) if self.ppo.whiten_advantages else advantages
        rollout.returns = returns
        if self.critic.head.return_norm is not None:
            sums = self._all_reduce_sum(torch.stack([mask.sum(), (returns * mask).sum(), (returns**2 * mask).sum()]))
            self.critic.head.return_norm.update(*sums.double().tolist())

    # ----------------------------------------------------------------- update
    def _ppo_update(self, r: Rollout) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches; returns token-weighted means of the update statistics."""
        optimizers = self.optimizers(use_pl_optimizer=True)
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        train_policy = self.rollouts >= self.ppo.critic_warmup_rollouts
        sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        mini = self.ppo.mini_batch_size
        micro = self.ppo.micro_batch_size or mini
        with self._no_ddp_sync():
            for _ in range(self.ppo.epochs):
                order = torch.randperm(r.size, generator=self._shuffle_gen).to(self.device)
                for start in range(0, r.size, mini):
                    idx = order[start : start + mini]
                    norm = self._normalizers(r.mask[idx])
                    micro_batches = [idx[s : s + micro] for s in range(0, len(idx), micro)]
                    if train_policy:
                        self._optimizer_step("policy", optimizers[0], self.policy, micro_batches, r, norm, sums)
                    if self.critic is not None:
                        self._optimizer_step("critic", optimizers[1], self.critic, micro_batches, r, norm, sums)
        return self._finalize_stats(sums)

    def _normalizers(self, mask: Tensor) -> dict[str, float]:
        """Token and sequence counts of a mini-batch over all ranks, as the loss denominators.

        Data-parallel gradients are averaged over ranks, so each rank divides by (global count / world size):
        the averaged gradient is then that of the global token mean.
        """
        counts = torch.stack([mask.sum(), torch.tensor(float(mask.shape[0]), device=mask.device)])
        counts = self._all_reduce_sum(counts)
        world = self.trainer.world_size
        return {"num_tokens": float(counts[0]) / world, "num_seqs": float(counts[1]) / world}

    def _optimizer_step(self, name: str, optimizer, model, micro_batches, r: Rollout, norm, sums) -> None:
        loss_fn = self._policy_loss if name == "policy" else self._critic_loss
        finite = True
        for mb in micro_batches:
            loss, stats = loss_fn(r, mb, norm)
            finite = finite and bool(torch.isfinite(loss))
            # Backward runs even on a non-finite loss: under FSDP every rank must run the same number of (collective)
            # backward passes. The step is skipped below instead.
            self.manual_backward(loss)
            if not finite:
                continue
            n = r.mask[mb].sum()
            for key, value in stats.items():
                sums[key] += value.detach() if key.startswith("sum:") else value.detach() * n
            sums[f"_tokens_{name}"] += n
        params = [p for p in model.parameters() if p.requires_grad]
        # Every rank must take the same branch: the gradient all-reduce below is collective.
        finite = bool(self._all_reduce_sum(torch.tensor(float(not finite), device=self.device)) == 0)
        if finite:
            self._sync_gradients(params)
            max_norm = self.optim.policy_max_grad_norm if name == "policy" else self.optim.critic_max_grad_norm
            grad_norm = self._clip_grad_norm(params, max_norm)
            finite = bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.optimizer.step()
            sums[f"{'policy' if name == 'policy' else 'value'}/grad_norm"] += grad_norm.detach()
            sums[f"_steps_{name}"] += 1
            self._nonfinite_in_row[name] = 0
        else:
            # Counted per model: a finite critic step in between must not hide a policy that keeps failing.
            self._nonfinite_in_row[name] += 1
            sums["train/skipped_updates"] += 1
            self.print(f"warning: non-finite {name} loss or gradient at rollout {self.rollouts}; step skipped")
            if self._nonfinite_in_row[name] >= self.ppo.max_nonfinite_updates:
                raise RuntimeError(
                    f"{self._nonfinite_in_row[name]} non-finite updates in a row ({name}) at rollout batch "
                    f"{self.rollouts}; stopping. Lower the learning rates, check the reward's scale, or raise "
                    "--model.ppo.max_nonfinite_updates. Checkpoints already written are intact."
                )
        optimizer.optimizer.zero_grad(set_to_none=True)

    def _policy_loss(self, r: Rollout, mb: Tensor, norm: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        mask = r.mask[mb]
        logits = response_logits(self.policy, r.sequences[mb], r.attention_mask[mb], r.position_ids[mb],
                                 r.responses.shape[1])
        logp_all = torch.log_softmax(logits.float() / self.generation.temperature, dim=-1)
        logp = logp_all.gather(-1, r.responses[mb].unsqueeze(-1)).squeeze(-1)
        per_token, clipped, ratio = L.clipped_policy_loss(logp, r.logp[mb], r.advantages[mb], self.ppo.clip_eps)
        agg = dict(mask=mask, mode=self.ppo.loss_aggregation, **norm)
        loss = L.aggregate(per_token, **agg)
        with torch.set_grad_enabled(self.ppo.entropy_coef > 0):
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        if self.ppo.entropy_coef > 0:
            loss = loss - self.ppo.entropy_coef * L.aggregate(entropy, **agg)
        stats = {"loss/policy": L.aggregate(per_token.detach(), mask)}
        if self.kl.placement == "loss":
            kl = L.kl_estimate(logp, r.ref_logp[mb], self.kl.estimator)
            loss = loss + self.kl_coef * L.aggregate(kl, **agg)
            stats["loss/kl"] = L.aggregate(kl.detach(), mask)
        stats.update({
            "policy/clipfrac": L.aggregate(clipped, mask),
            "policy/approx_kl": L.aggregate(L.kl_estimate(r.logp[mb], logp.detach(), "k3"), mask),
            "policy/entropy": L.aggregate(entropy.detach(), mask),
            "policy/ratio_mean": L.aggregate(ratio.detach(), mask),
        })
        return loss, stats

    def _critic_loss(self, r: Rollout, mb: Tensor, norm: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        c, mask = self.critic_settings, r.mask[mb]
        out = self.critic(r.sequences[mb], r.attention_mask[mb], r.position_ids[mb], r.responses.shape[1],
                          sample=bool(c.vib), generator=self._vib_generator())
        unit = self.critic.head.normalize  # the value loss's units (standardized returns with normalize_values)
        per_token, clipped = L.clipped_value_loss(unit(out.values), unit(r.values[mb]), unit(r.returns[mb]),
                                                  self.ppo.value_clip)
        if c.aux == "weight":
            per_token = per_token * L.key_token_weights(r.key[mb], c.key_alpha)
        agg = dict(mask=mask, mode=self.ppo.loss_aggregation, **norm)
        loss = L.aggregate(per_token, **agg)
        stats = {"loss/value": L.aggregate(per_token.detach(), mask), "value/clipfrac": L.aggregate(clipped, mask)}
        if c.vib:
            kl = L.vib_kl(out.mu, out.logvar)
            loss = loss + self._beta() * L.aggregate(kl, **agg)
            stats["loss/vib_kl"] = L.aggregate(kl.detach(), mask)
            stats["vib/sigma"] = L.aggregate(torch.exp(0.5 * out.logvar.detach()).mean(-1), mask)
        if c.aux == "predict":
            weight = r.key[mb] if c.aux_key_only else None
            aux = L.aux_predict_loss(out.aux, r.guide_targets[mb], weight)
            loss = loss + c.aux_coef * L.aggregate(aux, **agg)
            stats["loss/aux"] = L.aggregate(aux.detach(), mask)
            # Raw moments ("sum:" keys are added, not token-weighted), so the correlation is computed once over
            # every token of the update, independent of the micro-batch size.
            valid = mask.bool()
            for k, name in enumerate(("entropy", "surprisal")):
                x, y = out.aux.detach()[..., k][valid], r.guide_targets[mb][..., k][valid]
                for moment, value in (("x", x), ("y", y), ("xx", x * x), ("yy", y * y), ("xy", x * y)):
                    stats[f"sum:aux/corr_{name}/{moment}"] = value.sum()
        elif c.aux == "weight":
            stats["loss/aux"] = L.aggregate((per_token / L.key_token_weights(r.key[mb], c.key_alpha)).detach(), mask)
        return loss, stats

    def _vib_generator(self) -> torch.Generator:
        if self._vib_gen is None or self._vib_gen.device != self.device:
            self._vib_gen = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        return self._vib_gen

    def _whiten(self, x: Tensor, mask: Tensor) -> Tensor:
        """Advantage whitening over the global batch: mean and variance over every rank's response tokens."""
        if self.trainer.world_size == 1:
            return masked_whiten(x, mask)
        moments = self._all_reduce_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
        n = moments[2].clamp(min=2)
        mean = moments[0] / n
        var = (moments[1] / n - mean**2).clamp(min=0) * n / (n - 1)
        return (x - mean) * torch.rsqrt(var + 1e-8) * mask

    def _beta(self) -> float:
        c = self.critic_settings
        if c.beta_warmup_rollouts <= 0:
            return c.beta
        return c.beta * min(1.0, self.rollouts / c.beta_warmup_rollouts)

    def _finalize_stats(self, sums: dict[str, Tensor]) -> dict[str, float]:
        keys = sorted(sums)
        if not keys:
            return {}
        reduced = dict(zip(keys, self._all_reduce_sum(torch.stack([sums[k] for k in keys])).tolist(), strict=True))
        out = {}
        for key, value in reduced.items():
            if key.startswith(("_", "sum:")):
                continue
            if key.endswith("grad_norm"):
                name = "policy" if key.startswith("policy") else "critic"
                out[key] = value / max(reduced.get(f"_steps_{name}", 0.0), 1.0)
            elif key == "train/skipped_updates":
                out[key] = value
            else:
                critic_keys = ("loss/value", "value/", "loss/vib", "vib/", "loss/aux")
                name = "critic" if key.startswith(critic_keys) else "policy"
                out[key] = value / max(reduced.get(f"_tokens_{name}", 0.0), 1.0)
        for name in ("entropy", "surprisal"):
            if f"sum:aux/corr_{name}/x" in reduced:
                m = {k: reduced[f"sum:aux/corr_{name}/{k}"] for k in ("x", "y", "xx", "yy", "xy")}
                out[f"aux/corr_{name}"] = L.correlation_from_sums(m, reduced["_tokens_critic"])
        return out

    # ---------------------------------------------------------------- metrics
    def _rollout_metrics(self, r: Rollout, kl: Tensor, train: Tensor, gold: Tensor | None) -> dict[str, float]:
        mask = r.mask
        lengths = mask.sum(1)
        sums = {
            "n": torch.tensor(float(r.size), device=self.device), "reward/train": train.sum(),
            "response/length": lengths.sum(), "response/truncated_frac": r.truncated.float().sum(),
            "kl/ref": kl.sum(), "tokens": mask.sum(),
        }
        if gold is not None:
            sums["reward/gold"] = gold.sum()
        if r.values is not None:
            sums["value/mean"] = (r.values * mask).sum()
            error = (r.returns - r.values) * mask
            # Moments for the explained variance over the whole batch on all ranks.
            sums.update({"_ev_r": (r.returns * mask).sum(), "_ev_rr": (r.returns**2 * mask).sum(),
                         "_ev_e": error.sum(), "_ev_ee": (error**2).sum()})
            # The same at two positions: the first response token (V sees the prompt only) and the last one (V has
            # seen the whole response but its final token): where the critic has information.
            last = (lengths.long() - 1).clamp(min=0)[:, None]
            for name, pos in (("first", torch.zeros_like(last)), ("last", last)):
                ret, err = r.returns.gather(1, pos), error.gather(1, pos)
                sums.update({f"_ev{name}_r": ret.sum(), f"_ev{name}_rr": (ret**2).sum(), f"_ev{name}_e": err.sum(),
                             f"_ev{name}_ee": (err**2).sum()})
        if r.key is not None:
            abs_adv = r.advantages.abs()
            sums["adv/abs_key"] = (abs_adv * r.key).sum()
            sums["_key_tokens"] = r.key.sum()
            sums["adv/abs_other"] = (abs_adv * (mask - r.key)).sum()
        keys = sorted(sums)
        reduced = self._all_reduce_sum(torch.stack([sums[k].float() for k in keys])).tolist()
        total = dict(zip(keys, reduced, strict=True))
        n, tokens = total["n"], total["tokens"]
        out = {"reward/train": total["reward/train"] / n, "response/length": total["response/length"] / n,
               "response/truncated_frac": total["response/truncated_frac"] / n,
               "kl/ref": total["kl/ref"] / n, "kl/coef": self.kl_coef, "rollouts": float(self.rollouts)}
        if "reward/gold" in total:
            out["reward/gold"] = total["reward/gold"] / n
        if "value/mean" in total:
            out["value/mean"] = total["value/mean"] / tokens
            out["value/explained_variance"] = L.explained_variance_from_sums(
                total["_ev_r"], total["_ev_rr"], total["_ev_e"], total["_ev_ee"], tokens)
            for name in ("first", "last"):
                out[f"value/explained_variance_{name}"] = L.explained_variance_from_sums(
                    *(total[f"_ev{name}_{k}"] for k in ("r", "rr", "e", "ee")), n)
        if "adv/abs_key" in total:
            out["adv/abs_key"] = total["adv/abs_key"] / max(total["_key_tokens"], 1.0)
            out["adv/abs_other"] = total["adv/abs_other"] / max(tokens - total["_key_tokens"], 1.0)
        out.update(self._reward_metrics)
        return out

    def _remember_samples(self, batch, texts, r: Rollout, train: Tensor, gold: Tensor | None, n: int = 8) -> None:
        adv = masked_mean(r.advantages, r.mask, dim=1)
        self.last_samples = [
            {"prompt": batch["prompt"][i], "response": texts[i], "answer": (batch.get("answer") or [None] * r.size)[i],
             "reward_train": float(train[i]), "reward_gold": None if gold is None else float(gold[i]),
             "advantage": float(adv[i])}
            for i in range(min(n, r.size))
        ]

    # ------------------------------------------------------------- validation
    @torch.no_grad()
    def _evaluate(self, batch: dict[str, Any]) -> tuple[Tensor | None, Tensor]:
        """Greedy responses to a validation batch: (gold rewards (B,) or None, response lengths (B,))."""
        _, _, _, responses, mask, truncated = self._sample(batch, greedy=True)
        _, completions = self._completions(batch, responses, mask, truncated)
        with self._reward_errors(f"a validation batch after rollout batch {self.rollouts}", completions):
            gold = self.reward.gold_score(completions)
        return (None if gold is None else gold.to(self.device, torch.float32)), mask.sum(1)

    @torch.no_grad()
    def token_view(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Per-token quantities of greedy responses, for the key-token view (``KeyTokenView`` callback).

        Returns one dict per prompt: prompt, tokens (decoded one by one), gold reward, and per-token lists of
        advantage (GAE against the gold reward with the KL penalty, not whitened; None without a critic), value
        (None without a critic), guide entropy and surprisal.
        """
        sequences, attention_mask, position_ids, responses, mask, truncated = self._sample(batch, greedy=True)
        parts = self._score_tokens(sequences, attention_mask, position_ids, responses, with_guide=True)
        _, completions = self._completions(batch, responses, mask, truncated)
        with self._reward_errors("the key-token view's validation prompts", completions):
            gold = self.reward.gold_score(completions)
        gold = torch.zeros(len(completions)) if gold is None else gold
        gold = gold.to(self.device, torch.float32)
        advantages = None
        if "values" in parts:
            kl = L.kl_estimate(parts["logp"], parts["ref_logp"], self.kl.estimator) * mask
            rewards = token_rewards(gold, kl, mask, self.kl_coef)
            advantages, _ = gae_advantages(rewards, parts["values"], mask, self.ppo.gamma, self.ppo.lam)
        views = []
        for i, n in enumerate(mask.sum(1).long().tolist()):
            ids = responses[i, :n].tolist()
            views.append({
                "prompt": batch["prompt"][i], "gold": float(gold[i]),
                "tokens": [self.tokenizer.decode([t]) for t in ids],
                "advantage": None if advantages is None else advantages[i, :n].tolist(),
                "value": parts["values"][i, :n].tolist() if "values" in parts else None,
                "entropy": parts["guide_raw"][i, :n, 0].tolist(),
                "surprisal": parts["guide_raw"][i, :n, 1].tolist(),
            })
        return views

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        gold, lengths = self._evaluate(batch)
        if gold is not None:
            self.val_accuracy.update(gold)
        self.val_length.update(lengths.float())

    def on_validation_epoch_end(self) -> None:
        metrics = self._compute_val_metrics()
        # For callbacks (checkpoint monitors, progress bar); TensorBoard gets them at the rollout step below.
        self.log_dict(metrics, logger=False, prog_bar=True)
        self._log_metrics(metrics)

    def _compute_val_metrics(self) -> dict[str, float]:
        """Reduces the validation metrics over batches and ranks, then resets them."""
        metrics = {"val/response_length": float(self.val_length.compute())}
        if self.val_accuracy.update_count:
            metrics["val/accuracy"] = float(self.val_accuracy.compute())
        self.val_accuracy.reset()
        self.val_length.reset()
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
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keeps only what trains (frozen weights are rebuilt from their sources) and adds the RL state.

        The ``vrpo`` section holds the rollout counter, KL coefficient, running reward statistics, the reward
        function's state (its noise generator), the update's shuffling and VIB generators, the torch (and CUDA),
        Python and NumPy RNG states, the non-finite streak and a fingerprint of the configuration. Lightning adds
        the optimizers, loops, the data module's stream position and the callbacks' states (KL controller, guide
        running moments).
        """
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        head_buffers = {n for n, _ in self.named_buffers() if n.startswith("critic.head")}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in trainable or k in head_buffers}
        checkpoint["vrpo"] = {
            "rollouts": self.rollouts, "kl_coef": self.kl_coef, "reward_moments": self.reward_moments.state_dict(),
            "reward_fn": self.reward.state_dict(), "shuffle_gen": self._shuffle_gen.get_state(),
            "vib_gen": None if self._vib_gen is None else self._vib_gen.get_state(),
            "nonfinite_in_row": dict(self._nonfinite_in_row), "fingerprint": self._fingerprint(),
            **_rng_states(self.device),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checks the fingerprint, then restores the RL state saved by :meth:`on_save_checkpoint`."""
        where = f" {str(self._trainer.ckpt_path)!r}" if self._trainer is not None and self._trainer.ckpt_path else ""
        state = checkpoint.get("vrpo")
        if state is None:
            raise ValueError(f"the checkpoint{where} was not written by vrpo_pl's RLSystem (no 'vrpo' section)")
        expected, found = self._fingerprint(), state["fingerprint"]
        diff = sorted((key, found[key], expected[key]) for key in expected.keys() & found.keys()
                      if expected[key] != found[key])
        if diff:
            changes = ", ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in diff[:6])
            raise ValueError(
                f"the checkpoint{where} comes from an incompatible configuration (algorithm, model, LoRA or critic "
                f"head differ): {changes}. Resume with the configuration it was written with (its config.yaml "
                "beside the logs), or start a new run without --ckpt_path."
            )
        self.rollouts, self.kl_coef = state["rollouts"], state["kl_coef"]
        self.reward_moments.load_state_dict(state["reward_moments"])
        self.reward.load_state_dict(state["reward_fn"])
        self._shuffle_gen.set_state(state["shuffle_gen"])
        # The generator must live where _critic_loss will use it; DDP restores before moving the model there.
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        if state["vib_gen"] is not None:
            self._vib_gen = torch.Generator(device=device)
            self._vib_gen.set_state(state["vib_gen"])
        _set_rng_states(state, device)
        self._nonfinite_in_row = state["nonfinite_in_row"]

    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint's weights must agree with: algorithm, critic head, and the trainable tensors."""
        import hashlib

        shapes = {n: tuple(p.shape) for n, p in self.named_parameters() if p.requires_grad}
        names = hashlib.sha1("\n".join(sorted(shapes)).encode()).hexdigest()[:12]
        return {"algorithm": self.algorithm, "vib": self.critic_settings.vib, "aux": self.critic_settings.aux,
                "trainable": len(shapes), "trainable_numel": sum(math.prod(s) for s in shapes.values()),
                "trainable_names": names}

    # ------------------------------------------------------------ distributed
    def _all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def _all_gather_flat(self, tensor: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized() and self.trainer.world_size > 1:
            return self.all_gather(tensor).flatten()
        return tensor

    @contextmanager
    def _no_ddp_sync(self):
        """Keeps DDP from reducing gradients on each backward; :meth:`_sync_gradients` reduces once per step.

        One training_step runs many backward passes through two models, which DDP's reducer (one backward per
        forward) does not allow.
        """
        wrapper = self.trainer.model
        context = wrapper.no_sync() if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel) else nullcontext()
        with context:
            yield

    def _sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Averages gradients over data-parallel ranks (DDP only; FSDP2 reduce-scatters its own in backward).

        One all-reduce of every gradient, flattened, plus one presence flag per parameter: a parameter that got
        no gradient on some rank counts as zero there and still gets the average everywhere, so the replicas
        take the same optimizer step (the buffers line up because every rank lists the same parameters).
        """
        if not isinstance(self.trainer.model, torch.nn.parallel.DistributedDataParallel) or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
        flat = torch.cat([*(g.flatten().to(present.dtype) for g in grads), present])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat[: -len(params)] /= self.trainer.world_size
        offset = 0
        for p, g, anywhere in zip(params, grads, flat[-len(params):].tolist(), strict=True):
            if anywhere > 0:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                p.grad = g
            offset += g.numel()

    def _clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float | None) -> Tensor:
        """Clips the global gradient norm and returns it before clipping as a plain tensor (also for FSDP2's
        DTensor gradients, whose norm ``clip_grad_norm_`` returns as a DTensor)."""
        from vrpo_pl.distributed import full_norm

        return full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf))

    def _shard_trainable_models(self) -> None:
        """FSDP2: ``fully_shard`` over the data-parallel mesh for the policy and the critic (not the reference)."""
        from vrpo_pl.distributed import shard_model

        mesh = self.device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "tensor parallelism is not supported (no plan for Hugging Face models): use --trainer.strategy fsdp2, "
                "which makes every process data-parallel"
            )
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        shard_model(self.policy, dp_mesh)
        if self.critic is not None:
            shard_model(self.critic, dp_mesh)


def _rng_states(device: torch.device) -> dict[str, Any]:
    """The global random states a rollout can draw from: torch (sampling), CUDA, Python, NumPy."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # As a tensor and plain numbers: Lightning loads checkpoints with weights_only=True, which rejects ndarrays.
    numpy_rng = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    states = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "numpy_rng": numpy_rng}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(state: dict[str, Any], device: torch.device) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch_rng"])
    if state.get("python_rng") is not None:
        random.setstate(state["python_rng"])
    if state.get("numpy_rng") is not None:
        kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).requires_grad_(False).eval()
