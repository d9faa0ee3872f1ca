"""The critic: a transformer body and a value head, plain (PPO) or a variational information bottleneck (VRPO).

Shapes: B sequences, T full length, A response tokens, H hidden size, Z latent size, K auxiliary targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vrpo_pl.losses import reparameterize
from vrpo_pl.packing import packable, packed_hidden
from vrpo_pl.prefix import shared_prefix_hidden, shared_prompts_for


@dataclass
class ValueOutput:
    """What the value model returns for the response positions."""

    values: Tensor
    """(B, A) V(s_t) on the reward's scale (denormalized when the head normalizes its targets)."""
    mu: Tensor | None = None
    """(B, A, Z) VIB latent means (VIB head only)."""
    logvar: Tensor | None = None
    """(B, A, Z) VIB latent log-variances (VIB head only)."""
    aux: Tensor | None = None
    """(B, A, K) auxiliary predictions of the guide's standardized entropy and surprisal."""


class ReturnNormalizer(nn.Module):
    """Running mean and variance of the value targets, kept as buffers (so checkpoints and exports carry them).

    The head predicts standardized values and reports ``mean + std * prediction``; the value loss compares
    standardized predictions with standardized returns (:meth:`normalize`), so the regression has unit scale
    whatever the reward's. Statistics are merged from per-batch sums (Chan et al.), so several ranks can reduce
    their sums first and fold in the global batch. Shapes: any.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))

    @property
    def std(self) -> Tensor:
        return self.var.clamp(min=1e-8).sqrt()

    @torch.no_grad()
    def update(self, n: float, total: float, total_sq: float) -> None:
        """Folds a batch given by its size and sums (of x and x^2) into the statistics."""
        if n <= 0:
            return
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean**2, 0.0)
        count = float(self.count) + n
        delta = batch_mean - float(self.mean)
        m2 = float(self.var) * float(self.count) + batch_var * n + delta**2 * float(self.count) * n / count
        self.mean.fill_(float(self.mean) + delta * n / count)
        self.var.fill_(m2 / count)
        self.count.fill_(count)

    def update_masked(self, x: Tensor, mask: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Folds the entries of ``x`` where ``mask`` is 1 into the statistics; ``reduce`` (e.g. a sum over ranks)
        first combines their count and sums, so that every rank folds in the same global batch."""
        sums = torch.stack([mask.sum(), (x * mask).sum(), (x**2 * mask).sum()])
        self.update(*(sums if reduce is None else reduce(sums)).double().tolist())

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.std.to(x.dtype) + self.mean.to(x.dtype)


class ValueHead(nn.Module):
    """Value head on the backbone's hidden state h_t: plain (h -> V) or a variational information bottleneck.

    Both heads first apply a LayerNorm without parameters to h (``input_norm``): a transformer's last hidden state
    has a large norm (SmolLM2-135M: about 47, single dimensions up to 50), so without it the head's initial output
    depends on the backbone (the VIB head's first values spread over +-0.4 to +-1 against 0/1 rewards, and its
    latent KL started at 136 nats per token). After it, every head starts with values within +-0.05 of 0.

    VIB (VRPO): h -> Enc -> (mu, log sigma^2) in R^Z; z = mu + sigma * eps while the critic trains; V = Dec(z), Dec
    a small MLP. The encoder starts with mu of unit scale and sigma = exp(init_logvar / 2). Because Dec is
    nonlinear, Dec(mu) is not the mean of Dec(z) that the training regressed (measured on SmolLM2 features: 0.12
    below it), so rollout values average Dec over ``value_samples`` fixed antithetic draws z = mu +- sigma * eps_k
    (a buffer drawn once at init: deterministic values, no random state used; 0: z = mu, the literal reading of
    the method). Optional auxiliary heads read z (or h without a VIB) and predict K guide targets. The head runs
    in float32 whatever the backbone's dtype, so a bf16 backbone cannot turn the value regression into NaNs.
    """

    def __init__(
        self, hidden_size: int, vib: bool = False, latent_dim: int = 64, decoder_hidden: int = 128,
        aux_targets: int = 0, input_norm: bool = True, init_logvar: float = -2.0, value_samples: int = 8,
        normalize_values: bool = False, aux_input: Literal["latent", "hidden"] = "latent",
    ) -> None:
        """
        Args:
            hidden_size: H, the backbone's hidden size.
            vib: a VIB head (else a plain linear head).
            latent_dim: Z, the VIB latent size.
            decoder_hidden: the VIB decoder's hidden width.
            aux_targets: K, auxiliary outputs (0: none).
            input_norm: LayerNorm (without parameters) on h first.
            init_logvar: the VIB posterior's initial log-variance.
            value_samples: draws of z averaged for rollout values, rounded up to an even number (0: z = mu).
            normalize_values: predict standardized returns (running statistics, see :class:`ReturnNormalizer`).
            aux_input: what the auxiliary heads read with a VIB: the latent z (``latent``) or the normalized hidden
                state before the bottleneck (``hidden``).
        """
        super().__init__()
        if min(hidden_size, latent_dim, decoder_hidden) < 1 or aux_targets < 0 or value_samples < 0:
            raise ValueError(
                f"ValueHead: hidden_size={hidden_size}, latent_dim={latent_dim} (--model.critic.latent_dim) and "
                f"decoder_hidden={decoder_hidden} (--model.critic.decoder_hidden) must be >= 1, value_samples="
                f"{value_samples} (--model.critic.value_samples) >= 0"
            )
        self.config = {"hidden_size": hidden_size, "vib": vib, "latent_dim": latent_dim,
                       "decoder_hidden": decoder_hidden, "aux_targets": aux_targets, "input_norm": input_norm,
                       "init_logvar": init_logvar, "value_samples": value_samples,
                       "normalize_values": normalize_values, "aux_input": aux_input}
        if aux_input not in ("latent", "hidden"):
            raise ValueError(f"ValueHead: aux_input={aux_input!r} (--model.critic.aux_input) must be latent or hidden")
        self.vib, self.value_samples, self.aux_input = vib, value_samples, aux_input
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False) if input_norm else nn.Identity()
        self.return_norm = ReturnNormalizer() if normalize_values else None
        features = hidden_size
        if vib:
            self.encoder = nn.Linear(hidden_size, 2 * latent_dim)
            self.decoder = nn.Sequential(nn.Linear(latent_dim, decoder_hidden), nn.GELU(), nn.Linear(decoder_hidden, 1))
            features = latent_dim
            with torch.no_grad():
                # mu of unit scale on normalized input; log-variance a constant init_logvar at first.
                nn.init.normal_(self.encoder.weight[:latent_dim], std=hidden_size**-0.5)
                nn.init.zeros_(self.encoder.weight[latent_dim:])
                nn.init.zeros_(self.encoder.bias)
                self.encoder.bias[latent_dim:] = init_logvar
            if value_samples > 0:
                # Fixed noise for rollout values, in antithetic pairs (the mean of each pair is exactly mu).
                half = torch.randn(-(-value_samples // 2), latent_dim, generator=torch.Generator().manual_seed(0))
                self.register_buffer("value_eps", torch.cat([half, -half]), persistent=False)  # rebuilt from seed 0
        else:
            self.decoder = nn.Linear(hidden_size, 1)
        aux_features = hidden_size if aux_input == "hidden" else features
        self.aux = nn.Linear(aux_features, aux_targets) if aux_targets > 0 else None
        last = self.decoder[-1] if vib else self.decoder
        # A small output layer: the first values sit within a few hundredths of 0 (the scale of 0/1 rewards) for
        # any backbone; the plain head's 1/(H+1) is OpenRLHF's choice, the decoder's 1/(hidden+1) the same rule.
        nn.init.normal_(last.weight, std=1.0 / (last.in_features + 1))
        nn.init.zeros_(last.bias)

    def forward(self, hidden: Tensor, sample: bool = False, generator: torch.Generator | None = None,
                noise: Tensor | None = None) -> ValueOutput:
        """
        Args:
            hidden: (B, A, H) backbone hidden states at the response positions.
            sample: draw z ~ N(mu, sigma^2) once (critic update) instead of the rollout values' z = mu or average.
            generator: random generator for the draws.
            noise: (B, A, Z) standard-normal draws to use instead (the update draws them per row, so that how a
                mini-batch is split into micro-batches does not change the update).
        """
        hidden = self.norm(hidden.float())
        if not self.vib:
            aux = self.aux(hidden) if self.aux is not None else None
            return ValueOutput(values=self._denormalize(self.decoder(hidden).squeeze(-1)), aux=aux)
        mu, logvar = self.encoder(hidden).chunk(2, dim=-1)
        logvar = logvar.clamp(-20.0, 10.0)
        if sample:
            z = reparameterize(mu, logvar, generator) if noise is None else mu + torch.exp(0.5 * logvar) * noise
            values = self.decoder(z).squeeze(-1)
        elif self.value_samples > 0:
            eps = self.value_eps.view(-1, *([1] * (mu.dim() - 1)), mu.shape[-1])  # (K, 1, ..., 1, Z)
            values = self.decoder(mu + torch.exp(0.5 * logvar) * eps).squeeze(-1).mean(0)
            z = mu
        else:
            z = mu
            values = self.decoder(z).squeeze(-1)
        aux = None if self.aux is None else self.aux(hidden if self.aux_input == "hidden" else z)
        return ValueOutput(values=self._denormalize(values), mu=mu, logvar=logvar, aux=aux)

    def _denormalize(self, values: Tensor) -> Tensor:
        return values if self.return_norm is None else self.return_norm.denormalize(values)

    def normalize(self, x: Tensor) -> Tensor:
        """Values or returns in the units the value loss uses (standardized with ``normalize_values``)."""
        return x if self.return_norm is None else self.return_norm.normalize(x)


class ValueModel(nn.Module):
    """Critic: a transformer body and a :class:`ValueHead`, evaluated at the response positions."""

    def __init__(self, backbone: nn.Module, head: ValueHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, num_response: int,
        sample: bool = False, generator: torch.Generator | None = None, noise: Tensor | None = None,
        prompt_width: int | None = None, pack: bool = False,
    ) -> ValueOutput:
        """
        Args:
            input_ids: (B, T) prompt + response tokens.
            attention_mask: (B, T).
            position_ids: (B, T).
            num_response: A, the number of response positions at the end of the sequence.
            sample: see :meth:`ValueHead.forward`.
            generator: see :meth:`ValueHead.forward`.
            noise: see :meth:`ValueHead.forward`.
            prompt_width: P, the prompt columns (T = P + A): given, rows that repeat a prompt compute it once
                (:mod:`vrpo_pl.prefix`); None, or no prompt repeated: one plain pass of the body.
            pack: one packed call of the body over the rows' real tokens where it allows (:mod:`vrpo_pl.packing`),
                sharing prompts when ``prompt_width`` is given; values past each response's end are the head's
                output at a zero hidden state (masked by every loss).
        """
        if pack and packable(self.backbone, attention_mask, num_response):
            hidden = packed_hidden(self.backbone, input_ids, attention_mask, position_ids, num_response,
                                   share_prompts=prompt_width is not None)
            return self.head(hidden, sample=sample, generator=generator, noise=noise)
        shared = shared_prompts_for(self.backbone, input_ids, attention_mask, num_response, prompt_width)
        if shared is not None:
            hidden = shared_prefix_hidden(self.backbone, input_ids, attention_mask, position_ids, shared)
        else:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            # V(s_t) for s_t = (x, y_<t) is read at the last token of s_t: positions T-A-1 .. T-2.
            hidden = out.last_hidden_state[:, -num_response - 1 : -1]
        return self.head(hidden, sample=sample, generator=generator, noise=noise)
