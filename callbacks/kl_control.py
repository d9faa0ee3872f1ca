"""KL coefficient control: fixed, or adaptive toward a target KL (Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences", section 2.2)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def adaptive_kl_update(coef: float, kl: float, target: float, horizon: int, n_samples: int) -> float:
    """One step of Ziegler et al.'s proportional controller.

    e = clip(kl / target - 1, -0.2, 0.2); coef <- coef * (1 + e * n_samples / horizon).

    Args:
        coef: current coefficient.
        kl: measured KL(pi || pi_ref) per sequence, in nats.
        target: target KL per sequence.
        horizon: samples over which the error is corrected (10,000 in the paper).
        n_samples: samples in this rollout batch.

    Raises:
        ValueError: ``horizon <= 0.2 * n_samples``, where one step could take the coefficient to zero or below
            (see :func:`check_horizon`).

    >>> round(adaptive_kl_update(0.1, 12.0, 6.0, 10000, 100), 4)
    0.1002
    """
    check_horizon(horizon, n_samples)
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_samples / horizon)


def check_horizon(horizon: int, n_samples: int) -> None:
    """Refuses a horizon so short that one step of :func:`adaptive_kl_update` can make the coefficient <= 0.

    The factor 1 + e * n_samples / horizon, with e >= -0.2, stays positive only for horizon > 0.2 * n_samples.

    Raises:
        ValueError: naming the horizon, the rollout batch size and the smallest valid horizon.
    """
    if horizon <= 0.2 * n_samples:
        raise ValueError(
            f"KLController: horizon={horizon} must be > 0.2 * {n_samples} = {0.2 * n_samples:g} (the samples per "
            f"rollout batch over all ranks); a shorter horizon can turn the KL coefficient negative in one step "
            "(Ziegler et al. use 10,000)"
        )


class KLController(pl.Callback):
    """Owns the KL coefficient: keeps it fixed (``target=None``) or adapts it after every rollout batch.

    The coefficient starts at ``--model.kl.coef`` and is saved in checkpoints, so a resumed run continues with
    the adapted value.
    """

    def __init__(self, target: float | None = None, horizon: int = 10000) -> None:
        """
        Args:
            target: target KL per sequence in nats (sum over response tokens of the k1 estimate); None keeps the
                coefficient fixed.
            horizon: samples over which the controller corrects the error (Ziegler et al.: 10,000).
        """
        if target is not None and target <= 0:
            raise ValueError(f"KLController: target={target} must be > 0 (or None for a fixed coefficient)")
        if horizon <= 0:
            raise ValueError(f"KLController: horizon={horizon} must be > 0")
        self.target, self.horizon = target, horizon
        self.coef: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks the horizon against the rollout batch size before anything runs."""
        data = trainer.datamodule
        if stage == "fit" and self.target is not None and hasattr(data, "prompts_per_rollout"):
            check_horizon(self.horizon, data.prompts_per_rollout * data.samples_per_prompt * trainer.world_size)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.coef is None:
            self.coef = float(pl_module.kl_coef)
        pl_module.kl_coef = self.coef

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stats = pl_module.last_rollout_stats
        if self.target is None or stats is None or self.coef is None:
            return
        self.coef = adaptive_kl_update(self.coef, stats["kl"], self.target, self.horizon, stats["n_samples"])
        pl_module.kl_coef = self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.coef = state_dict["coef"]
