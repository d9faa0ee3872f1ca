"""Data-parallel training on CPU (gloo, 2 processes): DDP and FSDP2 give the single-process run's metrics and weights.

The 2-process runs are ``vrpo fit`` subprocesses (Lightning's launcher re-executes the ``vrpo`` command for rank 1;
pytest itself is never relaunched). They are compared with an in-process single-process run of the same global
batch: 1 process x 4 prompts against 2 processes x 2 prompts (the data module gives rank r the prompts r*2..r*2+1
of each global batch of 4, see ``PromptDataModule``), one mini-batch per process and PPO epoch (8 sequences on one
process, 4 on each of two). What would make the runs differ by design is switched off:

- sampling: ``top_p=1e-6`` keeps one token in the nucleus, so each process draws the same responses as the single
  process would (the PPO log-probs still use the full distribution, so the update has gradients);
- reward noise (the noise generators are per process): the plain ``NumericVerifier``;
- advantage whitening, whose statistics are per process (``--model.ppo.whiten_advantages false``);
- ``value/explained_variance``, an average of per-process values, is not compared.

Everything else (token-mean losses and statistics over the global batch, the manual DDP gradient all-reduce,
FSDP2's reduce-scatter, gradient clipping, the adaptive KL controller) must then agree to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_CONFIG, data_path_args, shrink_args

from vrpo_pl.checkpoint import SHARDED_METADATA
from vrpo_pl.rewards import NumericVerifier, RewardFunction, RewardScores

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
EQUIVALENT_RUN = [
    "--model.algorithm", "ppo",
    "--model.reward", "vrpo_pl.rewards.NumericVerifier",
    "--model.generation.top_p", "1e-6",
    "--model.ppo.whiten_advantages", "false",
    "--model.ppo.critic_epochs", "null",  # one critic pass: fewer value-clip tokens that float rounding can flip
    "--trainer.val_check_interval", "1",
    "--trainer.callbacks", "[]",
    "--trainer.callbacks+=vrpo_pl.callbacks.KLController",
    "--trainer.callbacks.target", "1.0",
    "--trainer.callbacks.horizon", "100",
]
LORA = ["--model.lora", "{r: 4, alpha: 8}", "--model.critic_lora", "{r: 4, alpha: 8}"]
NOT_COMPARED = ("perf/", "value/explained_variance")


def _checkpoints(directory: Path) -> list[str]:
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath", str(directory), "--trainer.callbacks.save_last", "true",
            "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1"]


class ReplicaReport(pl.Callback):
    """Runs inside the ``vrpo`` subprocesses (imported with ``PYTHONPATH=tests``): after every rollout batch it
    compares the replicas' weights across ranks, and at the end writes what the test checks to ``OUT/rankR.json``."""

    def __init__(self, out: str) -> None:
        self.out, self.max_replica_diff = Path(out), 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from torch.distributed.tensor import DTensor

        params = [p for p in pl_module.parameters() if p.requires_grad]
        # DDP: whole replicas, equal on every rank; FSDP2: each rank's shard, assembled (collective) to compare.
        local = torch.stack([(p.full_tensor() if isinstance(p, DTensor) else p).detach().double().sum()
                             for p in params])
        gathered = pl_module.all_gather(local)
        self.max_replica_diff = max(self.max_replica_diff, float((gathered - gathered[0]).abs().max()))

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor
        from transformers.distributed.fsdp import is_fsdp_managed_module

        optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        frozen_reference = [] if pl_module.reference is None else list(pl_module.reference.parameters())
        hf_models = [m for m in pl_module.policy.modules() if hasattr(m, "generate")]
        report = {
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__, "rollouts": pl_module.rollouts,
            "max_replica_diff": self.max_replica_diff,
            "optimized_is_trainable": optimized == {id(p) for p in trainable},
            "frozen_in_optimizer": any(id(p) in optimized for p in pl_module.parameters() if not p.requires_grad),
            "sharded_trainable": sum(isinstance(p, DTensor) for p in trainable), "trainable": len(trainable),
            "sharded_reference": sum(isinstance(p, DTensor) for p in frozen_reference),
            "generate_synced": all(is_fsdp_managed_module(m) for m in hf_models),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def _run_two_processes(root: Path, strategy: str, *extra: str, timeout: int = 540
                       ) -> tuple[list[dict], subprocess.CompletedProcess]:
    """``vrpo fit`` on 2 CPU processes; returns the ranks' ReplicaReport dicts."""
    args = ["--config", str(TINY_CONFIG), *shrink_args(root, max_steps=STEPS), *data_path_args(TINY_CONFIG),
            *EQUIVALENT_RUN, "--trainer.devices", "2", "--trainer.strategy", strategy,
            "--data.prompts_per_rollout", "2", "--model.ppo.mini_batch_size", "4", *extra,
            "--trainer.callbacks+=test_distributed.ReplicaReport", "--trainer.callbacks.out", str(root / "report")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(Path(sys.executable).parent / "vrpo"), "fit", *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    reports = [json.loads((root / "report" / f"rank{r}.json").read_text()) for r in range(2)]
    return reports, result


def _scalars(events) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if not tag.startswith(NOT_COMPARED)}


def _trainable_from(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _assert_same_metrics(single: dict, other: dict, label: str) -> None:
    assert single.keys() == other.keys(), f"{label}: tags differ: {sorted(single.keys() ^ other.keys())}"
    for tag, values in single.items():
        assert [s for s, _ in other[tag]] == [s for s, _ in values], f"{label}: {tag} logged at other steps"
        # A clip fraction counts tokens on either side of a threshold: a 1e-7 difference in a value that sits on
        # the boundary moves a whole token (1/16 here), so it gets a tolerance of a few tokens; every continuous
        # metric and the weights are held to 1e-4.
        tol = {"rel": 0.0, "abs": 0.13} if tag.endswith("clipfrac") else {"rel": 1e-4, "abs": 1e-5}
        for (step, a), (_, b) in zip(values, other[tag], strict=True):
            assert b == pytest.approx(a, **tol), f"{label}: {tag} at rollout {step}: {b} vs {a}"


def _assert_same_weights(single: dict[str, torch.Tensor], other: dict[str, torch.Tensor], label: str) -> None:
    assert single.keys() == other.keys(), f"{label}: checkpoint tensors differ"
    worst = max(single, key=lambda k: (single[k].float() - other[k].float()).abs().max().item())
    diff = (single[worst].float() - other[worst].float()).abs().max().item()
    assert diff < 1e-5, f"{label}: {worst} differs by {diff} from the single-process run"


@pytest.fixture(scope="module")
def single_runs(run_cli, read_events, tmp_path_factory):
    """The single-process references, full fine-tuning and LoRA: ``{name: (events, weights, checkpoint dir)}``."""
    runs = {}
    for name, extra in (("full", []), ("lora", LORA)):
        root = tmp_path_factory.mktemp(f"single_{name}")
        cli = run_cli(root, *EQUIVALENT_RUN, "--data.prompts_per_rollout", "4", "--model.ppo.mini_batch_size", "8",
                      *extra, *_checkpoints(root / "ckpt"), max_steps=STEPS)
        assert cli.trainer.global_step == STEPS
        runs[name] = (_scalars(read_events(root)), _trainable_from(root / "ckpt" / "last.ckpt"), root / "ckpt")
    return runs


@pytest.mark.slow
def test_ddp_two_processes_match_one(single_runs, read_events, tmp_path):
    """DDP (full fine-tuning): replicas stay identical, and metrics and weights equal the single-process run's."""
    reports, _ = _run_two_processes(tmp_path, "ddp", *_checkpoints(tmp_path / "ckpt"))
    for report in reports:
        assert report["strategy"] == "DDPStrategy" and report["world_size"] == 2 and report["rollouts"] == STEPS
        assert report["max_replica_diff"] == 0.0, "DDP replicas diverged: gradients were not averaged alike"
        assert report["optimized_is_trainable"] and not report["frozen_in_optimizer"]
        assert report["sharded_trainable"] == 0
    events, weights, _ = single_runs["full"]
    _assert_same_metrics(events, _scalars(read_events(tmp_path)), "ddp")
    _assert_same_weights(weights, _trainable_from(tmp_path / "ckpt" / "last.ckpt"), "ddp")


class NaNOnRankOne(RewardFunction):
    """The verifier's training scores, NaN on rank 1 only (a reward that breaks on one rank's samples)."""

    def score(self, completions):
        scores = NumericVerifier().score(completions)
        if os.environ.get("LOCAL_RANK") == "1":
            return RewardScores(train=torch.full_like(scores.train, float("nan")), gold=scores.gold)
        return scores


@pytest.mark.slow
def test_ddp_a_nonfinite_reward_on_one_rank_skips_the_batch_on_every_rank(read_events, tmp_path):
    """Rank 1's reward is NaN, rank 0's is not: both skip (a rank that updated alone would wait forever in the
    gradient all-reduce), and rank 0 says why."""
    reports, result = _run_two_processes(
        tmp_path, "ddp", "--model.reward", "test_distributed.NaNOnRankOne", timeout=240)
    assert [r["rollouts"] for r in reports] == [STEPS, STEPS] and reports[0]["max_replica_diff"] == 0.0
    assert "the reward NaNOnRankOne was not finite on another rank at rollout batch 0" in result.stdout
    assert "reward/train" not in _scalars(read_events(tmp_path)), "nothing was trained on a skipped batch"


SHARDED_FSDP2 = json.dumps({"class_path": "vrpo_pl.distributed.FSDP2Strategy",
                            "init_args": {"save_distributed_checkpoint": True}})


@pytest.mark.slow
def test_fsdp2_sharded_checkpoints_on_two_processes_are_whole_and_resume_exactly(read_events, tmp_path):
    """``save_distributed_checkpoint`` on 2 processes: each save is one complete directory in its place (Lightning's
    meta.pt and both ranks' shards; no staging sibling left behind), and a 2-process run resumed from the rollout-1
    directory logs the straight run's metrics from there on."""
    straight = tmp_path / "straight"
    _run_two_processes(straight, SHARDED_FSDP2, *LORA, *_checkpoints(straight / "ckpt"))
    saves = sorted((straight / "ckpt").iterdir())
    assert [d.name for d in saves] == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
    for save in saves:
        assert save.is_dir() and (save / SHARDED_METADATA).is_file(), f"{save}: not a whole sharded checkpoint"
        assert len(list(save.glob("*.distcp"))) == 2, f"{save}: one shard per rank expected"

    resumed = tmp_path / "resumed"
    reports, _ = _run_two_processes(resumed, SHARDED_FSDP2, *LORA, "--ckpt_path",
                                    str(straight / "ckpt" / "epoch=0-step=1.ckpt"))
    assert [r["rollouts"] for r in reports] == [STEPS, STEPS]
    expected, got = _scalars(read_events(straight)), _scalars(read_events(resumed))
    compared = 0
    for tag, values in got.items():
        before = dict(expected[tag])
        for step, value in values:
            if step > 1:
                assert value == pytest.approx(before[step], rel=1e-5, abs=1e-6), f"{tag} at rollout {step}"
                compared += 1
    assert compared >= 10, f"only {compared} metrics after rollout 1 were logged by the resumed run"


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_and_resume_anywhere(single_runs, run_cli, read_events, tmp_path):
    """FSDP2 with LoRA: trainable models sharded (the frozen ones not), generation synced across ranks, metrics
    and weights equal the single-process run's; its checkpoint (one file) resumes on a single process."""
    reports, _ = _run_two_processes(tmp_path, "fsdp2", *LORA, *_checkpoints(tmp_path / "ckpt"))
    for report in reports:
        assert report["strategy"] == "FSDP2Strategy" and report["world_size"] == 2 and report["rollouts"] == STEPS
        assert report["sharded_trainable"] == report["trainable"] > 0, "every trainable tensor is sharded"
        assert report["sharded_reference"] == 0
        assert report["optimized_is_trainable"] and not report["frozen_in_optimizer"]
        assert report["generate_synced"], "generate must run with synced_gpus under FSDP2"
        assert report["max_replica_diff"] < 1e-9
    events, weights, _ = single_runs["lora"]
    _assert_same_metrics(events, _scalars(read_events(tmp_path)), "fsdp2")
    final = _trainable_from(tmp_path / "ckpt" / "last.ckpt")
    _assert_same_weights(weights, final, "fsdp2")

    # The FSDP2 checkpoint after rollout 1 continues on one process to the same weights.
    first = tmp_path / "ckpt" / "epoch=0-step=1.ckpt"
    resumed = tmp_path / "resumed"
    cli = run_cli(resumed, *EQUIVALENT_RUN, "--data.prompts_per_rollout", "4", "--model.ppo.mini_batch_size", "8",
                  *LORA, *_checkpoints(resumed / "ckpt"), "--ckpt_path", str(first), max_steps=STEPS)
    assert cli.model.rollouts == STEPS
    _assert_same_weights(final, _trainable_from(resumed / "ckpt" / "last.ckpt"), "fsdp2 -> 1 process resume")


def test_fsdp1_on_cpu_is_refused_with_the_fsdp2_flag(run_cli, tmp_path):
    with pytest.raises(ValueError) as error:
        run_cli(tmp_path, "--trainer.strategy", "fsdp", "--trainer.devices", "2")
    message = str(error.value)
    assert "--trainer.strategy fsdp" in message and "CPU" in message
    assert "--trainer.strategy fsdp2" in message and "ModelParallelStrategy" in message


def test_strategy_check_accepts_the_others():
    from vrpo_pl.distributed import check_strategy

    for strategy in ("auto", "ddp", "ddp_spawn", "fsdp2", "vrpo_pl.distributed.FSDP2Strategy"):
        check_strategy(strategy, "cpu")
    check_strategy("fsdp", "gpu", cuda_available=True)
    with pytest.raises(ValueError, match="fsdp2"):
        check_strategy("lightning.pytorch.strategies.FSDPStrategy", "auto", cuda_available=False)


def test_fsdp2_is_a_registered_strategy_name():
    from lightning.pytorch.strategies import StrategyRegistry

    import vrpo_pl.cli  # noqa: F401  (registers it, as the vrpo command does)
    from vrpo_pl.distributed import FSDP2Strategy

    assert StrategyRegistry["fsdp2"]["strategy"] is FSDP2Strategy
    trainer = pl.Trainer(strategy="fsdp2", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy)
