"""Writes every validation's per-question results (gold reward, response) to a JSON-lines file.

The system's ``val/accuracy`` is a mean; a study needs each question's outcome to compare algorithms question by
question (paired differences, bootstrap intervals over seeds and questions: ``benchmarks/robustness.py``). One line
per question and validation: ``{"rollout", "rank", "id", "gold", "length", "response"}``, in
``<trainer.log_dir>/val_outcomes.jsonl`` (one file per rank beyond the first: ``val_outcomes.rank<r>.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class ValidationOutcomes(pl.Callback):
    """Appends ``RLSystem.last_validation`` to a JSON-lines file after each validation (also the one at start)."""

    def __init__(self, dirpath: str | None = None) -> None:
        """
        Args:
            dirpath: where to write; None: the trainer's log directory (``trainer.log_dir``).
        """
        self.dirpath = dirpath
        self.written: int | None = None  # the rollout of the last validation written

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = getattr(pl_module, "last_validation", None)
        if not last or last["rollout"] == self.written:
            return
        directory = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        path = directory / ("val_outcomes.jsonl" if rank == 0 else f"val_outcomes.rank{rank}.jsonl")
        with path.open("a") as f:
            for outcome in last["outcomes"]:
                f.write(json.dumps({"rollout": last["rollout"], "rank": rank, **outcome}) + "\n")
        self.written = last["rollout"]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._write(trainer, pl_module)  # the validation before training ran in the module's on_train_start

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"written": self.written}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.written = state_dict["written"]
