"""The data module: rollout batches of prompts for training, a fixed validation set, and exact resume.

Training batches come from an infinite stream: global batch ``g`` holds records ``[start + g*P, start + (g+1)*P)``
of the source's training stream (P = prompts_per_rollout), each repeated G = samples_per_prompt times. Because a
source gives random access to its stream, the batches are a pure function of ``(seed, record index)``, and resume
only needs the number of records consumed, counted in :meth:`PromptDataModule.on_before_batch_transfer` (Lightning
fetches one batch ahead, so counting in the iterator would be off by one).

Under DDP (our choice): data-parallel rank ``r`` of ``W`` takes global batches ``r, r + W, r + 2W, ...``, so the
ranks together consume exactly the single-process stream, W batches at a time. The validation set is split without
overlap (rank ``r`` takes records ``r, r + W, ...``) into the same number of batches on every rank, so collective
ops in validation never wait on a rank that has run out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import count, pairwise
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from vrpo_pl.data.sources import PromptRecord, PromptSource


def collate_prompts(records: list[PromptRecord], samples_per_prompt: int = 1) -> dict[str, Any]:
    """A batch (dict of lists) with each record repeated ``samples_per_prompt`` times consecutively.

    Args:
        records: The P prompts of the batch.
        samples_per_prompt: G, the copies of each prompt (one per sampled response).

    Returns:
        ``{"id", "prompt", "answer", "metadata"}``: lists of length B = P * G (copies share their metadata dict),
        and ``"group"``: LongTensor, Shape: (B,), the prompt's index 0..P-1 within the batch.

    >>> batch = collate_prompts([{"id": "a", "prompt": "1+1=", "answer": "2", "metadata": {}}], samples_per_prompt=2)
    >>> batch["prompt"], batch["group"].tolist()
    (['1+1=', '1+1='], [0, 0])
    """
    repeated = [record for record in records for _ in range(samples_per_prompt)]
    batch: dict[str, Any] = {
        key: [record[key] for record in repeated] for key in ("id", "prompt", "answer", "metadata")
    }
    batch["group"] = torch.arange(len(records)).repeat_interleave(samples_per_prompt)
    return batch


def shard_validation(num_records: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """Indices of the validation records each batch of ``rank`` holds.

    Ranks take records ``rank, rank + world_size, ...`` (no overlap, no padding duplicates) and split them into
    the fewest batches of at most ``batch_size`` that the largest shard needs, with near-equal sizes, so every
    rank runs the same number of validation steps.

    >>> shard_validation(5, rank=1, world_size=2, batch_size=4)
    [[1, 3]]
    >>> shard_validation(5, rank=0, world_size=1, batch_size=2)
    [[0, 1], [2, 3], [4]]

    Raises:
        ValueError: When some rank would get an empty batch (fewer records than ranks times batches).
    """
    shard = list(range(rank, num_records, world_size))
    largest = -(-num_records // world_size)
    num_batches = -(-largest // batch_size)
    if len(shard) < num_batches:
        raise ValueError(
            f"--data.val_size={num_records} split over {world_size} processes into {num_batches} batches of at "
            f"most --data.val_batch_size={batch_size} leaves rank {rank} an empty batch; make --data.val_size a "
            f"multiple of {world_size} or raise --data.val_batch_size"
        )
    base, extra = divmod(len(shard), num_batches)
    bounds = [0]
    for i in range(num_batches):
        bounds.append(bounds[-1] + base + (i < extra))
    return [shard[lo:hi] for lo, hi in pairwise(bounds)]


def _keep_batch(batch: dict[str, Any]) -> dict[str, Any]:
    # The default collate would rebuild the metadata dicts; batches are complete already.
    return batch


class _RolloutStream(IterableDataset):
    """Infinite training batches of one rank, from the record the data module says comes next."""

    def __init__(
        self,
        source: PromptSource,
        position: Callable[[], int],
        prompts_per_rollout: int,
        samples_per_prompt: int,
        val_size: int,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.source, self.position = source, position
        self.prompts_per_rollout, self.samples_per_prompt = prompts_per_rollout, samples_per_prompt
        self.val_size, self.seed = val_size, seed
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Read at each iter() (Lightning re-iterates every epoch), so a new epoch starts after the last consumed
        # batch and not after the one Lightning prefetched.
        start, size = self.position(), self.prompts_per_rollout
        for local in count():
            first = start + (local * self.world_size + self.rank) * size
            records = [self.source.train_record(first + k, val_size=self.val_size, seed=self.seed) for k in range(size)]
            yield collate_prompts(records, self.samples_per_prompt)


class _Batches(IterableDataset):
    """A fixed list of batches. Iterable, so Lightning does not inject a DistributedSampler (we shard ourselves)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PromptDataModule(LightningDataModule):
    """Rollout batches of prompts from a :class:`PromptSource`, a fixed validation set, and exact resume.

    Args:
        source: Where prompts come from (``JsonlSource``, ``ParquetSource``, ``ReasoningGymSource``, ...).
        prompts_per_rollout: Prompts drawn per rollout batch (P, per process).
        samples_per_prompt: Responses sampled per prompt (G); >= 2 for GRPO, whose advantages compare a group.
            The rollout batch is B = prompts_per_rollout * samples_per_prompt.
        val_size: Prompts held out as the fixed validation set, greedy-decoded once per validation. The training
            stream never shows them. The set does not depend on ``seed`` (runs with different seeds are
            evaluated on the same prompts).
        val_batch_size: Most prompts per validation batch.
        seed: Seed of the training stream's order (files) or generation (reasoning-gym).
    """

    def __init__(
        self,
        source: PromptSource,
        prompts_per_rollout: int = 8,
        samples_per_prompt: int = 1,
        val_size: int = 64,
        val_batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for flag, value in (
            ("prompts_per_rollout", prompts_per_rollout),
            ("samples_per_prompt", samples_per_prompt),
            ("val_size", val_size),
            ("val_batch_size", val_batch_size),
        ):
            if value < 1:
                raise ValueError(f"--data.{flag} must be >= 1, got {value}")
        self.source = source
        self.prompts_per_rollout = prompts_per_rollout
        self.samples_per_prompt = samples_per_prompt
        self.val_size = val_size
        self.val_batch_size = val_batch_size
        self.seed = seed
        self._records_consumed = 0

    @property
    def rollout_batch_size(self) -> int:
        """B = prompts_per_rollout * samples_per_prompt: responses per rollout batch and process."""
        return self.prompts_per_rollout * self.samples_per_prompt

    def _rank_and_world(self) -> tuple[int, int]:
        """This process's data-parallel rank and the number of data-parallel ranks.

        Read from the strategy's sampler arguments rather than ``trainer.world_size``: under tensor parallelism
        (``ModelParallelStrategy``) the ranks of one model replica must see the same prompts.
        """
        kwargs = None if self.trainer is None else self.trainer.distributed_sampler_kwargs
        if not kwargs:
            return 0, 1
        return kwargs["rank"], kwargs["num_replicas"]

    def _position(self) -> int:
        return self._records_consumed

    def setup(self, stage: str) -> None:
        """Builds the validation split now, so a source too small for ``val_size`` fails before any model work."""
        self.source.validation_records(self.val_size)

    def train_dataloader(self) -> DataLoader:
        """Infinite rollout batches (see :func:`collate_prompts`), continuing after the last consumed batch."""
        rank, world_size = self._rank_and_world()
        stream = _RolloutStream(
            self.source,
            self._position,
            self.prompts_per_rollout,
            self.samples_per_prompt,
            self.val_size,
            self.seed,
            rank,
            world_size,
        )
        return DataLoader(stream, batch_size=None, num_workers=0, collate_fn=_keep_batch)

    def val_dataloader(self) -> DataLoader:
        """This rank's share of the validation set, G = 1, in batches of at most ``val_batch_size``."""
        rank, world_size = self._rank_and_world()
        records = self.source.validation_records(self.val_size)
        batches = [
            collate_prompts([records[i] for i in indices])
            for indices in shard_validation(len(records), rank, world_size, self.val_batch_size)
        ]
        return DataLoader(_Batches(batches), batch_size=None, num_workers=0, collate_fn=_keep_batch)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Counts a training batch as consumed: all ranks together consume ``world_size`` batches per step."""
        if self.trainer is not None and self.trainer.training:
            self._records_consumed += self.prompts_per_rollout * self._rank_and_world()[1]
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (records consumed by all ranks) and what it depends on."""
        return {"records_consumed": self._records_consumed, "seed": self.seed, "val_size": self.val_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the position; the next ``train_dataloader()`` iteration starts at the following batch."""
        self._records_consumed = state_dict["records_consumed"]
        for key in ("seed", "val_size"):
            if state_dict[key] != getattr(self, key):
                rank_zero_warn(
                    f"Resuming with --data.{key}={getattr(self, key)} but the checkpoint used {state_dict[key]}: "
                    f"the training stream continues at record {self._records_consumed} of a different stream"
                )
