"""The model summary printed at the start of ``vrpo fit``: each top-level module's parameters and mode, and the totals.

Lightning's default summary (``RichModelSummary`` or ``ModelSummary``) adds a FLOPs column and a ``Total FLOPs``
line, measured only by running ``example_input_array`` through the model; RLSystem has none (its input is a
rollout), so both are always 0 and only mislead. :class:`ParameterSummary` prints the rest of Lightning's summary;
the ``vrpo`` command puts it in place of Lightning's default (:func:`replace_default_summary`), and
``--trainer.enable_model_summary false`` still turns it off.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_info

NOT_MEASURED = ("FLOPs",)
"""Columns of Lightning's summary data that RLSystem cannot fill (no ``example_input_array``)."""


def parameter_table(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                    model_size: float, total_training_modes: dict[str, int]) -> str:
    """Lightning's summary table and totals without the FLOPs column and total.

    Args:
        summary_data: ``(column name, values)`` pairs, as Lightning's ``ModelSummary._get_summary_data`` gives.
        total_parameters: every parameter.
        trainable_parameters: those that require a gradient.
        model_size: the parameters' size in MB.
        total_training_modes: ``{"train": n, "eval": m}`` module counts.

    >>> print(parameter_table([(" ", ["0"]), ("Name", ["policy"]), ("Params", ["1.0 K"]), ("FLOPs", ["0"])],
    ...                       1000, 1000, 0.004, {"train": 1, "eval": 0}))
      | Name   | Params
    -------------------
    0 | policy | 1.0 K
    -------------------
    1.0 K     Trainable params
    0         Non-trainable params
    1.0 K     Total params
    0.004     Total estimated model params size (MB)
    1         Modules in train mode
    0         Modules in eval mode
    """
    columns = [(name, values) for name, values in summary_data if name not in NOT_MEASURED]
    widths = [max(len(name), *(len(str(v)) for v in values)) for name, values in columns]
    rows = zip(*(values for _, values in columns), strict=True)
    rule = "-" * (sum(widths) + 3 * (len(widths) - 1))
    lines = [" | ".join(f"{name:<{w}}" for (name, _), w in zip(columns, widths, strict=True)).rstrip(), rule]
    lines += [" | ".join(f"{str(v):<{w}}" for v, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(rule)
    totals = [
        (get_human_readable_count(trainable_parameters), "Trainable params"),
        (get_human_readable_count(total_parameters - trainable_parameters), "Non-trainable params"),
        (get_human_readable_count(total_parameters), "Total params"),
        (get_formatted_model_size(model_size), "Total estimated model params size (MB)"),
        (total_training_modes["train"], "Modules in train mode"),
        (total_training_modes["eval"], "Modules in eval mode"),
    ]
    lines += [f"{value!s:<10}{label}" for value, label in totals]
    return "\n".join(lines)


class ParameterSummary(ModelSummary):
    """Lightning's ``ModelSummary`` without the FLOPs it cannot measure here (see :func:`parameter_table`)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        rank_zero_info("\n" + parameter_table(summary_data, total_parameters, trainable_parameters, model_size,
                                              total_training_modes))


def replace_default_summary(callbacks: list) -> None:
    """Puts :class:`ParameterSummary` (same depth) in place of Lightning's own summary callbacks in ``callbacks``
    (in place). The trainer adds one of those unless ``enable_model_summary`` is false; subclasses of them, which a
    user chose, are kept."""
    for index, callback in enumerate(callbacks):
        if type(callback) in (ModelSummary, RichModelSummary):
            callbacks[index] = ParameterSummary(max_depth=callback._max_depth)
