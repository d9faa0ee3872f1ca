"""Writes a few rollout samples (prompt, response, rewards, advantage) to TensorBoard as a Markdown table."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def samples_markdown(samples: list[dict[str, Any]], max_chars: int = 400) -> str:
    """A Markdown table of samples; cells are cut at ``max_chars`` and pipes/newlines escaped."""

    def cell(value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        text = text if len(text) <= max_chars else text[:max_chars] + "..."
        return text.replace("|", "\\|").replace("\n", " ⏎ ")

    columns = ["prompt", "response", "answer", "reward_train", "reward_gold", "advantage"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(s.get(c, "")) for c in columns) + " |" for s in samples]
    return "\n".join(lines)


class SampleLogger(pl.Callback):
    """Logs ``num_samples`` samples of every ``every_n_rollouts``-th rollout batch under the text tag ``samples``."""

    def __init__(self, every_n_rollouts: int = 10, num_samples: int = 4, max_chars: int = 400) -> None:
        """
        Args:
            every_n_rollouts: log every n-th rollout batch (the first one is always logged).
            num_samples: samples per table.
            max_chars: longest text per cell.
        """
        if every_n_rollouts < 1 or num_samples < 1:
            raise ValueError("SampleLogger: every_n_rollouts and num_samples must be >= 1")
        self.every_n_rollouts, self.num_samples, self.max_chars = every_n_rollouts, num_samples, max_chars

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        samples = pl_module.last_samples
        if not samples or (step - 1) % self.every_n_rollouts != 0 or not trainer.is_global_zero:
            return
        table = samples_markdown(samples[: self.num_samples], self.max_chars)
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("samples", table, global_step=step)
