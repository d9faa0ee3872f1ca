"""Phase 5 of :meth:`vrpo_pl.system.RLSystem.training_step`, the PPO update of one rollout batch.

PPO epochs over shuffled mini-batches, the policy and the critic each stepped by its own optimizer: gradients
accumulated over micro-batches (divided by the whole mini-batch's token or sequence count, so 1x4 equals 4x1),
averaged over ranks and clipped (:mod:`vrpo_pl.distributed`), the losses from :mod:`vrpo_pl.losses`. A non-finite
loss or gradient on any rank skips that step on every rank; too many in a row stop the run.

:class:`PPOUpdate` takes what the update reads as typed fields; ``RLSystem`` builds one per rollout batch. The
state that outlives a rollout batch (the shuffling and VIB generators, the non-finite streaks) stays the system's,
which checkpoints it; the update advances it in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vrpo_pl import distributed
from vrpo_pl import losses as L
from vrpo_pl.critic import ValueModel, ValueOutput
from vrpo_pl.fused import fusable, fused_passes
from vrpo_pl.logprobs import TokenLogits, logprobs_and_entropy
from vrpo_pl.metrics import MetricAccumulator, PhaseTimer
from vrpo_pl.models import training_attention
from vrpo_pl.passes import response_token_logits
from vrpo_pl.rollout import MicroBatch, Rollout, micro_batch, mini_batch_order, split_micro_batches
from vrpo_pl.settings import CriticSettings, KLSettings, OptimSettings, PPOSettings


def vib_beta(beta: float, warmup_rollouts: int, rollouts: int) -> float:
    """The VIB KL weight after ``rollouts`` rollout batches: ``beta`` ramped linearly from 0 over
    ``warmup_rollouts`` (``--model.critic.beta_warmup_rollouts``; 0: constant).

    >>> vib_beta(1e-4, 0, 3), vib_beta(1.0, 4, 1), vib_beta(1.0, 4, 9)
    (0.0001, 0.25, 1.0)
    """
    if warmup_rollouts <= 0:
        return beta
    return beta * min(1.0, rollouts / warmup_rollouts)


@dataclasses.dataclass
class PPOUpdate:
    """The PPO update of one rollout batch (:meth:`run`); see the module docstring."""

    policy: nn.Module
    critic: ValueModel | None
    optimizers: Sequence[torch.optim.Optimizer]
    """The raw optimizers (not Lightning's wrappers, which would count every inner step as a global step): the
    policy's, then the critic's when there is one."""
    ppo: PPOSettings
    optim: OptimSettings
    kl: KLSettings
    critic_settings: CriticSettings
    temperature: float
    """The sampling temperature, which the old log-probs were computed at."""
    kl_coef: float
    rollouts: int
    """Rollout batches done before this one: the critic's warm-up, the VIB's beta ramp, messages."""
    shares_prompts: bool
    """The micro-batches' passes compute each distinct prompt once (``RLSystem.shares_prompts``)."""
    packs_rows: bool
    """The micro-batches' passes are packed calls (``--model.ppo.pack_rows``, :mod:`vrpo_pl.packing`)."""
    fused_pairs: list | None
    """The policy's and the critic's LoRA linears paired for fused passes (``RLSystem.fused_pairs``); None: the two
    models' passes apart."""
    shuffle_gen: torch.Generator
    """The mini-batches' shuffling (the system's, seeded by ``--model.seed``)."""
    vib_gen: torch.Generator | None
    """The VIB's sampling, on the training device; None without a VIB critic."""
    nonfinite_in_row: dict[str, int]
    """Skipped steps in a row per model (``policy``, ``critic``), reset by a finite step; updated in place."""
    wrapped_model: nn.Module | None
    """The strategy's wrapped module (``trainer.model``): DDP's, whose per-backward gradient sync the update
    replaces by one average per step."""
    world_size: int
    device: torch.device
    backward: Callable[[Tensor], None]
    """``LightningModule.manual_backward`` (the strategy's and precision plugin's backward)."""
    timer: PhaseTimer
    warn: Callable[[str], None]
    """Prints a warning once (``LightningModule.print``: rank 0)."""
    _vib_noise: Tensor | None = dataclasses.field(default=None, init=False, repr=False)

    def run(self, r: Rollout) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches; returns the update's metrics over every step and rank."""
        train_policy = self.rollouts >= self.ppo.critic_warmup_rollouts
        metrics = MetricAccumulator(self.device)
        mini = self.ppo.mini_batch_size
        micro = self.ppo.micro_rows
        critic_epochs = self.ppo.critic_epochs or self.ppo.epochs
        with distributed.no_ddp_sync(self.wrapped_model), training_attention(self.policy, self.critic):
            for epoch in range(max(self.ppo.epochs, critic_epochs if self.critic is not None else 0)):
                order = mini_batch_order(r.size, r.group, self.ppo.shuffle == "prompts", self.shuffle_gen)
                order = order.to(self.device)
                for start in range(0, r.size, mini):
                    idx = order[start : start + mini]
                    norm = distributed.loss_normalizers(r.mask[idx], self.world_size)
                    micro_batches = split_micro_batches(r, idx, micro, self.ppo.max_tokens_per_micro_batch,
                                                        by_prompt=self.shares_prompts)
                    models = [name for name, steps in (
                        ("policy", train_policy and epoch < self.ppo.epochs),
                        ("critic", self.critic is not None and epoch < critic_epochs)) if steps]
                    # Both models stepping on this mini-batch: from one fused call per micro-batch where it can.
                    fused = len(models) == 2 and self.fused_pairs is not None
                    for names in [tuple(models)] if fused else [(name,) for name in models]:
                        self.optimizer_step(names, micro_batches, r, norm, metrics)
        return metrics.compute(distributed.all_reduce_sum)

    def optimizer_step(self, names: tuple[str, ...], micro_batches: list[Tensor], r: Rollout, norm: dict[str, float],
                       metrics: MetricAccumulator) -> None:
        """One optimizer step of the policy, of the critic, or of both from fused passes (``names``): accumulate over
        micro-batches, average over ranks, clip, step; a non-finite loss or gradient on any rank skips that model's
        step everywhere (counted, and fatal in a row)."""
        if "critic" in names and self.critic_settings.vib:
            # The VIB's draws for every row of the rollout, once per optimizer step: the same update however the
            # mini-batch is split into micro-batches.
            shape = (*r.mask.shape, self.critic_settings.latent_dim)
            self._vib_noise = torch.randn(shape, generator=self.vib_gen, device=self.device)
        finite = dict.fromkeys(names, True)
        with self.timer("update_" + ("fused" if len(names) == 2 else names[0])):
            for rows in micro_batches:
                if len(names) == 2:
                    results = dict(zip(names, self.fused_losses(r, rows, norm), strict=True))
                else:
                    loss_fn = self.policy_loss if names[0] == "policy" else self.critic_loss
                    results = {names[0]: loss_fn(r, rows, norm)}
                for name, (b, loss, stats, correlations) in results.items():
                    ok = bool(torch.isfinite(loss))
                    finite[name] = finite[name] and ok
                    mask = b.take(r.mask) if ok else torch.zeros_like(b.take(r.mask))  # non-finite: registers, adds 0
                    for key, value in stats.items():
                        metrics.token_mean(key, value if ok else torch.zeros_like(value), mask)
                    for key, (x, y) in correlations.items():
                        metrics.correlation(key, x if ok else x[:0], y if ok else y[:0])
                # Backward runs even on a non-finite loss: under FSDP every rank must run the same number of
                # (collective) backward passes. The step is skipped below instead. Fused, the sum's gradient
                # reaches each model's adapters from its own loss only.
                self.backward(sum(loss for _, loss, _, _ in results.values()))
            for name in names:
                self._step(name, finite[name], metrics)

    def _step(self, name: str, finite: bool, metrics: MetricAccumulator) -> None:
        """The optimizer step of ``name`` after its micro-batches: average over ranks, clip, step or skip."""
        optimizer, model = (self.optimizers[0], self.policy) if name == "policy" else (self.optimizers[1], self.critic)
        params = [p for p in model.parameters() if p.requires_grad]
        # Every rank must take the same branch: the gradient all-reduce below is collective.
        finite = bool(distributed.all_reduce_sum(torch.tensor(float(not finite), device=self.device)) == 0)
        grad_norm = torch.zeros((), device=self.device)
        if finite:
            distributed.average_gradients(self.wrapped_model, params)
            max_norm = self.optim.policy_max_grad_norm if name == "policy" else self.optim.critic_max_grad_norm
            grad_norm = distributed.clip_grad_norm(params, max_norm)
            finite = bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
            self.nonfinite_in_row[name] = 0
        optimizer.zero_grad(set_to_none=True)
        metrics.step_mean(f"{'policy' if name == 'policy' else 'value'}/grad_norm", grad_norm if finite else 0.0,
                          steps=float(finite))
        metrics.sum("train/skipped_updates", float(not finite))
        if not finite:
            self.count_nonfinite(name)

    def count_nonfinite(self, name: str) -> None:
        """Counts a skipped step of ``name``; raises RuntimeError at ``--model.ppo.max_nonfinite_updates`` in a row."""
        # Counted per model: a finite critic step in between must not hide a policy that keeps failing.
        self.nonfinite_in_row[name] += 1
        self.warn(f"warning: non-finite {name} loss or gradient at rollout {self.rollouts}; step skipped")
        if self.nonfinite_in_row[name] >= self.ppo.max_nonfinite_updates:
            raise RuntimeError(
                f"{self.nonfinite_in_row[name]} non-finite updates in a row ({name}) at rollout batch "
                f"{self.rollouts}; stopping. Lower the learning rates, check the reward's scale, or raise "
                "--model.ppo.max_nonfinite_updates. Checkpoints already written are intact."
            )

    def policy_loss(self, r: Rollout, rows: Tensor, norm: dict[str, float]):
        """The policy objective on the micro-batch ``rows``: ``(micro-batch, loss, per-token stats, {})``."""
        b = micro_batch(r, rows)
        logits = response_token_logits(self.policy, b.sequences, b.attention_mask, b.position_ids, b.width,
                                       prompt_width=self._shared_prompt_width(b), pack=self.packs_rows)
        return self._policy_objective(r, b, logits, norm)

    def critic_loss(self, r: Rollout, rows: Tensor, norm: dict[str, float]):
        """The critic objective on the micro-batch ``rows``: ``(micro-batch, loss, per-token stats, correlations)``."""
        c, b = self.critic_settings, micro_batch(r, rows)
        out = self.critic(b.sequences, b.attention_mask, b.position_ids, b.width, sample=bool(c.vib),
                          noise=self._vib_noise_of(b), prompt_width=self._shared_prompt_width(b), pack=self.packs_rows)
        return self._critic_objective(r, b, out, norm)

    def fused_losses(self, r: Rollout, rows: Tensor, norm: dict[str, float]) -> tuple[tuple, tuple]:
        """The policy's and the critic's objectives on the micro-batch ``rows`` from one fused call where it takes
        them (:func:`vrpo_pl.fused.fusable`), else from the two passes: ``(policy's, critic's)`` as
        :meth:`policy_loss` and :meth:`critic_loss` return them."""
        b = micro_batch(r, rows)
        if not fusable(self.policy, self.fused_pairs, b.attention_mask, b.width):
            return self.policy_loss(r, rows, norm), self.critic_loss(r, rows, norm)
        logits, out = fused_passes(self.policy, self.critic, self.fused_pairs, b.sequences, b.attention_mask,
                                   b.position_ids, b.width, share_prompts=self.shares_prompts,
                                   sample=bool(self.critic_settings.vib), noise=self._vib_noise_of(b))
        return self._policy_objective(r, b, logits, norm), self._critic_objective(r, b, out, norm)

    def _policy_objective(self, r: Rollout, b: MicroBatch, logits: TokenLogits, norm: dict[str, float]):
        if self.ppo.entropy_coef > 0:  # an entropy bonus differentiates the entropy: the whole log-softmax
            logp, entropy = logprobs_and_entropy(logits.dense(), b.take(r.responses), self.temperature,
                                                 entropy_grad=True)
        else:
            logp, entropy = logits.token_stats(b.take(r.responses), self.temperature)
        loss, stats = L.policy_objective(
            logp, entropy, b.take(r.logp), b.take(r.advantages), b.take(r.mask), clip_eps=self.ppo.clip_eps,
            entropy_coef=self.ppo.entropy_coef, ref_logp=b.take(r.ref_logp) if self.kl.placement == "loss" else None,
            kl_coef=self.kl_coef, kl_estimator=self.kl.estimator, aggregation=self.ppo.loss_aggregation, **norm)
        return b, loss, stats, {}

    def _critic_objective(self, r: Rollout, b: MicroBatch, out: ValueOutput, norm: dict[str, float]):
        c = self.critic_settings
        unit = self.critic.head.normalize  # the regression's units (standardized returns with normalize_values)
        loss, stats, correlations = L.critic_objective(
            unit(out.values), unit(b.take(r.values)), unit(b.take(r.returns)), b.take(r.mask),
            value_clip=self.ppo.value_clip, mu=out.mu, logvar=out.logvar,
            beta=vib_beta(c.beta, c.beta_warmup_rollouts, self.rollouts), aux=c.aux, aux_predictions=out.aux,
            aux_targets=None if r.guide_targets is None else b.take(r.guide_targets), aux_coef=c.aux_coef,
            key=None if r.key is None else b.take(r.key), key_alpha=c.key_alpha, aux_key_only=c.aux_key_only,
            aggregation=self.ppo.loss_aggregation, **norm)
        return b, loss, stats, correlations

    def _vib_noise_of(self, b: MicroBatch) -> Tensor | None:
        return None if self._vib_noise is None else b.take(self._vib_noise)

    def _shared_prompt_width(self, b: MicroBatch) -> int | None:
        """The micro-batch's prompt width when its passes share prompts (:attr:`shares_prompts`)."""
        return b.prompt_width if self.shares_prompts else None
