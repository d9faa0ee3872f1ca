"""Resume: N rollout batches straight equal N/2, a checkpoint and N/2 more (weights, metrics and RL state); a
checkpoint holds what that needs; checkpoint files are atomic, and a run killed with SIGKILL resumes from its last
checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_CONFIG, data_path_args, shrink_args

from vrpo_pl.callbacks import FrozenLMTargets, KLController

REPO_ROOT = Path(__file__).resolve().parents[1]
N = 4
LORA = ["--model.lora", "{r: 4, alpha: 8}", "--model.critic_lora", "{r: 4, alpha: 8}"]
# tiny.yaml is VRPO with reward noise, the adaptive KL controller and the guide's running moments; normalizing the
# reward and the value targets adds the running reward and return statistics to what must come back.
STATEFUL = ["--model.rewards.normalize", "true", "--model.critic.normalize_values", "true"]


def checkpoint_args(directory: Path, every: int = 1) -> list[str]:
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath", str(directory), "--trainer.callbacks.save_last", "true",
            "--trainer.callbacks.every_n_train_steps", str(every), "--trainer.callbacks.save_top_k", "-1"]


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def _rl_state(cli) -> dict[str, object]:
    model, trainer = cli.model, cli.trainer
    callback = {type(cb): cb for cb in trainer.callbacks}
    return {
        "rollouts": model.rollouts, "global_step": trainer.global_step, "kl_coef": model.kl_coef,
        "kl_controller": callback[KLController].coef,
        "reward_moments": model.reward_moments.state_dict(),
        "guide_moments": callback[FrozenLMTargets].state_dict(),
        "records_consumed": cli.datamodule.state_dict()["records_consumed"],
        "reward_generator": model.reward.state_dict(),
        "shuffle_generator": model._shuffle_gen.get_state(),
        "return_statistics": {k: v.clone() for k, v in model.critic.head.return_norm.state_dict().items()},
    }


@pytest.fixture(scope="module", params=["full", "lora"])
def resume_runs(request, run_cli, read_events, tmp_path_factory):
    """Straight N rollout batches, and N/2 + resume from ``last.ckpt`` for N/2 more, from the same seed."""
    extra = [*STATEFUL, *(LORA if request.param == "lora" else [])]
    root = tmp_path_factory.mktemp(f"resume_{request.param}")
    straight = run_cli(root / "straight", *extra, max_steps=N)
    straight_rng = torch.get_rng_state()
    first = run_cli(root / "first", *extra, *checkpoint_args(root / "ckpt"), max_steps=N // 2)
    resumed = run_cli(root / "resumed", *extra, *checkpoint_args(root / "ckpt"),
                      "--ckpt_path", str(root / "ckpt" / f"epoch=0-step={N // 2}.ckpt"), max_steps=N)
    resumed_rng = torch.get_rng_state()
    return SimpleNamespace(
        kind=request.param, root=root, straight=straight, first=first, resumed=resumed,
        straight_events=read_events(root / "straight"), resumed_events=read_events(root / "resumed"),
        rng=(straight_rng, resumed_rng),
    )


def test_resumed_weights_equal_straight_weights(resume_runs):
    straight, resumed = _trainable(resume_runs.straight.model), _trainable(resume_runs.resumed.model)
    assert straight.keys() == resumed.keys()
    worst = max(straight, key=lambda n: (straight[n] - resumed[n]).abs().max().item())
    diff = (straight[worst] - resumed[worst]).abs().max().item()
    assert diff <= 1e-6, f"{resume_runs.kind}: {worst} differs by {diff} after resuming"


def test_resumed_metrics_equal_straight_metrics(resume_runs):
    """Every scalar logged after the checkpoint (rollouts N/2+1..N, validation at N) has the same value."""
    straight, resumed = resume_runs.straight_events, resume_runs.resumed_events
    resumed_tags = set(resumed.Tags()["scalars"])
    for tag in straight.Tags()["scalars"]:
        expected = {e.step: e.value for e in straight.Scalars(tag) if e.step > N // 2}
        if tag.startswith("perf/") or not expected:  # timings; reward details logged only when they occur
            continue
        assert tag in resumed_tags, f"{tag} is not logged after resuming"
        found = {e.step: e.value for e in resumed.Scalars(tag) if e.step > N // 2}
        assert found.keys() == expected.keys(), f"{tag}: logged at {sorted(found)} instead of {sorted(expected)}"
        for step, value in expected.items():
            assert found[step] == pytest.approx(value, rel=1e-6, abs=1e-7), f"{tag} at rollout {step}"
    assert [e.step for e in resume_runs.resumed_events.Scalars("reward/train")] == list(range(N // 2 + 1, N + 1))


def test_resumed_rl_state_equals_straight_state(resume_runs):
    straight, resumed = _rl_state(resume_runs.straight), _rl_state(resume_runs.resumed)
    assert straight["rollouts"] == resumed["rollouts"] == N
    for key, value in straight.items():
        assert _equal(value, resumed[key]), f"{key}: {value} straight, {resumed[key]} resumed"
    straight_rng, resumed_rng = resume_runs.rng
    assert torch.equal(straight_rng, resumed_rng), "the global torch RNG (sampling) continues the same stream"


def test_checkpoint_holds_trainable_weights_and_the_rl_state(resume_runs):
    checkpoint = torch.load(resume_runs.root / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    model = resume_runs.first.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head_state = {f"critic.head.{n}" for n in model.critic.head.state_dict()}  # + persistent buffers (statistics)
    assert set(checkpoint["state_dict"]) == trainable | head_state, "only what trains is saved; frozen is rebuilt"
    if resume_runs.kind == "lora":
        assert all("lora_" in n or n.startswith("critic.head.") for n in checkpoint["state_dict"])
    assert len(checkpoint["optimizer_states"]) == 2  # policy and critic
    assert checkpoint["PromptDataModule"]["records_consumed"] > 0  # the stream position
    callbacks = " ".join(checkpoint["callbacks"])
    assert "KLController" in callbacks and "FrozenLMTargets" in callbacks
    state = checkpoint["vrpo"]
    assert state["rollouts"] == N
    for key in ("kl_coef", "reward_moments", "reward_fn", "shuffle_gen", "vib_gen", "torch_rng", "python_rng",
                "numpy_rng", "fingerprint", "nonfinite_in_row"):
        assert key in state, key
    assert state["reward_moments"]["count"] > 0
    assert float(checkpoint["state_dict"]["critic.head.return_norm.count"]) > 0  # the return statistics


# ------------------------------------------------------------------ atomic checkpoint files and kill -9
_KILL_WHILE_SAVING = """
import os, signal, sys, torch
from vrpo_pl.checkpoint import AtomicCheckpointIO

class KillWhenPickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of writing the checkpoint

io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"rollouts": 1, "weights": torch.ones(1000)}, path)
print("first saved", flush=True)
io.save_checkpoint({"rollouts": 2, "weights": torch.zeros(10**6), "bomb": KillWhenPickled()}, path)
print("not reached")
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    from vrpo_pl.checkpoint import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    result = subprocess.run([sys.executable, "-c", _KILL_WHILE_SAVING, str(path)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert "first saved" in result.stdout and "not reached" not in result.stdout
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["rollouts"] == 1 and torch.equal(checkpoint["weights"], torch.ones(1000))
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert leftovers, "the killed write went to a temporary file beside the checkpoint"
    AtomicCheckpointIO().save_checkpoint({"rollouts": 3}, path)
    assert torch.load(path, weights_only=True) == {"rollouts": 3}
    assert list(tmp_path.iterdir()) == [path], "a successful save removes what a killed one left"


@pytest.mark.slow
def test_kill_9_during_training_then_resume_loses_at_most_the_last_rollouts(run_cli, read_events, tmp_path):
    """SIGKILL a ``vrpo fit`` that checkpoints every rollout batch, then resume it with ``--ckpt_path last``."""
    ckpt = tmp_path / "ckpt"
    args = ["--config", str(TINY_CONFIG), *shrink_args(tmp_path / "killed", max_steps=100),
            *data_path_args(TINY_CONFIG), *checkpoint_args(ckpt)]
    process = subprocess.Popen([str(Path(sys.executable).parent / "vrpo"), "fit", *args], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (ckpt / "epoch=0-step=2.ckpt").exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of rollout 2 within 300 s"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL

    saved = torch.load(ckpt / "last.ckpt", weights_only=True)["vrpo"]["rollouts"]
    done = max(int(p.stem.split("step=")[1]) for p in ckpt.glob("epoch=*.ckpt"))
    # last.ckpt is written right after the rollout's own checkpoint: the kill may fall between the two, and then
    # last.ckpt still holds rollout done - 1 (>= 1, since the wait above saw rollout 2's own checkpoint).
    assert saved >= 1 and done - 1 <= saved <= done, (saved, done)

    resumed = run_cli(tmp_path / "resumed", *checkpoint_args(ckpt), "--ckpt_path", "last", max_steps=saved + 2)
    assert resumed.model.rollouts == resumed.trainer.global_step == saved + 2
    steps = [e.step for e in read_events(tmp_path / "resumed").Scalars("reward/train")]
    assert steps == [saved + 1, saved + 2], "training continues right after the last checkpoint"
    assert not list(ckpt.glob(".*")), "no temporary files are left behind"
