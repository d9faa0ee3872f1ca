"""Atomic checkpoint files: a crash or a full disk while saving never damages the checkpoint already there.

The ``vrpo`` command installs :class:`AtomicCheckpointIO` as the trainer's checkpoint IO by default (its
``trainer.plugins``). Each checkpoint is written to a temporary file in the same directory, flushed to disk
(``fsync``) and only then renamed over the target with ``os.replace``, which is atomic on POSIX file systems and
on Windows. So ``last.ckpt`` is at every moment either the previous complete checkpoint or the new complete one:
``kill -9`` during a save, a power loss or running out of disk leaves the previous one loadable.

What a checkpoint holds (written by Lightning and ``RLSystem.on_save_checkpoint``): the trainable weights (full
fine-tuning: policy and critic; LoRA: the adapters and the value head), both optimizers, the loops' progress,
the data module's stream position, the callbacks' states (KL controller, guide running moments, ...) and a
``vrpo`` section with the rollout counter, KL coefficient, running reward statistics, the reward function's and
the update's random generators, the global torch RNG and a fingerprint of the configuration.

The ``vrpo`` section's pieces live here: :func:`rl_section` / :func:`restore_rl_section` (the section itself),
:func:`rng_states` / :func:`restore_rng_states` (torch, CUDA, Python, NumPy) and :func:`config_fingerprint` /
:func:`check_fingerprint` (what a checkpoint's weights must agree with, and the message that refuses one that does
not); :func:`trainable_entries` is the part of the weights a checkpoint keeps.

FSDP2's sharded checkpoint directories (``FSDP2Strategy(save_distributed_checkpoint=True)``) do not go through a
``CheckpointIO``: every rank writes its shard into a temporary sibling directory (:func:`staging_directory`), and
once all are complete rank 0 puts it in the target's place (:func:`replace_directory`). Lightning's own writer
fills the target directory in place, so a crash mixed old and new shards (or left those of an earlier, larger
world size). Limits: remote paths (``s3://``, ...) are written by Lightning's own ``TorchCheckpointIO`` (not
atomic).
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

if TYPE_CHECKING:
    from vrpo_pl.advantages import RunningMoments
    from vrpo_pl.rewards.base import RewardFunction

_TMP_SUFFIX = ".vrpo-tmp"
SHARDED_METADATA = "meta.pt"  # Lightning's file of everything but weights and optimizers in a sharded checkpoint
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the file previously at that path is unchanged."""


class CheckpointLoadError(ValueError):
    """A checkpoint file is missing, empty or truncated; the message names it and what to do."""


def check_readable(path, error: BaseException | None = None) -> None:
    """Raises :class:`CheckpointLoadError` naming ``path`` when it is missing or empty, or when ``error`` (raised
    while loading it) is torch's report of a truncated file. A directory passes when it is a sharded (FSDP2)
    checkpoint, i.e. holds Lightning's ``meta.pt``; its shards are checked by torch.distributed.checkpoint.

    torch reports an empty file as a bare ``EOFError`` and a truncated one as a ``RuntimeError`` of its zip reader
    ("failed finding central directory"); neither names the file.
    """
    path = Path(path)
    todo = ("resume from another checkpoint (the epoch=...-step=... files beside last.ckpt), or start without "
            "--ckpt_path")
    if path.is_dir():
        if (path / SHARDED_METADATA).is_file():
            return
        raise CheckpointLoadError(f"--ckpt_path {str(path)!r} is a directory but not a sharded checkpoint (it holds "
                                  f"no {SHARDED_METADATA}); {todo}")
    if not path.is_file():
        raise CheckpointLoadError(f"--ckpt_path {str(path)!r} does not exist (or is not a file); {todo}")
    if path.stat().st_size == 0:
        raise CheckpointLoadError(f"--ckpt_path {str(path)!r} is empty (0 bytes); {todo}")
    zip_failure = isinstance(error, RuntimeError) and "PytorchStreamReader failed" in str(error)
    if isinstance(error, EOFError) or zip_failure:
        raise CheckpointLoadError(
            f"--ckpt_path {str(path)!r} is truncated or damaged ({path.stat().st_size} bytes; torch: "
            f"{str(error).splitlines()[0][:100] if str(error) else type(error).__name__}), e.g. a copy cut short; "
            f"{todo}"
        ) from error


def load_checkpoint_file(path, **torch_load_kwargs) -> dict[str, Any]:
    """``torch.load(path, ...)`` whose failures on a missing, empty or truncated file name it (see
    :func:`check_readable`)."""
    check_readable(path)
    try:
        return torch.load(path, **torch_load_kwargs)
    except (RuntimeError, EOFError) as error:
        check_readable(path, error)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to a temporary file, fsyncs it, then renames it over the target, and whose
    loading names a missing, empty or truncated checkpoint (:func:`check_readable`).

    Selected by default in the ``vrpo`` command; in Python: ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def load_checkpoint(self, path, *args, **kwargs) -> dict[str, Any]:
        """Lightning's loading, with :func:`check_readable`'s messages for a local file that cannot be read."""
        if not _is_local_file_protocol(str(path)):
            return super().load_checkpoint(path, *args, **kwargs)
        check_readable(path)
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except (RuntimeError, EOFError) as error:
            check_readable(path, error)
            raise

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """Writes ``checkpoint`` to ``path`` atomically.

        Raises:
            CheckpointSaveError: when writing fails (the disk is full, a quota, permissions, ...); the message
                names the path and what to do, and any file already at ``path`` is left as it was.
        """
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg is not supported "
                f"for `{type(self).__name__}`."
            )
        if not _is_local_file_protocol(str(path)):
            super().save_checkpoint(checkpoint, path)
            return
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(checkpoint, path)
        except (OSError, RuntimeError) as error:
            save_error = as_save_error(path, error)
            if save_error is None:
                raise
            raise save_error from error
        _remove_stale_temporaries(path)


def _os_error_in_chain(error: BaseException) -> OSError | None:
    """``error`` itself if it is an OSError, else the first OSError among its causes and contexts, or among the
    ranks' failures that ``torch.distributed.checkpoint`` gathers into a ``CheckpointException``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        for failure, _trace in getattr(error, "failures", {}).values():
            if (found := _os_error_in_chain(failure)) is not None:
                return found
        error = error.__cause__ or error.__context__
    return None


def as_save_error(path: Path, error: BaseException) -> CheckpointSaveError | None:
    """The :class:`CheckpointSaveError` for a failed write of ``path`` (the disk is full, permissions, ...), or
    None when ``error`` is not about the file (torch.save reports a failed write as a RuntimeError of its zip writer
    whose context is the OSError)."""
    cause = _os_error_in_chain(error)
    return None if cause is None else CheckpointSaveError(cause.errno, _save_error_message(path, cause))


def staging_directory(path: Path) -> Path:
    """The temporary sibling directory in which a sharded checkpoint ``path`` is written before it takes its place
    (the same name on every rank; hidden, and outside Lightning's ``last*.ckpt`` pattern)."""
    return path.parent / f".{path.name}{_TMP_SUFFIX}"


def _aside(path: Path) -> Path:
    return path.parent / f".{path.name}.vrpo-old"


def prepare_staging(path: Path) -> Path:
    """Clears :func:`staging_directory` of ``path`` (a save killed before) and, if a save was killed between
    :func:`replace_directory`'s two renames, moves the previous checkpoint back to ``path``. Returns the staging
    directory, created and empty. Run on one rank."""
    staging, aside = staging_directory(path), _aside(path)
    if aside.exists():
        if not path.exists():
            aside.rename(path)
        else:
            _remove(aside)
    if staging.exists():
        _remove(staging)
    staging.mkdir(parents=True)
    return staging


def replace_directory(staging: Path, path: Path) -> None:
    """Puts the complete checkpoint directory ``staging`` in ``path``'s place (a directory or a file, or none).

    Its files are fsynced; then the previous ``path`` is renamed aside, ``staging`` renamed to ``path`` and the old
    one deleted. A crash leaves the previous checkpoint whole: at ``path``, or for the microseconds between the two
    renames at ``.NAME.vrpo-old``, which the next save moves back (:func:`prepare_staging`). Run on one rank.
    """
    for file in (p for p in staging.rglob("*") if p.is_file()):
        with file.open("rb+") as handle:
            os.fsync(handle.fileno())
    _fsync_directory(staging)
    aside = _aside(path)
    if path.exists():
        path.rename(aside)
    staging.rename(path)
    _fsync_directory(path.parent)
    if aside.exists():
        _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _write_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: the half-written temporary must not pile up. (A kill -9 cannot run this;
        # the next successful save of the same path removes what it left.)
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Makes the rename itself durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Deletes temporaries of ``path`` left by a process killed while saving (only this target's)."""
    for stale in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def _save_error_message(path: Path, error: OSError) -> str:
    if error.errno in _DISK_FULL:
        what = f"no space left on the device (or quota exceeded) while saving checkpoint {str(path)!r}"
        todo = (f"free disk space under {str(path.parent)!r}, or write checkpoints elsewhere "
                "(--trainer.default_root_dir DIR or the ModelCheckpoint callback's dirpath) and resume from the "
                "last complete one with --ckpt_path")
    else:
        what = f"could not write checkpoint {str(path)!r} ({error.strerror or error})"
        todo = f"check that {str(path.parent)!r} is writable, then resume from the last complete one with --ckpt_path"
    return f"{what}. The checkpoint previously at that path (if any) is intact; {todo}."


def rng_states(device: torch.device) -> dict[str, Any]:
    """The global random states a rollout can draw from: torch (sampling), CUDA, Python, NumPy.

    NumPy's state is stored as a tensor and plain numbers: Lightning loads checkpoints with ``weights_only=True``,
    which rejects ndarrays.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_rng = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    states = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "numpy_rng": numpy_rng}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(state: dict[str, Any], device: torch.device) -> None:
    """Restores what :func:`rng_states` saved (states a checkpoint lacks are left as they are)."""
    torch.set_rng_state(state["torch_rng"])
    if state.get("python_rng") is not None:
        random.setstate(state["python_rng"])
    if state.get("numpy_rng") is not None:
        kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def config_fingerprint(settings: dict[str, Any], trainable: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """What a checkpoint's weights must agree with: the given settings (algorithm, critic head, ...) and the names,
    number and total size of the trainable tensors."""
    shapes = {name: tuple(t.shape) for name, t in trainable}
    names = hashlib.sha1("\n".join(sorted(shapes)).encode()).hexdigest()[:12]
    return {**settings, "trainable": len(shapes), "trainable_numel": sum(math.prod(s) for s in shapes.values()),
            "trainable_names": names}


def check_fingerprint(expected: dict[str, Any], found: dict[str, Any], where: str = "") -> None:
    """Refuses a checkpoint whose fingerprint differs from the configuration's.

    Args:
        expected: :func:`config_fingerprint` of the configuration being resumed.
        found: the one saved in the checkpoint.
        where: the checkpoint's path, for the message.

    Raises:
        ValueError: naming what differs and how to resume.
    """
    diff = sorted((key, found[key], expected[key]) for key in expected.keys() & found.keys()
                  if expected[key] != found[key])
    if diff:
        changes = ", ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in diff[:6])
        raise ValueError(
            f"the checkpoint{' ' + repr(where) if where else ''} comes from an incompatible configuration (algorithm, "
            f"model, LoRA or critic head differ): {changes}. Resume with the configuration it was written with (its "
            "config.yaml beside the logs), or start a new run without --ckpt_path."
        )


def trainable_entries(state_dict: dict[str, Any], module: torch.nn.Module) -> dict[str, Any]:
    """The weights a checkpoint keeps: ``module``'s trainable parameters and its value head's buffers (the return
    statistics, ``critic.head.*``). Frozen weights are rebuilt from their sources when the checkpoint is loaded."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    head_buffers = {n for n, _ in module.named_buffers() if n.startswith("critic.head")}
    return {k: v for k, v in state_dict.items() if k in trainable or k in head_buffers}


def rl_section(*, rollouts: int, kl_coef: float, reward_moments: RunningMoments, reward: RewardFunction,
               shuffle_gen: torch.Generator, vib_gen: torch.Generator | None, nonfinite_in_row: dict[str, int],
               fingerprint: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A checkpoint's ``vrpo`` section: the RL state that resume restores (:func:`restore_rl_section`) beside the
    weights.

    Args:
        rollouts: rollout batches done.
        kl_coef: the KL coefficient now (the KL controller may have moved it).
        reward_moments: the training reward's running statistics (``--model.rewards.normalize``).
        reward: the reward function, whose state is its noise generator.
        shuffle_gen: the update's mini-batch shuffling.
        vib_gen: the VIB's sampling (None before its first use or without a VIB).
        nonfinite_in_row: skipped steps in a row per model, and skipped rollout batches (``reward``).
        fingerprint: :func:`config_fingerprint` of the configuration.
        device: the training device, for the CUDA RNG (:func:`rng_states`).
    """
    return {
        "rollouts": rollouts, "kl_coef": kl_coef, "reward_moments": reward_moments.state_dict(),
        "reward_fn": reward.state_dict(), "shuffle_gen": shuffle_gen.get_state(),
        "vib_gen": None if vib_gen is None else vib_gen.get_state(),
        "nonfinite_in_row": dict(nonfinite_in_row), "fingerprint": fingerprint, **rng_states(device),
    }


class RestoredCounters(NamedTuple):
    """The plain values of a ``vrpo`` section, for the system to take back (:func:`restore_rl_section`)."""

    rollouts: int
    kl_coef: float
    vib_gen: torch.Generator | None
    nonfinite_in_row: dict[str, int]


def restore_rl_section(checkpoint: dict[str, Any], fingerprint: dict[str, Any], where: str, *,
                       reward_moments: RunningMoments, reward: RewardFunction, shuffle_gen: torch.Generator,
                       device: torch.device) -> RestoredCounters:
    """Checks a checkpoint's ``vrpo`` section (:func:`rl_section`) against ``fingerprint``, restores the stateful
    parts in place (reward statistics, reward function, shuffling generator, global RNGs) and returns the rest.

    Args:
        checkpoint: the loaded checkpoint.
        fingerprint: :func:`config_fingerprint` of the configuration being resumed.
        where: the checkpoint's path, for the messages.
        reward_moments: restored in place.
        reward: restored in place.
        shuffle_gen: restored in place.
        device: where the VIB generator is rebuilt (the training device) and the CUDA RNG restored.

    Raises:
        ValueError: a checkpoint without the section (not written by ``RLSystem``), or one from an incompatible
            configuration (:func:`check_fingerprint`).
    """
    state = checkpoint.get("vrpo")
    if state is None:
        raise ValueError(f"the checkpoint {where!r} was not written by vrpo_pl's RLSystem (no 'vrpo' section)")
    check_fingerprint(fingerprint, state["fingerprint"], where)
    reward_moments.load_state_dict(state["reward_moments"])
    reward.load_state_dict(state["reward_fn"])
    shuffle_gen.set_state(state["shuffle_gen"])
    vib_gen = None
    if state["vib_gen"] is not None:
        vib_gen = torch.Generator(device=device)
        vib_gen.set_state(state["vib_gen"])
    restore_rng_states(state, device)
    return RestoredCounters(state["rollouts"], state["kl_coef"], vib_gen, state["nonfinite_in_row"])
