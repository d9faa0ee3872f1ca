"""Setting groups of the training system. Each field's docstring is its ``vrpo fit --help`` text.

Defaults cite their source; where the VRPO paper is silent the default is marked "our choice". Each group checks
its own values when it is built (``__post_init__``) and names the flag in its error; checks that involve the
algorithm or the data live in :class:`~vrpo_pl.system.RLSystem`.
``PromptSettings`` and ``GenerationSettings`` live in :mod:`vrpo_pl.rollout`, ``LoRASpec`` in
:mod:`vrpo_pl.lora`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vrpo_pl.losses import KLEstimator, LossAggregation


def _check(group: str, rules: list[tuple[bool, str]]) -> None:
    """Raises ``ValueError`` with the first failed rule's message, prefixed by its flag group (``--model.ppo``)."""
    for ok, message in rules:
        if not ok:
            raise ValueError(f"{group}.{message}")


@dataclass
class PPOSettings:
    """The PPO update: epochs, batch sizes, clipping and advantages."""

    epochs: int = 2
    """Passes over each rollout batch (PPO epochs; 1-4 in the anchors)."""
    mini_batch_size: int = 8
    """Sequences per optimizer step; must divide the rollout batch (prompts_per_rollout * samples_per_prompt)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward; gradients accumulate over mini_batch_size / micro_batch_size micro-batches
    (None: no accumulation). Losses are divided by the whole mini-batch's token count, so the result is exact."""
    max_tokens_per_micro_batch: int | None = None
    """Group each mini-batch's sequences by length into micro-batches of at most this many padded tokens (rows x
    longest sequence; verl's and OpenRLHF's ``max_tokens_per_micro_batch``); overrides micro_batch_size. None: fixed
    micro_batch_size. Either way each micro-batch is trimmed to its own longest sequence."""
    max_tokens_per_forward: int | None = 4096
    """Rows per no-gradient pass of the rollout (the old and reference log-probs, the values, the guide's targets):
    as many consecutive rows as fit in this many padded tokens (rows x the batch's full length), so a small batch
    takes one wide pass (throughput.py's 32 rows of about 78 tokens: these passes 0.64-0.68x the time of four
    passes of 8 rows on 2 Xeon cores, docs/performance.md); verl's ``log_prob_max_token_len_per_gpu``. None, and
    every pass under FSDP2 (whose sharded calls must match across ranks): micro_batch_size or mini_batch_size
    rows."""
    shuffle: Literal["prompts", "rows"] = "prompts"
    """How each epoch deals the rollout batch into mini-batches. ``prompts``: the prompts are shuffled and each keeps
    its samples together, so a mini-batch holds whole groups (mini_batch_size / samples_per_prompt prompts, when it
    divides) and, with share_prompt_prefix, each of its passes computes those prompts once: the update 0.78-0.81x
    the time on throughput.py's workload (2 Xeon cores, docs/performance.md); verl's mini-batches are whole groups
    too, and each GRPO group's advantages then sum to 0 within its mini-batch. ``rows``: every sequence is
    shuffled alone, so a mini-batch mixes about as many prompts as sequences (the default before 2026-12-05, under
    which docs/results.md's study ran: benchmarks/robustness.py pins it for that study)."""
    share_prompt_prefix: bool = True
    """Compute each distinct prompt once per pass: the G rows of a prompt share one forward pass over it, whose KV
    cache (differentiable) serves their responses (:mod:`vrpo_pl.prefix`; our choice). Applies to the rollout's
    policy, reference and critic passes and to the update's policy and critic losses, within each slice or
    micro-batch; micro-batches are then formed prompt by prompt within their mini-batch (the same update, fewer
    prompt tokens). Equal to the plain passes up to float rounding; a micro-batch without a repeated prompt, or a
    model that is no causal decoder, takes the plain pass, and so does every pass under FSDP2 (whose sharded calls
    must match across ranks). False: every row computes its own prompt."""
    pack_rows: bool = True
    """Run those passes on packed rows: the real tokens of a slice or micro-batch end to end (each distinct prompt
    once with share_prompt_prefix, every response without its padding) in one call under a block attention mask
    (:mod:`vrpo_pl.packing`; our choice, verl's and OpenRLHF's "remove padding" with the prompt shared). Equal to
    the plain passes up to float rounding; a model whose attention cannot take the mask (flash attention, ALiBi, a
    narrower sliding window) takes the shared or plain pass, and so does a pass over more real tokens than
    ``vrpo_pl.packing.PACK_MAX_TOKENS`` (1,024), where packing does not pay. On 2 Xeon cores the update's policy and
    critic passes over throughput.py's micro-batches of 8 rows took 0.68-0.75x the time of the shared ones
    (docs/performance.md, "Packed rows"). False: the shared or plain pass."""
    fuse_update: bool = True
    """Run each micro-batch's policy and critic passes of the update as one call (:mod:`vrpo_pl.fused`; our choice):
    the policy's packs and the critic's copy of them side by side through the policy's decoder, every frozen weight
    multiplied once over both, each half adapted by its own model's LoRA, the LM head over the first half and the
    value head over the second. Equal to the two passes up to float rounding, with each loss's gradient reaching
    its own adapters only. Only with pack_rows, LoRA on both models over the same frozen base tensors (PPO's and
    VRPO's default; not under FSDP2) and plain LoRA adapters of one rank; a micro-batch the packed pass does not
    take, or a run without these, steps the two models one after the other. The wider call is what pays: on 2 Xeon
    cores over throughput.py's micro-batches of 8 rows (bf16), the policy's and the critic's forward + backward
    took 0.81x the time fused, and a PPO rollout batch 0.87x (VRPO 0.95x; docs/performance.md, "Fused policy and
    critic passes"). The rollout's old log-probs and values then come from one fused call per slice of a
    micro-batch's rows too. False: two passes."""
    clip_eps: float = 0.2
    """Policy ratio clip range epsilon (Schulman et al. 2017)."""
    value_clip: float | None = 0.2
    """Value clip range around the rollout's values (PPO2; Secrets of RLHF I); None for plain MSE."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 in the RLHF anchors)."""
    loss_aggregation: LossAggregation = "token_mean"
    """``token_mean`` over the mini-batch's response tokens, or ``seq_mean_token_mean``."""
    gamma: float = 1.0
    """GAE discount (1.0 in every anchor)."""
    lam: float = 0.95
    """GAE lambda (0.95 TRL/MOSS/NeMo; 1.0 OpenRLHF/verl)."""
    whiten_advantages: bool = True
    """Standardize PPO/VRPO advantages over the rollout batch's response tokens (Secrets of RLHF I)."""
    grpo_scale_by_std: bool = True
    """GRPO: divide group-centered rewards by the group's std; False is Dr. GRPO (Liu et al. 2025)."""
    critic_epochs: int | None = 4
    """Passes of the critic over each rollout batch, in shuffled mini-batches (the first ``epochs`` of them shared
    with the policy's); None: as many as ``epochs`` (verl's ``critic.ppo_epochs``). 4 is our choice, measured
    (docs/results.md, "The critic"): with one pass the critics' explained variance stayed near 0 for the first half
    of a 16-rollout run (VRPO: 0.04 averaged over rollouts 5-12), with 4 it reached 0.3 by the middle (means over
    5-12 of 0.26-0.63, PPO and VRPO on two tasks); a 3x critic lr on top of the 4 passes added nothing (0.28).
    Each pass costs one critic forward and backward over the batch: a rollout batch ~1.5-1.8x."""
    critic_warmup_rollouts: int = 0
    """Rollout batches at the start during which only the critic trains (Secrets of RLHF I)."""
    max_nonfinite_updates: int = 5
    """Non-finite losses in a row after which the run stops; each one skips its optimizer step and is counted. Also
    the limit on rollout batches in a row skipped for a non-finite reward (``--model.rewards.on_nonfinite skip``)."""

    @property
    def micro_rows(self) -> int:
        """Rows per micro-batch without a token budget: ``micro_batch_size``, or the whole mini-batch."""
        return self.micro_batch_size or self.mini_batch_size

    def __post_init__(self) -> None:
        p = self
        _check("--model.ppo", [
            (p.epochs >= 1, f"epochs={p.epochs} must be >= 1"),
            (p.shuffle in ("prompts", "rows"), f"shuffle={p.shuffle!r} must be 'prompts' or 'rows'"),
            (p.mini_batch_size >= 1, f"mini_batch_size={p.mini_batch_size} must be >= 1"),
            (p.micro_batch_size is None or (p.micro_batch_size >= 1 and p.mini_batch_size % p.micro_batch_size == 0),
             f"micro_batch_size={p.micro_batch_size} must divide --model.ppo.mini_batch_size={p.mini_batch_size}"),
            (p.max_tokens_per_forward is None or p.max_tokens_per_forward >= 1,
             f"max_tokens_per_forward={p.max_tokens_per_forward} must be >= 1 (or null)"),
            (p.max_tokens_per_micro_batch is None or p.max_tokens_per_micro_batch >= 1,
             f"max_tokens_per_micro_batch={p.max_tokens_per_micro_batch} must be >= 1 (or null)"),
            (0 < p.clip_eps < 1, f"clip_eps={p.clip_eps} must be in (0, 1)"),
            (p.value_clip is None or p.value_clip > 0,
             f"value_clip={p.value_clip} must be > 0 (or null for plain MSE)"),
            (0 <= p.lam <= 1, f"lam={p.lam} must be in [0, 1]"),
            (0 < p.gamma <= 1, f"gamma={p.gamma} must be in (0, 1]"),
            (p.entropy_coef >= 0, f"entropy_coef={p.entropy_coef} must be >= 0"),
            (p.critic_epochs is None or p.critic_epochs >= 1,
             f"critic_epochs={p.critic_epochs} must be >= 1 (or null: as many as epochs)"),
            (p.critic_warmup_rollouts >= 0, f"critic_warmup_rollouts={p.critic_warmup_rollouts} must be >= 0"),
            (p.max_nonfinite_updates >= 1, f"max_nonfinite_updates={p.max_nonfinite_updates} must be >= 1"),
        ])


@dataclass
class OptimSettings:
    """AdamW optimizers, one for the policy and one for the critic."""

    policy_lr: float = 1e-5
    """Policy learning rate (full fine-tuning; LoRA configs use ~1e-4)."""
    critic_lr: float = 5e-5
    """Critic learning rate (anchors: 3-10x the policy's)."""
    weight_decay: float = 0.0
    """AdamW weight decay for both optimizers."""
    policy_max_grad_norm: float | None = 1.0
    """Global gradient-norm clip of the policy (None: no clipping)."""
    critic_max_grad_norm: float | None = 1.0
    """Global gradient-norm clip of the critic (None: no clipping)."""

    def __post_init__(self) -> None:
        o = self
        _check("--model.optim", [
            (o.policy_lr > 0, f"policy_lr={o.policy_lr} must be > 0"),
            (o.critic_lr > 0, f"critic_lr={o.critic_lr} must be > 0"),
            (o.weight_decay >= 0, f"weight_decay={o.weight_decay} must be >= 0"),
            (o.policy_max_grad_norm is None or o.policy_max_grad_norm > 0,
             f"policy_max_grad_norm={o.policy_max_grad_norm} must be > 0 (or null: no clipping)"),
            (o.critic_max_grad_norm is None or o.critic_max_grad_norm > 0,
             f"critic_max_grad_norm={o.critic_max_grad_norm} must be > 0 (or null: no clipping)"),
        ])


@dataclass
class KLSettings:
    """The KL penalty to the reference policy."""

    coef: float = 0.05
    """KL coefficient: fixed, or the starting value when the KLController callback adapts it."""
    estimator: KLEstimator | None = None
    """k1, k2 or k3 (Schulman); None: k1 for PPO/VRPO (KL in the reward), k3 for GRPO (KL in the loss)."""
    placement: Literal["reward", "loss"] | None = None
    """``reward``: r_t = -coef * kl_t per token (PPO/VRPO default); ``loss``: coef * KL added to the policy
    loss (GRPO default). None picks by algorithm."""

    def __post_init__(self) -> None:
        k = self
        _check("--model.kl", [(k.coef >= 0, f"coef={k.coef} must be >= 0")])


@dataclass
class RewardSettings:
    """Transformations of the training reward before advantages (the gold reward is never transformed)."""

    normalize: bool = False
    """Standardize scores with running mean/std (PPO-max, Secrets of RLHF I); the statistics are checkpointed."""
    clip: float | None = None
    """Clip (normalized) scores to [-clip, clip]; None: no clipping."""
    on_nonfinite: Literal["skip", "error"] = "skip"
    """A NaN/inf reward: ``skip`` the rollout batch (logged, counted; --model.ppo.max_nonfinite_updates in a row
    stop the run) or stop with an ``error`` naming the sample. Never trains on it."""

    def __post_init__(self) -> None:
        r = self
        _check("--model.rewards", [(r.clip is None or r.clip > 0, f"clip={r.clip} must be > 0 (or null: no clipping)")])


@dataclass
class CriticSettings:
    """The value model: head, VIB and the frozen-LM auxiliary loss (the VRPO part)."""

    vib: bool | None = None
    """Variational information bottleneck head; None: on for ``vrpo``, off for ``ppo``."""
    input_norm: bool = True
    """LayerNorm (without parameters) on the backbone's hidden state before either head, so the head's first values
    sit at the reward's scale whatever the backbone's hidden-state norm (our choice; SmolLM2's is ~47)."""
    normalize_values: bool = False
    """Regress standardized returns (running mean/std over every rollout batch, checkpointed in the head's buffers)
    and undo it for GAE; off: regress the returns as they are."""
    latent_dim: int = 64
    """VIB latent size d_z (our choice)."""
    init_logvar: float = -2.0
    """VIB posterior's initial log-variance (sigma = 0.37; our choice)."""
    value_samples: int = 8
    """VIB: rollout values average the decoder over this many draws of z, the quantity the critic's update
    regresses (the decoder is nonlinear, so Dec(mu) is biased); 0: z = mu (our choice)."""
    decoder_hidden: int = 128
    """Hidden width of the VIB decoder MLP (our choice)."""
    beta: float = 1e-4
    """VIB KL weight (our choice, measured: docs/results.md, "The critic"). With 0/1 rewards the value loss is
    ~0.05-0.1 and the KL ~60-90 nats per token; at 1e-3 the KL term (~0.07) matched the value loss, squeezed the
    latent to ~26 nats and the critic's explained variance stayed near 0.1-0.26 for 13 rollout batches; at 1e-4 it
    costs ~0.008 and the critic fits (0.4-0.8 by rollout 13-16)."""
    beta_warmup_rollouts: int = 0
    """Rollout batches over which beta ramps linearly from 0 (0: constant)."""
    aux: Literal["predict", "weight", "none"] | None = None
    """Auxiliary loss guided by the frozen LM: ``predict`` heads regress its standardized entropy and surprisal
    from z; ``weight`` up-weights key tokens in the value loss; ``none``. None: ``predict`` for vrpo, else
    ``none`` (our choice of forms). Needs the FrozenLMTargets callback."""
    aux_coef: float = 0.03
    """lambda_aux, the auxiliary loss weight (our choice, measured: at 0.1 the auxiliary loss, ~1.0 -> 0.2 on
    standardized targets, pulled as hard on the critic's body as the value loss and its explained variance averaged
    0.11 over rollouts 5-12; at 0.03, 0.19, with the entropy still predicted at correlation ~0.9)."""
    aux_input: Literal["latent", "hidden"] = "latent"
    """``predict``: the auxiliary heads read the VIB latent z (``latent``), or the critic's hidden state before the
    bottleneck (``hidden``: the body keeps the key-word information, the bottleneck's budget goes to the value)."""
    aux_key_only: bool = False
    """``predict``: regress the targets on key tokens only (else on every response token)."""
    key_alpha: float = 1.0
    """``weight``: value-loss weight w_t = 1 + alpha * key_t (our choice)."""

    def __post_init__(self) -> None:
        c = self
        _check("--model.critic", [
            (c.latent_dim >= 1, f"latent_dim={c.latent_dim} must be >= 1"),
            (c.decoder_hidden >= 1, f"decoder_hidden={c.decoder_hidden} must be >= 1"),
            (c.beta >= 0, f"beta={c.beta} must be >= 0"),
            (c.beta_warmup_rollouts >= 0, f"beta_warmup_rollouts={c.beta_warmup_rollouts} must be >= 0"),
            (c.aux_coef >= 0, f"aux_coef={c.aux_coef} must be >= 0"),
            (c.key_alpha >= 0, f"key_alpha={c.key_alpha} must be >= 0"),
            (c.value_samples >= 0, f"value_samples={c.value_samples} must be >= 0"),
        ])


def resolve_algorithm_defaults(algorithm: str, critic: CriticSettings, kl: KLSettings) -> None:
    """Fills, in place, the settings whose None means "by algorithm" (see each setting's docstring)."""
    if critic.vib is None:
        critic.vib = algorithm == "vrpo"
    if critic.aux is None:
        critic.aux = "predict" if algorithm == "vrpo" else "none"
    if kl.placement is None:
        kl.placement = "loss" if algorithm == "grpo" else "reward"
    if kl.estimator is None:
        kl.estimator = "k3" if kl.placement == "loss" else "k1"


def check_algorithm_settings(algorithm: str, critic: CriticSettings, has_critic_model: bool) -> None:
    """Checks across groups (each group checks its own values when built).

    Args:
        algorithm: ``--model.algorithm``.
        critic: the resolved critic settings.
        has_critic_model: ``--model.critic_backbone`` or ``--model.critic_lora`` was given.

    Raises:
        ValueError: naming the flags that conflict.
    """
    if algorithm not in ("ppo", "grpo", "vrpo"):
        raise ValueError(f"--model.algorithm={algorithm!r}: use ppo, grpo or vrpo")
    if algorithm == "grpo" and (critic.vib or critic.aux != "none"):
        raise ValueError("--model.algorithm grpo has no critic: --model.critic.vib and --model.critic.aux do not apply")
    if algorithm == "grpo" and has_critic_model:
        raise ValueError("--model.algorithm grpo has no critic: drop --model.critic_backbone and --model.critic_lora")


def check_batch_geometry(algorithm: str, mini_batch_size: int, rollout_batch: int, samples_per_prompt: int | None,
                         reward_name: str, reward_needs_groups: bool) -> None:
    """Refuses a rollout batch the update cannot split, or groups too small for GRPO or a voting reward."""
    if rollout_batch % mini_batch_size != 0:
        raise ValueError(
            f"--model.ppo.mini_batch_size={mini_batch_size} must divide the rollout batch B = "
            f"--data.prompts_per_rollout x --data.samples_per_prompt = {rollout_batch}"
        )
    if samples_per_prompt is None or samples_per_prompt >= 2:
        return
    if reward_needs_groups:
        raise ValueError(
            f"--model.reward {reward_name} votes among the responses to each prompt: "
            f"--data.samples_per_prompt={samples_per_prompt} must be >= 2"
        )
    if algorithm == "grpo":
        raise ValueError(
            f"--model.algorithm grpo compares responses to the same prompt: --data.samples_per_prompt="
            f"{samples_per_prompt} must be >= 2"
        )
