"""Tests of the data package: sources (JSONL, Parquet, reasoning-gym) and the data module (batches, resume, DDP)."""

from __future__ import annotations

import json
import pickle
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from vrpo_pl.data import (
    JsonlSource,
    ParquetSource,
    PromptDataModule,
    ReasoningGymSource,
    collate_prompts,
    shard_validation,
)

CHAIN_SUM_1_DIGIT = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
"""About 200 distinct questions: small enough that training draws hit validation questions often."""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def numbered_rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}", "answer": i, "level": i % 3} for i in range(n)]


@pytest.fixture(scope="module")
def chain_sum() -> ReasoningGymSource:
    return ReasoningGymSource("chain_sum", params=CHAIN_SUM_1_DIGIT, size=500)


def stub_trainer(rank: int = 0, world_size: int = 1, training: bool = True) -> SimpleNamespace:
    """What the data module reads from a Trainer (a single-device strategy gives no sampler arguments)."""
    kwargs = {"rank": rank, "num_replicas": world_size} if world_size > 1 else None
    return SimpleNamespace(distributed_sampler_kwargs=kwargs, training=training)


def take(module: PromptDataModule, n: int) -> list[dict]:
    return list(islice(iter(module.train_dataloader()), n))


def consume(module: PromptDataModule, n: int) -> list[dict]:
    """Consumes n batches as Lightning does: the hook runs on each, and the loader has prefetched one more."""
    module.trainer = module.trainer or stub_trainer()
    batches = take(module, n + 1)[:n]
    for batch in batches:
        module.on_before_batch_transfer(batch, 0)
    return batches


# ---------------------------------------------------------------- JSONL


def test_jsonl_records_and_split(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"prompt": "q0", "answer": 4, "level": 1}\n\n   \n{"prompt": "q1"}\n'
        + "".join(json.dumps(row) + "\n" for row in numbered_rows(12)[2:]),
        encoding="utf-8",
    )
    source = JsonlSource(path)
    rows = source.validation_records(3) + list(islice(source.records("train", val_size=3), 9))
    first = next(row for row in rows if row["prompt"] == "q0")
    assert first == {"id": "data.jsonl:1", "prompt": "q0", "answer": "4", "metadata": {"level": 1}}
    assert next(row for row in rows if row["prompt"] == "q1") == {
        "id": "data.jsonl:4",
        "prompt": "q1",
        "answer": None,
        "metadata": {},
    }
    val = source.validation_records(3)
    assert len(val) == 3 and len({r["prompt"] for r in val}) == 3
    assert val == JsonlSource(path).validation_records(3)


def test_jsonl_train_stream_cycles_with_fresh_shuffles(tmp_path: Path) -> None:
    source = JsonlSource(write_jsonl(tmp_path / "d.jsonl", numbered_rows(10)))
    val_prompts = {r["prompt"] for r in source.validation_records(2)}
    stream = [r["prompt"] for r in islice(source.records("train", val_size=2, seed=5), 24)]
    epochs = [stream[:8], stream[8:16], stream[16:]]
    assert all(sorted(epoch) == sorted({f"q{i}" for i in range(10)} - val_prompts) for epoch in epochs)
    assert epochs[0] != epochs[1]
    again = [r["prompt"] for r in islice(source.records("train", val_size=2, seed=5, start=8), 16)]
    assert again == stream[8:]


def test_jsonl_id_key_and_duplicate_prompts(tmp_path: Path) -> None:
    rows = [{"prompt": "same", "uid": "a"}, {"prompt": "same", "uid": "b"}, {"prompt": "other", "uid": "c"}]
    source = JsonlSource(write_jsonl(tmp_path / "d.jsonl", rows), id_key="uid")
    val = source.validation_records(1)
    train = list(islice(source.records("train", val_size=1, seed=0), 4))
    assert all(r["prompt"] != val[0]["prompt"] for r in train)
    assert {r["id"] for r in val + train} <= {"a", "b", "c"}


@pytest.mark.parametrize(
    ("content", "location", "words"),
    [
        (b'{"prompt": "a"}\n{"prompt": "b"\n', ":2:", "not valid JSON"),
        (b'{"prompt": "a"}\n\n{"question": "b"}\n', ":3:", "no 'prompt' key"),
        (b'{"prompt": "a"}\n{"prompt": "   "}\n', ":2:", "empty"),
        (b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', ":2:", "not valid UTF-8"),
        (b'{"prompt": "a"}\n[1, 2]\n', ":2:", "expected a JSON object"),
        (b"\n  \n", "", "no records"),
        (b'{"prompt": "a"}\n{"prompt": "b"}\n', "", "needs at least 3"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, content: bytes, location: str, words: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=words) as error:
        JsonlSource(path).validation_records(2)
    assert f"{path}{location}" in str(error.value)
    assert ";" in str(error.value)  # says what to do


def test_records_rejects_unknown_split(tmp_path: Path) -> None:
    source = JsonlSource(write_jsonl(tmp_path / "d.jsonl", numbered_rows(3)))
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'test'"):
        source.records("test", val_size=1)  # type: ignore[arg-type]


def test_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        JsonlSource(tmp_path / "missing.jsonl")


def test_too_few_distinct_prompts(tmp_path: Path) -> None:
    source = JsonlSource(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}] * 5))
    with pytest.raises(ValueError, match="only 1 distinct prompts, fewer than --data.val_size=2"):
        source.validation_records(2)
    with pytest.raises(ValueError, match="none is left to train on"):
        source.validation_records(1)


# ---------------------------------------------------------------- Parquet


def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": f"q{i}", "gold": str(i), "src": "x"} for i in range(6)]), path)
    source = ParquetSource(path, prompt_key="text", answer_key="gold")
    train = list(islice(source.records("train", val_size=2), 4))
    records = sorted(source.validation_records(2) + train, key=lambda r: r["id"])
    assert records[0] == {"id": "d.parquet:1", "prompt": "q0", "answer": "0", "metadata": {"src": "x"}}
    assert len(records) == 6


def test_parquet_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"prompt": None}]), path)
    with pytest.raises(ValueError, match=r"d.parquet row 2: the prompt 'prompt' is empty"):
        ParquetSource(path)
    with pytest.raises(ValueError, match=r"no column 'question' \(columns: \['prompt'\]\); set prompt_key"):
        ParquetSource(path, prompt_key="question")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="fake.parquet: not a readable Parquet file"):
        ParquetSource(tmp_path / "fake.parquet")


# ---------------------------------------------------------------- reasoning-gym


def test_reasoning_gym_records(chain_sum: ReasoningGymSource) -> None:
    record = chain_sum.validation_records(4)[0]
    entry = record["metadata"]["entry"]
    assert record["prompt"] == entry["question"] and record["answer"] == str(entry["answer"])
    assert record["metadata"]["task"] == "chain_sum"
    assert pickle.loads(pickle.dumps(record)) == record
    json.dumps(record)


def test_reasoning_gym_validation_is_fixed(chain_sum: ReasoningGymSource) -> None:
    val = chain_sum.validation_records(64)
    assert len({r["prompt"] for r in val}) == 64
    assert val == ReasoningGymSource("chain_sum", params=CHAIN_SUM_1_DIGIT, size=500).validation_records(64)
    modules = [PromptDataModule(chain_sum, val_size=64, seed=seed) for seed in (0, 1)]
    assert [b["prompt"] for b in modules[0].val_dataloader()] == [b["prompt"] for b in modules[1].val_dataloader()]


def test_reasoning_gym_training_never_shows_validation(chain_sum: ReasoningGymSource) -> None:
    module = PromptDataModule(chain_sum, prompts_per_rollout=8, val_size=64)
    val_prompts = {r["prompt"] for r in chain_sum.validation_records(64)}
    prompts = [p for batch in take(module, 50) for p in batch["prompt"]]
    assert not val_prompts & set(prompts)
    assert len(set(prompts)) > 100  # the space minus validation is still well covered


def test_reasoning_gym_stream_depends_on_seed(chain_sum: ReasoningGymSource) -> None:
    def prompts(seed: int) -> list[str]:
        return [p for b in take(PromptDataModule(chain_sum, val_size=16, seed=seed), 5) for p in b["prompt"]]

    assert prompts(3) == prompts(3)
    assert prompts(3) != prompts(4)


def test_reasoning_gym_stream_spans_chunks() -> None:
    source = ReasoningGymSource("chain_sum", size=7)
    records = list(islice(source.records("train", val_size=2, seed=0), 30))
    assert len({r["id"].split("/")[1] for r in records}) == 5  # 30 records in chunks of 7
    assert records == list(islice(source.records("train", val_size=2, seed=0), 30))


def test_reasoning_gym_unknown_task() -> None:
    with pytest.raises(ValueError, match=r"Unknown reasoning-gym task 'chainsum' \(close names: chain_sum") as error:
        ReasoningGymSource("chainsum")
    assert "reasoning_gym.factory.DATASETS" in str(error.value)


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"max_term": 3}, "task 'chain_sum' has no parameter 'max_term'; its parameters are: .*max_terms"),
        ({"min_terms": 5, "max_terms": 2}, "task 'chain_sum' rejected params .*max_terms must be >= min_terms"),
        ({"seed": 3}, "must not set \\['seed'\\]: use --data.seed"),
    ],
)
def test_reasoning_gym_bad_params(params: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ReasoningGymSource("chain_sum", params=params)


def test_reasoning_gym_too_small_for_val_size(chain_sum: ReasoningGymSource) -> None:
    with pytest.raises(ValueError, match="distinct questions .* fewer than --data.val_size=300"):
        chain_sum.validation_records(300)


# ---------------------------------------------------------------- data module


@pytest.fixture
def file_source(tmp_path: Path) -> JsonlSource:
    return JsonlSource(write_jsonl(tmp_path / "d.jsonl", numbered_rows(40)))


@pytest.mark.parametrize("flag", ["prompts_per_rollout", "samples_per_prompt", "val_size", "val_batch_size"])
def test_datamodule_rejects_bad_sizes(file_source: JsonlSource, flag: str) -> None:
    with pytest.raises(ValueError, match=f"--data.{flag} must be >= 1, got 0"):
        PromptDataModule(file_source, **{flag: 0})


def test_train_batches_repeat_each_prompt(file_source: JsonlSource) -> None:
    module = PromptDataModule(file_source, prompts_per_rollout=3, samples_per_prompt=4, val_size=5)
    assert module.rollout_batch_size == 12
    batch = take(module, 1)[0]
    assert set(batch) == {"id", "prompt", "answer", "metadata", "group"}
    assert all(len(batch[key]) == 12 for key in batch)
    assert batch["group"].dtype == torch.long and batch["group"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for group in range(3):
        copies = batch["prompt"][4 * group : 4 * group + 4]
        assert len(set(copies)) == 1
    assert isinstance(batch["metadata"][0], dict) and isinstance(batch["metadata"][0]["level"], int)


def test_val_batches(file_source: JsonlSource) -> None:
    module = PromptDataModule(file_source, samples_per_prompt=4, val_size=10, val_batch_size=4)
    batches = list(module.val_dataloader())
    assert [len(b["prompt"]) for b in batches] == [4, 3, 3]
    assert [b["group"].tolist() for b in batches] == [[0, 1, 2, 3], [0, 1, 2], [0, 1, 2]]
    assert [p for b in batches for p in b["prompt"]] == [r["prompt"] for r in file_source.validation_records(10)]


@pytest.mark.parametrize("source_name", ["file", "reasoning_gym"])
def test_resume_continues_the_exact_stream(source_name: str, file_source: JsonlSource, chain_sum) -> None:
    source = file_source if source_name == "file" else chain_sum
    settings = {"prompts_per_rollout": 4, "samples_per_prompt": 2, "val_size": 8, "seed": 7}
    uninterrupted = [b["id"] for b in take(PromptDataModule(source, **settings), 15)]
    first = PromptDataModule(source, **settings)
    assert [b["id"] for b in consume(first, 6)] == uninterrupted[:6]
    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = PromptDataModule(source, **settings)
    resumed.load_state_dict(state)
    assert [b["id"] for b in take(resumed, 9)] == uninterrupted[6:]


def test_hook_counts_training_batches_only(file_source: JsonlSource) -> None:
    module = PromptDataModule(file_source, prompts_per_rollout=3, val_size=5)
    batch = take(module, 1)[0]
    module.on_before_batch_transfer(batch, 0)  # no trainer: not counted
    module.trainer = stub_trainer(training=False)
    module.on_before_batch_transfer(batch, 0)  # validation or sanity check: not counted
    assert module.state_dict()["records_consumed"] == 0
    module.trainer = stub_trainer(training=True)
    module.on_before_batch_transfer(batch, 0)
    assert module.state_dict()["records_consumed"] == 3


def test_new_iteration_starts_after_last_consumed_batch(file_source: JsonlSource) -> None:
    module = PromptDataModule(file_source, prompts_per_rollout=2, val_size=5)
    uninterrupted = [b["id"] for b in take(PromptDataModule(file_source, prompts_per_rollout=2, val_size=5), 7)]
    consumed = consume(module, 4)  # one Lightning "epoch" of 4 batches; the loader prefetched a 5th
    following = [b["id"] for b in take(module, 3)]  # the next epoch iterates the same loader anew
    assert [b["id"] for b in consumed] + following == uninterrupted


def test_load_state_dict_warns_on_changed_seed(file_source: JsonlSource) -> None:
    module = PromptDataModule(file_source, val_size=5, seed=1)
    with pytest.warns(UserWarning, match="--data.seed=1 but the checkpoint used 0"):
        module.load_state_dict({"records_consumed": 8, "seed": 0, "val_size": 5})


def test_ranks_split_the_global_stream(file_source: JsonlSource) -> None:
    settings = {"prompts_per_rollout": 3, "val_size": 6, "seed": 2}
    single = [b["id"] for b in take(PromptDataModule(file_source, **settings), 6)]
    ranks = []
    for rank in range(2):
        module = PromptDataModule(file_source, **settings)
        module.trainer = stub_trainer(rank=rank, world_size=2)
        ranks.append([b["id"] for b in consume(module, 3)])
        assert module.state_dict()["records_consumed"] == 3 * 3 * 2
    assert [ranks[i % 2][i // 2] for i in range(6)] == single
    resumed = PromptDataModule(file_source, **settings)  # resume on one process: continues after both ranks
    resumed.load_state_dict(module.state_dict())
    assert [b["id"] for b in take(resumed, 2)] == [b["id"] for b in take(PromptDataModule(file_source, **settings), 8)][
        6:
    ]


def test_ranks_split_validation_without_overlap(file_source: JsonlSource) -> None:
    shards = []
    for rank in range(3):
        module = PromptDataModule(file_source, val_size=11, val_batch_size=2)
        module.trainer = stub_trainer(rank=rank, world_size=3)
        shards.append([b["id"] for b in module.val_dataloader()])
    assert len({len(batches) for batches in shards}) == 1  # same number of validation steps on every rank
    ids = [i for batches in shards for batch in batches for i in batch]
    assert sorted(ids) == sorted(r["id"] for r in file_source.validation_records(11))


def test_shard_validation() -> None:
    assert shard_validation(7, rank=0, world_size=1, batch_size=3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard_validation(7, rank=1, world_size=2, batch_size=2) == [[1, 3], [5]]
    with pytest.raises(ValueError, match="leaves rank 1 an empty batch; make --data.val_size a multiple of 2"):
        shard_validation(3, rank=1, world_size=2, batch_size=1)


def test_collate_prompts_keeps_metadata_dicts() -> None:
    records = [{"id": "a", "prompt": "p", "answer": None, "metadata": {"entry": {"x": (1, 2)}}}]
    batch = collate_prompts(records, samples_per_prompt=2)
    assert batch["metadata"] == [{"entry": {"x": (1, 2)}}] * 2 and batch["answer"] == [None, None]


def test_datamodule_pickles_for_spawned_processes(chain_sum: ReasoningGymSource) -> None:
    module = PromptDataModule(chain_sum, val_size=8)
    take(module, 1)
    clone = pickle.loads(pickle.dumps(module))
    assert [b["id"] for b in take(clone, 2)] == [b["id"] for b in take(module, 2)]


def test_source_is_chosen_by_class_path_and_documented(file_source: JsonlSource, capsys) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PromptDataModule, "data")
    config = parser.parse_args(
        ["--data.source=vrpo_pl.data.JsonlSource", f"--data.source.path={file_source.path}", "--data.val_size=3"]
    )
    module = parser.instantiate(config).data
    assert isinstance(module.source, JsonlSource) and len(module.source.validation_records(3)) == 3
    help_text = parser.format_help()
    assert "Prompts drawn per rollout batch" in help_text and "Responses sampled per prompt" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.source.help=vrpo_pl.data.ReasoningGymSource"])
    assert "Entries per generated chunk" in capsys.readouterr().out


class Recorder(LightningModule):
    """A module that records the ids of the training batches it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["id"])
        return (self.weight**2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, **kwargs,
    )  # fmt: skip


def test_lightning_fit_counts_consumed_batches(file_source: JsonlSource) -> None:
    settings = {"prompts_per_rollout": 2, "val_size": 4}
    module, model = PromptDataModule(file_source, **settings), Recorder()
    quiet_trainer(max_epochs=2, limit_train_batches=2).fit(model, datamodule=module)
    uninterrupted = [b["id"] for b in take(PromptDataModule(file_source, **settings), 5)]
    assert model.seen == uninterrupted[:4]
    resumed = PromptDataModule(file_source, **settings)
    resumed.load_state_dict(module.state_dict())
    assert take(resumed, 1)[0]["id"] == uninterrupted[4]


def test_lightning_checkpoint_resume_continues_the_stream(file_source: JsonlSource, tmp_path: Path) -> None:
    settings = {"prompts_per_rollout": 2, "val_size": 4, "seed": 3}
    uninterrupted = Recorder()
    quiet_trainer(max_steps=5).fit(uninterrupted, datamodule=PromptDataModule(file_source, **settings))
    first, trainer = Recorder(), quiet_trainer(max_steps=3)
    trainer.fit(first, datamodule=PromptDataModule(file_source, **settings))
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    resumed = Recorder()
    quiet_trainer(max_steps=5).fit(
        resumed, datamodule=PromptDataModule(file_source, **settings), ckpt_path=tmp_path / "step3.ckpt"
    )
    assert len(resumed.seen) == 2 and first.seen + resumed.seen == uninterrupted.seen
