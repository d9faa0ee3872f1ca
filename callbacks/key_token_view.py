"""The key-word view: which tokens the critic credits, on a few fixed validation prompts.

At every validation (and before training when the module validates at start) the policy answers the first
``num_prompts`` validation prompts greedily; for each response token the view shows the critic's value V_t, the
GAE advantage A_t (against the gold reward, with the KL penalty, not whitened), and the guide's entropy H_t and
surprisal S_t. It writes a Markdown table (TensorBoard text ``key_tokens``) and a heat map image
(``key_tokens/heatmap``): rows are the quantities, columns the tokens. Each quantity has one colour scale shared by
every prompt of the image (:func:`row_scales`): the advantage on a diverging scale centred at 0 (red negative, blue
positive, white 0), so a wrong answer's negative advantages never look like a right answer's positive ones; the
value on the reward's scale (it predicts the return); entropy and surprisal from 0.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

ROWS = ("advantage", "value", "entropy", "surprisal")


def token_table(view: dict[str, Any], max_tokens: int = 48) -> str:
    """A Markdown table of one response's per-token quantities (tokens as columns, quantities as rows)."""
    tokens = [t.replace("|", "\\|").replace("\n", "⏎") or "␣" for t in view["tokens"][:max_tokens]]
    lines = [f"**prompt:** {view['prompt']}  ", f"**gold reward:** {view['gold']:.2f}", "",
             "| | " + " | ".join(f"`{t}`" for t in tokens) + " |", "|---|" + "---|" * len(tokens)]
    for row in ROWS:
        if view.get(row) is not None:
            lines.append(f"| {row} | " + " | ".join(f"{v:.2f}" for v in view[row][:max_tokens]) + " |")
    return "\n".join(lines)


def row_scales(views: list[dict[str, Any]], max_tokens: int = 32) -> dict[str, tuple[str, float, float]]:
    """The colour map and (low, high) of each quantity, shared by all ``views`` (see the module docstring)."""
    def values(row: str) -> list[float]:
        return [x for v in views if v.get(row) is not None for x in v[row][:max_tokens]]

    scales = {}
    advantage = values("advantage")
    if advantage:
        extent = max(max(abs(x) for x in advantage), 1e-6)
        scales["advantage"] = ("RdBu", -extent, extent)
    value = values("value")
    if value:
        golds = [v["gold"] for v in views]
        scales["value"] = ("viridis", min(0.0, *golds, *value), max(1.0, *golds, *value))
    for row in ("entropy", "surprisal"):
        if values(row):
            scales[row] = ("magma", 0.0, max(max(values(row)), 1e-6))
    return scales


def heatmap_figure(views: list[dict[str, Any]], max_tokens: int = 32):
    """A matplotlib figure: one panel per response, rows = quantities, columns = tokens, colour on the shared scales
    of :func:`row_scales` (each row label names its scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = row_scales(views, max_tokens)
    fig, axes = plt.subplots(len(views), 1, figsize=(min(2 + 0.55 * max_tokens, 22), 2.2 * len(views)), squeeze=False)
    for ax, view in zip(axes[:, 0], views, strict=True):
        rows = [r for r in ROWS if view.get(r) is not None]
        tokens = [repr(t)[1:-1] for t in view["tokens"][:max_tokens]]
        for i, row in enumerate(rows):
            cmap, low, high = scales[row]
            data = torch.tensor([view[row][:max_tokens]], dtype=torch.float).numpy()
            ax.imshow(data, aspect="auto", cmap=cmap, vmin=low, vmax=high,
                      extent=(-0.5, len(tokens) - 0.5, i + 0.5, i - 0.5))
        ax.set_ylim(len(rows) - 0.5, -0.5)
        labels = [f"{r} [{scales[r][1]:.2g}, {scales[r][2]:.2g}]" for r in rows]
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.set_xticks(range(len(tokens)), tokens, rotation=60, fontsize=7, ha="right")
        ax.set_title(f"{view['prompt'][-70:]}  (gold {view['gold']:.0f})", fontsize=8)
    fig.suptitle("advantage: red < 0 < blue, one scale for all prompts; value: the reward's scale", fontsize=8)
    fig.tight_layout()
    return fig


class KeyTokenView(pl.Callback):
    """Logs per-token value, advantage, guide entropy and surprisal for a few fixed validation prompts."""

    def __init__(self, num_prompts: int = 3, max_tokens: int = 32) -> None:
        """
        Args:
            num_prompts: how many of the first validation prompts to show.
            max_tokens: longest response shown, in tokens.
        """
        if num_prompts < 1 or max_tokens < 1:
            raise ValueError("KeyTokenView: num_prompts and max_tokens must be >= 1")
        self.num_prompts, self.max_tokens = num_prompts, max_tokens

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None:
            return
        batch = next(iter(datamodule.val_dataloader()))
        batch = {k: v[: self.num_prompts] for k, v in batch.items()}
        # Every rank runs the forward passes (they are collective under FSDP); only rank 0 writes.
        views = pl_module.token_view(batch)
        if not trainer.is_global_zero:
            return
        table = "\n\n".join(token_table(v, self.max_tokens) for v in views)
        figure = heatmap_figure(views, self.max_tokens)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("key_tokens", table, global_step=pl_module.rollouts)
                experiment.add_figure("key_tokens/heatmap", figure, global_step=pl_module.rollouts)
        import matplotlib.pyplot as plt

        plt.close(figure)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.rollouts == 0:
            self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)
