"""Where a run writes (its log and checkpoint directories), checked before the first rollout and tidied after a
failed start; and what ``--ckpt_path last`` resumes.

Lightning resolves both directories lazily: the logger's ``SAVE_DIR/NAME/version_N`` (a new ``N`` for every run)
and each ``ModelCheckpoint``'s ``dirpath``, else ``version_N/checkpoints``. So:

- ``--ckpt_path last`` in Lightning only looks in this run's directories, which a run with a fresh ``version_N``
  never has: :func:`last_checkpoint_to_resume` then takes the newest ``last*.ckpt`` of an earlier version of the
  same logger (``SAVE_DIR/NAME/*/checkpoints``), and refuses, naming where it looked, when there is none.
- :func:`check_writable` refuses, before anything is created, a log or checkpoint directory that cannot be
  written (a read-only file system, no permission), naming the setting that moves it.
- :func:`remove_failed_start` removes the ``version_N`` directory of a run that failed before it logged anything
  (it holds only the config.yaml, hparams.yaml and event files this run just wrote).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

LOG_DIR_FLAG = "--trainer.logger.init_args.save_dir"
"""The setting of the TensorBoard / CSV logger's directory (``--trainer.default_root_dir`` without a logger)."""

START_FILES = re.compile(r"config\.yaml|hparams\.yaml|events\.out\.tfevents\..*")
"""What a run writes into its ``version_N`` directory before it logs anything (SaveConfigCallback, the logger)."""


def _logger(trainer):
    return trainer.loggers[0] if trainer.loggers else None


def version_directory(trainer) -> Path | None:
    """This run's own log directory (``SAVE_DIR/NAME/version_N``) for Lightning's TensorBoard and CSV loggers; None
    for other loggers and without one (their directory is shared by every run)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    logger = _logger(trainer)
    if not isinstance(logger, (TensorBoardLogger, CSVLogger)) or not _is_local_file_protocol(str(logger.log_dir)):
        return None
    return Path(logger.log_dir)


def _checkpoint_callbacks(trainer) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]


def _logger_checkpoint_root(trainer) -> Path | None:
    """``SAVE_DIR/NAME``, under whose version directories the checkpoint callbacks without a dirpath write."""
    logger = _logger(trainer)
    if logger is None:
        return None
    return Path(logger.save_dir or trainer.default_root_dir, str(logger.name))


def checkpoint_directories(trainer) -> list[str] | None:
    """Where this run's checkpoints go: each ModelCheckpoint's directory, resolved as Lightning's ``ModelCheckpoint``
    resolves it (its dirpath, else LOGGER_SAVE_DIR/NAME/version_N/checkpoints of this run, else
    DEFAULT_ROOT_DIR/checkpoints). None when one is remote or has a templated ``last`` name (not checked here)."""
    directories = []
    for callback in _checkpoint_callbacks(trainer):
        if "{" in callback.CHECKPOINT_NAME_LAST:
            return None
        logger = _logger(trainer)
        if callback.dirpath is not None:
            directory = str(callback.dirpath)
        elif logger is not None:
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            directory = str(_logger_checkpoint_root(trainer) / version / "checkpoints")
        else:
            directory = os.path.join(trainer.default_root_dir, "checkpoints")
        if not _is_local_file_protocol(directory):
            return None
        directories.append(directory)
    return directories


def _is_last(path: Path, last_name: str) -> bool:
    """Lightning's own test (``ModelCheckpoint._find_last_checkpoints``): ``last.ckpt``, ``last-v1.ckpt``, ... (a
    file, or an FSDP2 sharded directory)."""
    return path.suffix == ".ckpt" and re.match(rf"^{re.escape(last_name)}(-(\d+))?$", path.stem) is not None


def _last_checkpoints(directories, last_name: str) -> list[Path]:
    return [p for d in map(Path, directories) if d.is_dir() for p in d.iterdir() if _is_last(p, last_name)]


def last_checkpoint_to_resume(trainer) -> Path | None:
    """What ``--ckpt_path last`` resumes when Lightning's own ``last`` would find nothing.

    Returns:
        None when Lightning finds a last checkpoint in this run's directories (or they are not checked: remote,
        templated names); else the newest (by modification time, as Lightning picks) ``last*.ckpt`` of an earlier
        version of the same logger, ``SAVE_DIR/NAME/*/checkpoints``.

    Raises:
        ValueError: there is none; naming the directories looked in and, when an earlier run left other
            checkpoints, its newest one.
    """
    directories = checkpoint_directories(trainer)
    if directories is None:
        return None
    callbacks = _checkpoint_callbacks(trainer)
    last_names = {c.CHECKPOINT_NAME_LAST for c in callbacks}
    if any(_last_checkpoints(directories, name) for name in last_names):
        return None
    root = _logger_checkpoint_root(trainer)
    earlier_dirs = sorted(root.glob("*/checkpoints")) if root is not None and any(
        c.dirpath is None for c in callbacks) else []
    earlier = [p for name in last_names for p in _last_checkpoints(earlier_dirs, name)]
    if earlier:
        return max(earlier, key=lambda p: p.stat().st_mtime)
    where = ", ".join(repr(d) for d in directories) or "no directory: no ModelCheckpoint callback is configured"
    if earlier_dirs:
        where += f" nor in the earlier runs' {str(root / '*' / 'checkpoints')!r}"
    hint = "give a checkpoint file with --ckpt_path PATH, or start without --ckpt_path"
    others = sorted((p for d in earlier_dirs for p in d.glob("*.ckpt")), key=lambda p: p.stat().st_mtime)
    if others:
        hint = f"the newest checkpoint of an earlier run is not a last one: resume it with --ckpt_path {others[-1]}"
    raise ValueError(f"--ckpt_path last: no last checkpoint (last.ckpt) in {where}; {hint}")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _unwritable_reason(directory: Path) -> str | None:
    """Why files cannot be created at ``directory`` (or below its nearest existing ancestor), None when they can."""
    existing = _nearest_existing(directory.absolute())
    if not existing.is_dir():
        return f"{str(existing)!r} is not a directory"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    read_only = hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY
    return f"{str(existing)!r} is {'on a read-only file system' if read_only else 'not writable (permissions)'}"


def check_writable(trainer) -> None:
    """Refuses, before anything is created, a log or checkpoint directory that cannot be written.

    Raises:
        ValueError: naming the directory, why, and the setting that moves it.
    """
    logger = _logger(trainer)
    log_dir = version_directory(trainer)
    if log_dir is None and logger is None:
        log_dir = Path(trainer.default_root_dir)
    if log_dir is not None and (reason := _unwritable_reason(log_dir)):
        flag = LOG_DIR_FLAG if logger is not None else "--trainer.default_root_dir"
        raise ValueError(f"the log directory {str(log_dir)!r} cannot be created: {reason}; set {flag} to a "
                         "writable directory")
    for directory in checkpoint_directories(trainer) or []:
        if reason := _unwritable_reason(Path(directory)):
            raise ValueError(
                f"the checkpoint directory {directory!r} cannot be created: {reason}; set the ModelCheckpoint "
                f"callback's dirpath (trainer.callbacks) or {LOG_DIR_FLAG} to a writable directory"
            )


def first_created(path: Path | None) -> Path | None:
    """The topmost directory of ``path`` that does not exist yet (``path`` itself if only it is missing); None when
    ``path`` exists already (or is None)."""
    if path is None or path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def remove_failed_start(log_dir: Path, created: Path, trainer) -> bool:
    """Removes the log directory of a run that failed before it logged anything.

    Args:
        log_dir: the run's ``version_N`` directory (:func:`version_directory`).
        created: :func:`first_created` of ``log_dir`` before the run started: only what this run created goes, and
            its empty parents up to ``created``.
        trainer: the failed run's trainer; a run that trained a rollout batch or logged a metric (a validation)
            keeps its directory.

    Returns:
        Whether it was removed: only if it holds nothing but the files a start writes (:data:`START_FILES`).
    """
    # RLSystem writes its metrics to the loggers directly (not through trainer.logged_metrics); every training
    # step and validation also reports through self.log, which fills callback_metrics.
    if trainer.global_step > 0 or trainer.callback_metrics or trainer.logged_metrics or not log_dir.is_dir():
        return False
    files = [p for p in log_dir.rglob("*") if not p.is_dir()]
    if any(p.parent != log_dir or not START_FILES.fullmatch(p.name) for p in files):
        return False
    shutil.rmtree(log_dir)
    for parent in log_dir.parents:
        if created not in (parent, *parent.parents):
            break
        try:
            parent.rmdir()  # only an empty one: another run may have started beside this one
        except OSError:
            break
    return True
