"""Prompt sources: where training and validation prompts come from, plugged in from YAML with ``class_path``.

A source serves two things, both as :class:`PromptRecord` dicts:

- a fixed **validation set** of ``val_size`` records with distinct prompts. It depends on the source alone,
  never on the training seed, so runs with different seeds are evaluated on the same questions (our choice);
- an infinite **training stream** with random access: record ``index`` is a pure function of
  ``(source, val_size, seed, index)``. It never yields a validation prompt (compared by prompt text). Random access
  is what makes resume exact and cheap (the data module jumps to the next record instead of replaying) and lets
  ranks take disjoint slices of one global stream.

Finite files cycle over their training records in epochs, with a fresh seeded shuffle each epoch. reasoning-gym
tasks generate new questions forever, in chunks of ``size`` entries with seeds derived from the training seed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import fields
from itertools import count
from pathlib import Path
from typing import Any, Literal, TypedDict


class PromptRecord(TypedDict):
    """One prompt as the training module sees it."""

    id: str
    """Stable identifier: ``file.jsonl:12`` (file and line) or ``task/seed/index`` (reasoning-gym)."""
    prompt: str
    """The task's prompt text, before any chat template."""
    answer: str | None
    """The reference answer as text, or None when the data has none."""
    metadata: dict[str, Any]
    """Everything else (files: the row's other keys; reasoning-gym: ``{"task": name, "entry": entry}``)."""


def derive_seed(*parts: object) -> int:
    """A seed in ``[0, 2**31)`` determined by ``parts``, stable across processes (unlike ``hash``).

    >>> derive_seed(0, "train", 3) == derive_seed(0, "train", 3) != derive_seed(1, "train", 3)
    True
    """
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**31


def _check_val_size(val_size: int) -> None:
    if val_size < 1:
        raise ValueError(f"--data.val_size must be >= 1, got {val_size}")


class PromptSource(ABC):
    """Base class of every prompt source: a fixed validation set plus an infinite, seeded training stream."""

    @abstractmethod
    def validation_records(self, val_size: int) -> list[PromptRecord]:
        """The held-out validation set: the same ``val_size`` records, with distinct prompts, on every call.

        Raises:
            ValueError: When the source cannot provide ``val_size`` distinct prompts plus one to train on.
        """

    @abstractmethod
    def train_record(self, index: int, *, val_size: int, seed: int) -> PromptRecord:
        """Record ``index`` (>= 0) of the infinite training stream; never one of the validation prompts."""

    def records(
        self, split: Literal["train", "val"], *, val_size: int, seed: int = 0, start: int = 0
    ) -> Iterator[PromptRecord]:
        """Iterates over a split from record ``start`` on.

        Args:
            split: ``"val"`` for the finite validation set, ``"train"`` for the infinite training stream.
            val_size: Size of the validation set (the training stream excludes its prompts).
            seed: Seed of the training stream; the validation set ignores it.
            start: Index of the first record to yield.

        Raises:
            ValueError: For an unknown split.
        """
        if split == "val":
            return iter(self.validation_records(val_size)[start:])
        if split == "train":
            return (self.train_record(index, val_size=val_size, seed=seed) for index in count(start))
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


class FilePromptSource(PromptSource):
    """Base class of sources that read every record of a file into memory at construction.

    The validation set is the first ``val_size`` distinct prompts of a fixed shuffle of the file (kept in file
    order); the training records are all rows whose prompt is not a validation prompt.

    Args:
        path: The file (relative paths resolve from the working directory).
        prompt_key: Key (column) of the prompt text.
        answer_key: Key (column) of the reference answer; optional in each record.
        id_key: Key (column) of a record id; None names records by file and line (row), from 1.

    Raises:
        FileNotFoundError: When ``path`` is not a file.
        ValueError: For a malformed record (naming file and line) or a file without records.
    """

    def __init__(self, path: str | Path, prompt_key: str, answer_key: str, id_key: str | None) -> None:
        self.path = Path(path)
        self.prompt_key = prompt_key
        self.answer_key = answer_key
        self.id_key = id_key
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no such file (resolved to {self.path.resolve()}); fix the source's path argument"
            )
        self._rows = self._read_rows()
        if not self._rows:
            raise ValueError(f"{self.path}: the file holds no records; add at least one {prompt_key!r} record")
        self._splits: dict[int, tuple[list[PromptRecord], list[PromptRecord]]] = {}
        self._order: tuple[tuple[int, int, int], list[int]] | None = None

    @abstractmethod
    def _read_rows(self) -> list[PromptRecord]:
        """Reads and validates every record of the file (with :meth:`_make_record`)."""

    def _make_record(self, row: object, where: str, default_id: str) -> PromptRecord:
        """Turns one parsed row into a record, with errors that name ``where`` (``file:line``)."""
        if not isinstance(row, dict):
            raise ValueError(  # noqa: TRY004 (a malformed line is a data error, raised like the others)
                f"{where}: expected a JSON object, got {type(row).__name__}; write one object a line"
            )
        if self.prompt_key not in row:
            raise ValueError(
                f"{where}: no {self.prompt_key!r} key (keys: {sorted(row)}); add it or set prompt_key to the "
                "key that holds the prompt"
            )
        prompt = row[self.prompt_key]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"{where}: the prompt {self.prompt_key!r} is empty or not text ({prompt!r}); fix or drop it"
            )
        answer = row.get(self.answer_key)
        record_id = default_id
        if self.id_key is not None:
            if row.get(self.id_key) is None:
                raise ValueError(f"{where}: no {self.id_key!r} key for the record id; add it or set id_key: null")
            record_id = str(row[self.id_key])
        skip = {self.prompt_key, self.answer_key, self.id_key}
        return PromptRecord(
            id=record_id,
            prompt=prompt,
            answer=None if answer is None else str(answer),
            metadata={key: value for key, value in row.items() if key not in skip},
        )

    def _split(self, val_size: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
        """The (validation, training) records for ``val_size``, computed once per size."""
        if val_size in self._splits:
            return self._splits[val_size]
        _check_val_size(val_size)
        rows = self._rows
        if len(rows) < val_size + 1:
            raise ValueError(
                f"{self.path}: {len(rows)} records, but --data.val_size={val_size} needs at least {val_size + 1} "
                f"({val_size} held out, 1 or more to train on); add records or lower --data.val_size"
            )
        order = list(range(len(rows)))
        random.Random(derive_seed("val")).shuffle(order)
        chosen: dict[str, int] = {}
        for i in order:
            chosen.setdefault(rows[i]["prompt"], i)
            if len(chosen) == val_size:
                break
        if len(chosen) < val_size:
            raise ValueError(
                f"{self.path}: only {len(chosen)} distinct prompts, fewer than --data.val_size={val_size}; "
                "lower --data.val_size"
            )
        train = [row for row in rows if row["prompt"] not in chosen]
        if not train:
            raise ValueError(
                f"{self.path}: every record repeats a validation prompt, none is left to train on; "
                "lower --data.val_size or add distinct prompts"
            )
        self._splits[val_size] = ([rows[i] for i in sorted(chosen.values())], train)
        return self._splits[val_size]

    def validation_records(self, val_size: int) -> list[PromptRecord]:
        """See :meth:`PromptSource.validation_records`."""
        return self._split(val_size)[0]

    def first_without_answer(self) -> PromptRecord | None:
        """The first record of the file without a reference answer (``answer_key``), or None when all have one.
        Its ``id`` is ``file:line`` unless ``id_key`` is set."""
        return next((row for row in self._rows if row["answer"] is None), None)

    def train_record(self, index: int, *, val_size: int, seed: int) -> PromptRecord:
        """See :meth:`PromptSource.train_record`: epoch ``e`` visits every training record once, shuffled with
        a seed derived from ``(seed, e)``."""
        train = self._split(val_size)[1]
        epoch, position = divmod(index, len(train))
        key = (val_size, seed, epoch)
        if self._order is None or self._order[0] != key:
            order = list(range(len(train)))
            random.Random(derive_seed(seed, "train", epoch)).shuffle(order)
            self._order = (key, order)
        return train[self._order[1][position]]


class JsonlSource(FilePromptSource):
    """Prompts from a JSON Lines file: one JSON object a line, blank lines skipped.

    Args:
        path: The ``.jsonl`` file (relative paths resolve from the working directory).
        prompt_key: Key of the prompt text in each object.
        answer_key: Key of the reference answer (optional in each object; numbers become text).
        id_key: Key of a record id; None names records by file and line (``data.jsonl:12``).

    Every other key of an object goes into the record's ``metadata``.
    """

    def __init__(
        self, path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer", id_key: str | None = None
    ) -> None:
        super().__init__(path, prompt_key, answer_key, id_key)

    def _read_rows(self) -> list[PromptRecord]:
        rows = []
        with self.path.open("rb") as file:
            for line_number, raw in enumerate(file, start=1):
                where = f"{self.path}:{line_number}"
                try:
                    line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"{where}: not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                        "re-save the file as UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{where}: not valid JSON ({err.msg} at column {err.colno}); write one JSON object a line"
                    ) from None
                rows.append(self._make_record(row, where, f"{self.path.name}:{line_number}"))
        return rows


class ParquetSource(FilePromptSource):
    """Prompts from a Parquet file (read with pyarrow), one record a row.

    Args:
        path: The ``.parquet`` file (relative paths resolve from the working directory).
        prompt_key: Column of the prompt text.
        answer_key: Column of the reference answer (optional; numbers become text).
        id_key: Column of a record id; None names records by file and row (``data.parquet:12``, from 1).

    Every other column goes into the record's ``metadata``.
    """

    def __init__(
        self, path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer", id_key: str | None = None
    ) -> None:
        super().__init__(path, prompt_key, answer_key, id_key)

    def _read_rows(self) -> list[PromptRecord]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(self.path)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{self.path}: not a readable Parquet file ({err}); write it with pyarrow") from None
        if self.prompt_key not in table.column_names:
            raise ValueError(
                f"{self.path}: no column {self.prompt_key!r} (columns: {table.column_names}); set prompt_key"
            )
        return [
            self._make_record(row, f"{self.path} row {n}", f"{self.path.name}:{n}")
            for n, row in enumerate(table.to_pylist(), start=1)
        ]


class ReasoningGymSource(PromptSource):
    """Procedurally generated questions from a reasoning-gym task, scored later by the task's own verifier.

    Args:
        task: A reasoning-gym task name, a key of ``reasoning_gym.factory.DATASETS`` (``chain_sum``,
            ``basic_arithmetic``, ``countdown``, ...).
        params: The task's config fields (e.g. ``{min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}``
            for chain_sum); None uses the task's defaults. ``seed`` and ``size`` are set by this source.
        size: Entries per generated chunk. The stream draws chunk after chunk, each with a new derived seed.

    Records: prompt = ``entry["question"]``, answer = ``str(entry["answer"])``, metadata =
    ``{"task": task, "entry": entry}``. Validation uses seeds derived from ``"val"``, training seeds derived from
    the data module's seed; a training question equal to a validation question is replaced by a fresh draw.
    """

    max_redraws = 1000
    """Fresh draws tried for one training record before declaring the task's question space exhausted."""

    def __init__(self, task: str, params: dict[str, Any] | None = None, size: int = 10000) -> None:
        if size < 1:
            raise ValueError(f"ReasoningGymSource size must be >= 1, got {size}")
        self.task = task
        self.params = dict(params or {})
        self.size = size
        _check_task_params(task, self.params)
        self._create(seed=0, size=1)  # runs the task config's own validation now, not mid-training
        self._chunks: dict[int, Any] = {}
        self._val: dict[int, tuple[list[PromptRecord], frozenset[str]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Generated chunks are a cache: drop them rather than pickle them to spawned processes.
        return {**self.__dict__, "_chunks": {}}

    def _create(self, seed: int, size: int) -> Any:
        """A reasoning-gym dataset of this task and params."""
        import reasoning_gym

        try:
            return reasoning_gym.create_dataset(self.task, size=size, seed=seed, **self.params)
        except (AssertionError, TypeError, ValueError) as err:
            raise ValueError(
                f"reasoning-gym task {self.task!r} rejected params {self.params}: {err}; fix that parameter"
            ) from None

    def _entry(self, stream: str, index: int) -> tuple[dict[str, Any], str]:
        """Entry ``index`` of a stream of chunks whose seeds derive from ``stream``, with its record id."""
        chunk, position = divmod(index, self.size)
        seed = derive_seed(stream, chunk)
        if seed not in self._chunks:
            if len(self._chunks) >= 4:
                self._chunks.pop(next(iter(self._chunks)))
            self._chunks[seed] = self._create(seed, self.size)
        return self._chunks[seed][position], f"{self.task}/{seed}/{position}"

    def _record(self, entry: dict[str, Any], record_id: str) -> PromptRecord:
        answer = entry.get("answer")
        return PromptRecord(
            id=record_id,
            prompt=entry["question"],
            answer=None if answer is None else str(answer),
            metadata={"task": self.task, "entry": entry},
        )

    def _validation(self, val_size: int) -> tuple[list[PromptRecord], frozenset[str]]:
        """The validation records and their prompts, generated once per size."""
        if val_size not in self._val:
            _check_val_size(val_size)
            records: dict[str, PromptRecord] = {}
            draws = 10 * val_size + 100
            for index in range(draws):
                entry, record_id = self._entry("val", index)
                records.setdefault(entry["question"], self._record(entry, record_id))
                if len(records) == val_size:
                    break
            else:
                raise ValueError(
                    f"reasoning-gym task {self.task!r} with params {self.params} gave only {len(records)} distinct "
                    f"questions in {draws} draws, fewer than --data.val_size={val_size}; lower --data.val_size "
                    "or widen the task's params"
                )
            self._val[val_size] = (list(records.values()), frozenset(records))
        return self._val[val_size]

    def validation_records(self, val_size: int) -> list[PromptRecord]:
        """See :meth:`PromptSource.validation_records`."""
        return self._validation(val_size)[0]

    def train_record(self, index: int, *, val_size: int, seed: int) -> PromptRecord:
        """See :meth:`PromptSource.train_record`."""
        val_prompts = self._validation(val_size)[1]
        entry, record_id = self._entry(f"train/{seed}", index)
        redraws = 0
        while entry["question"] in val_prompts:
            if redraws == self.max_redraws:
                raise ValueError(
                    f"reasoning-gym task {self.task!r} with params {self.params}: {self.max_redraws} fresh draws "
                    f"for training record {index} were all validation questions; the task has too few distinct "
                    f"questions for --data.val_size={val_size}: lower it or widen the task's params"
                )
            redraws += 1
            redraw_seed = derive_seed("redraw", seed, index, redraws)
            entry, record_id = self._create(redraw_seed, 1)[0], f"{self.task}/{redraw_seed}/0"
        return self._record(entry, record_id)


def _check_task_params(task: str, params: dict[str, Any]) -> None:
    """Checks the task name and the names of its params against reasoning-gym's registry.

    Raises:
        ValueError: For an unknown task (listing close names) or a parameter the task's config lacks.
    """
    import reasoning_gym

    datasets = reasoning_gym.factory.DATASETS
    if task not in datasets:
        close = difflib.get_close_matches(task, list(datasets), n=5, cutoff=0.5)
        hint = f"close names: {', '.join(close)}" if close else f"e.g. {', '.join(sorted(datasets)[:5])}"
        raise ValueError(
            f"Unknown reasoning-gym task {task!r} ({hint}); all {len(datasets)} names are the keys of "
            "reasoning_gym.factory.DATASETS"
        )
    owned = {"seed", "size"} & set(params)
    if owned:
        raise ValueError(
            f"reasoning-gym params for {task!r} must not set {sorted(owned)}: use --data.seed for the seed and "
            "the source's size argument for the chunk size"
        )
    allowed = sorted({f.name for f in fields(datasets[task][1])} - {"seed", "size"})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"reasoning-gym task {task!r} has no parameter {unknown[0]!r}; its parameters are: {', '.join(allowed)}"
        )
