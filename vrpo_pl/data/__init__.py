"""Prompt data: sources (JSONL, Parquet, reasoning-gym) and the data module that batches them for rollouts."""

from vrpo_pl.data.datamodule import PromptDataModule, collate_prompts, shard_validation
from vrpo_pl.data.sources import (
    FilePromptSource,
    JsonlSource,
    ParquetSource,
    PromptRecord,
    PromptSource,
    ReasoningGymSource,
    derive_seed,
)

__all__ = [
    "FilePromptSource",
    "JsonlSource",
    "ParquetSource",
    "PromptDataModule",
    "PromptRecord",
    "PromptSource",
    "ReasoningGymSource",
    "collate_prompts",
    "derive_seed",
    "shard_validation",
]
