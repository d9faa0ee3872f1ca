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

Limits: remote paths (``s3://``, ...) are written by Lightning's own ``TorchCheckpointIO`` (not atomic), and so
are FSDP2's sharded checkpoint directories (``FSDP2Strategy(save_distributed_checkpoint=True)``), which do not go
through a ``CheckpointIO``.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

_TMP_SUFFIX = ".vrpo-tmp"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the file previously at that path is unchanged."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to a temporary file, fsyncs it, then renames it over the target.

    Selected by default in the ``vrpo`` command; in Python: ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

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
        except OSError as error:
            raise CheckpointSaveError(error.errno, _save_error_message(path, error)) from error
        _remove_stale_temporaries(path)


def _write_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
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
