"""The ``vrpo`` command: LightningCLI over :class:`RLSystem` and :class:`PromptDataModule`.

    vrpo fit --config configs/vrpo.yaml [--trainer.strategy ddp] [--model.ppo.epochs 4 ...]
    vrpo fit --config configs/vrpo.yaml --ckpt_path runs/.../checkpoints/last.ckpt   # resume exactly
    vrpo validate --config configs/vrpo.yaml --ckpt_path runs/.../last.ckpt
    python -m vrpo_pl.export --config configs/vrpo.yaml --ckpt_path runs/.../last.ckpt --out exported/

Strategies, by flag on the same config (see :mod:`vrpo_pl.distributed`): ``--trainer.strategy ddp`` or
``--trainer.strategy fsdp2`` with ``--trainer.devices N`` (CPU: gloo; GPUs: nccl); FSDP1 (``fsdp``) on GPUs only,
refused on CPU before anything is built. Several nodes: ``--trainer.num_nodes M`` under Lightning's launchers
(``torchrun``, SLURM). Checkpoints are written atomically by default (``trainer.plugins``:
:class:`vrpo_pl.checkpoint.AtomicCheckpointIO`), so a crash or a full disk while saving keeps the previous one.

Every setting's documentation (its attribute docstring) shows in ``vrpo fit --help``; nested settings with
``class_path`` (sources, rewards, callbacks) show theirs with ``--help CLASS``-style options of jsonargparse,
e.g. ``vrpo fit --model.reward.help vrpo_pl.rewards.SymmetricFlip``.

Errors: a check of the project's own (a setting out of range, a data file, a model path, a checkpoint, a reward)
stops the command with one line, ``error: <message>``, on stderr and exit status 2, in every process of a
multi-process run (prefixed ``[rank N]`` there; the processes that then lose their connection to it say so in one
line and exit 1); ``VRPO_DEBUG=1`` shows the full traceback instead. Anything else (a bug, or a library's own
failure) keeps its traceback. Parser errors (unknown flag, wrong type) are jsonargparse's messages, also one line
and exit status 2 (:class:`VRPOParser`).
"""

from __future__ import annotations

import dis
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import jsonargparse
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from vrpo_pl.callbacks.parameter_summary import replace_default_summary
from vrpo_pl.checkpoint import check_readable
from vrpo_pl.data import PromptDataModule
from vrpo_pl.distributed import check_strategy  # importing it registers --trainer.strategy fsdp2
from vrpo_pl.run_directory import (
    check_writable,
    first_created,
    last_checkpoint_to_resume,
    remove_failed_start,
    version_directory,
)
from vrpo_pl.system import RLSystem

# Attribute docstrings (the text under each dataclass field) become --help text.
jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

TRAINER_DEFAULTS = {
    # One training step is one rollout batch, so max_steps counts rollout batches (see RLSystem).
    "max_steps": 100,
    # The training stream is infinite: validate every N rollout batches instead of once per epoch.
    "val_check_interval": 10,
    "check_val_every_n_epoch": None,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    # Checkpoints are written to a temporary file and renamed over the target: a crash or a full disk while
    # saving leaves the previous checkpoint loadable (vrpo_pl.checkpoint). Passing --trainer.plugins replaces
    # this list: keep vrpo_pl.checkpoint.AtomicCheckpointIO in it.
    "plugins": [{"class_path": "vrpo_pl.checkpoint.AtomicCheckpointIO"}],
}


class VRPOParser(LightningArgumentParser):
    """LightningCLI's parser whose errors (an unknown flag, a wrong type or choice) are one line, ``error: <message>;
    run `vrpo fit --help` ...``, exit status 2: jsonargparse prints its 40-line usage first, which buries the
    message (kept with ``VRPO_DEBUG=1``)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_enabled():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {' '.join(message.split())}; run `{prog} --help` for the accepted options\n")
        sys.exit(2)


class VRPOCLI(LightningCLI):
    """LightningCLI with the project's trainer defaults and checks of the strategy before anything is built.

    Building one silences the known, harmless warnings (:func:`quiet_known_warnings`). Before a run it checks that
    its log and checkpoint directories can be written and resolves ``--ckpt_path last`` across the logger's
    versions; a run that fails before it logs anything removes the ``version_N`` directory it created
    (:mod:`vrpo_pl.run_directory`). Its model summary has no FLOPs (:class:`~vrpo_pl.callbacks.ParameterSummary`).
    """

    def __init__(self, *args, **kwargs) -> None:
        quiet_known_warnings()
        argv = kwargs.get("args")
        check_config_files(sys.argv[1:] if argv is None else argv)
        kwargs.setdefault("parser_class", VRPOParser)
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        check_strategy(_setting_name(trainer.get("strategy")), _setting_name(trainer.get("accelerator")))
        check_val_check_interval(trainer.get("val_check_interval"))
        check_manual_optimization(config)

    def after_instantiate_classes(self) -> None:
        check_data_has_answers(getattr(self.model, "reward", None), getattr(self.datamodule, "source", None))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path while parsing (for its hyperparameters), before any hook of ours: a missing,
        # empty or truncated file is named here rather than by torch's bare EOFError or zip-reader error.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        is_file_path = (isinstance(ckpt_path, str) and ckpt_path not in ("last", "best", "hpc")
                        and not ckpt_path.startswith("registry:") and "://" not in ckpt_path)
        if is_file_path:
            check_readable(ckpt_path)
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, EOFError) as error:
            if is_file_path:
                check_readable(ckpt_path, error)
            raise

    def instantiate_trainer(self, **kwargs):
        """Lightning's trainer, with :class:`~vrpo_pl.callbacks.ParameterSummary` in place of its default model
        summary (whose FLOPs column and total are always 0 here: nothing runs a forward pass for it)."""
        trainer = super().instantiate_trainer(**kwargs)
        replace_default_summary(trainer.callbacks)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        # LightningCLI has no hook for a failed subcommand, hence this override of its private runner. A run that
        # fails before it logs anything removes the version_N directory it created (config.yaml and an empty event
        # file): a failed start leaves nothing to mistake for a run (vrpo_pl.run_directory).
        log_dir = version_directory(self.trainer) if rank_zero_only.rank == 0 else None
        created = first_created(log_dir)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if created is not None:
                remove_failed_start(log_dir, created, self.trainer)
            raise

    def before_fit(self) -> None:
        self._prepare_run("fit")

    def before_validate(self) -> None:
        self._prepare_run("validate")

    def after_validate(self) -> None:
        """Prints the validation metrics (they are logged at the rollout step, which Lightning's table skips)."""
        metrics = {k: round(float(v), 6) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        if self.trainer.is_global_zero:
            ckpt = self.config_init["validate"].get("ckpt_path")
            source = f", checkpoint {ckpt}" if ckpt else ""
            print(f"validation (rollout {getattr(self.model, 'rollouts', '?')}{source}): {metrics}", flush=True)

    def _prepare_run(self, subcommand: str) -> None:
        """Checks that the run's directories can be written, and resolves ``--ckpt_path last`` to an earlier run's
        last checkpoint when this run's own directories have none (or refuses it)."""
        check_writable(self.trainer)
        if self.config_init[subcommand].get("ckpt_path") != "last":
            return
        path = last_checkpoint_to_resume(self.trainer)
        if path is None:
            return  # Lightning's own "last" finds it
        self.config_init[subcommand]["ckpt_path"] = str(path)
        if rank_zero_only.rank == 0:
            log_dir = version_directory(self.trainer)
            logs = f"; this run logs to {str(log_dir)!r}" if log_dir is not None else ""
            print(f"--ckpt_path last: resuming {str(path)!r}, the newest last checkpoint of an earlier run{logs}",
                  flush=True)


def check_config_files(argv) -> None:
    """Refuses a ``--config`` file that is not valid YAML, naming the file, line and column (jsonargparse's own
    message names only "<unicode string>").

    Raises:
        ValueError: the first ``--config`` / ``-c`` file with a YAML syntax error.
    """
    import yaml

    if not isinstance(argv, (list, tuple)):
        return
    paths = [value for flag, value in zip(argv, argv[1:], strict=False) if flag in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if isinstance(a, str) and a.startswith("--config=")]
    for path in paths:
        if not isinstance(path, str) or not Path(path).is_file():
            continue  # not a file (inline YAML, a missing path): jsonargparse reports it
        try:
            yaml.safe_load(Path(path).read_text())
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"--config {path}: not valid YAML{where}: {error.problem or error}") from None
        except yaml.YAMLError as error:
            raise ValueError(f"--config {path}: not valid YAML: {error}") from None


def check_data_has_answers(reward, source) -> None:
    """Refuses, before the first rollout, a data file with a record lacking its answer when the reward needs one
    (else the run stops at the rollout batch that first draws it).

    Raises:
        ValueError: naming the file, the record (``file:line``) and ``answer_key``.
    """
    from vrpo_pl.rewards.base import answer_reader

    reader = answer_reader(reward)
    if not hasattr(source, "first_without_answer") or reader is None:
        return
    record = source.first_without_answer()
    if record is not None:
        used = type(reward).__name__ + ("" if reader is reward else f" (its {type(reader).__name__})")
        raise ValueError(
            f"{source.path}: record {record['id']} ({record['prompt'][:60]!r}) has no {source.answer_key!r}, but the "
            f"reward {used} checks every response against its reference answer; add it to every record, or set "
            "--data.source.init_args.answer_key to the key that holds the answers"
        )


def check_manual_optimization(config) -> None:
    """Refuses the settings that Lightning's automatic optimization reads and RLSystem (manual) never does.

    Raises:
        ValueError: naming the flag and the setting of RLSystem that does the job.
    """
    trainer = config.get("trainer") or {}
    accumulate, clip = trainer.get("accumulate_grad_batches"), trainer.get("gradient_clip_val")
    if accumulate not in (None, 1):
        raise ValueError(
            f"--trainer.accumulate_grad_batches={accumulate} does not apply: RLSystem optimizes manually and "
            "accumulates micro-batches itself; set --model.ppo.micro_batch_size (or "
            "--model.ppo.max_tokens_per_micro_batch) below --model.ppo.mini_batch_size instead"
        )
    if clip is not None:
        raise ValueError(
            f"--trainer.gradient_clip_val={clip} does not apply: RLSystem optimizes manually and clips each model "
            "itself; set --model.optim.policy_max_grad_norm and --model.optim.critic_max_grad_norm instead"
        )
    for flag in ("optimizer", "lr_scheduler"):
        if config.get(flag) is not None:
            raise ValueError(
                f"--{flag} does not apply: RLSystem builds and steps its own two AdamW optimizers (policy and critic; "
                "see --model.optim) and has no learning-rate schedule"
            )


def check_val_check_interval(value) -> None:
    """Refuses a ``--trainer.val_check_interval`` that cannot work on the infinite rollout stream.

    Raises:
        ValueError: a number that is not an integer >= 1 (0 divides by zero after the first rollout batch; a
            fraction of an epoch never comes). Durations (``"00:01:00:00"``) and None are Lightning's to check.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(
            f"--trainer.val_check_interval={value!r} must be an integer >= 1: the number of rollout batches between "
            "validations (the training stream is infinite, so a fraction of an epoch never comes)"
        )


def _setting_name(value) -> str:
    """A parsed trainer setting (a name, or ``class_path``/``init_args``) as a name; None as ``auto``."""
    if value is None or isinstance(value, str):
        return value or "auto"
    return getattr(value, "class_path", None) or type(value).__name__


def build_cli(args: list[str], **kwargs) -> VRPOCLI:
    """The CLI parsed from ``args`` alone, without running a subcommand (for export and the benchmarks).

    ``sys.argv`` is set aside while parsing: LightningCLI warns when it holds arguments beside ``args``.
    """
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return VRPOCLI(RLSystem, PromptDataModule, run=False, args=args, trainer_defaults=TRAINER_DEFAULTS, **kwargs)
    finally:
        sys.argv = argv


def cli(args: list[str] | None = None) -> VRPOCLI:
    """Runs the CLI and returns it (``args`` for tests; default: ``sys.argv``)."""
    return VRPOCLI(
        RLSystem,
        PromptDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


# Lightning warnings that describe this design rather than a problem, silenced so real warnings stand out: the
# frozen reference/guide are in eval mode on purpose, and a checkpoint after the rollout batch's optimizer steps is
# exactly the state to resume from.
QUIET_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
)

# Library warnings about the libraries themselves, shown on every run and harmless here, each silenced by its
# category and message (or the module that triggers it) only:
# - Lightning's own pytree helper still builds torch's deprecated LeafSpec (torch >= 2.10 warns on it);
# - our training stream is an IterableDataset with a __len__ and always num_workers=0 (the warning is about
#   duplicates across several workers);
# - LightningCLI calls jsonargparse APIs that jsonargparse 4.49+ deprecates (add_instantiator, ...);
# - peft's get_peft_model reads transformers' deprecated ``is_gradient_checkpointing`` property (transformers 5.2x).
HARMLESS_LIBRARY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, ""),
    (r"Your `IterableDataset` has `__len__` defined", UserWarning, ""),
    (r"\s*By\s+default\s+only\s+one\s+JsonargparseDeprecationWarning", DeprecationWarning, r"lightning\.pytorch\.cli"),
    (r"[\s\S]*\swas\s+deprecated\s+in\s+v4\.", DeprecationWarning, r"lightning\.pytorch\.cli"),
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
)

DEBUG_ENV = "VRPO_DEBUG"
"""Set to 1 for the full traceback of the project's own errors (by default one line, ``error: <message>``)."""


def debug_enabled() -> bool:
    """Whether :data:`DEBUG_ENV` asks for tracebacks (any value but empty or 0)."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


ADVERTISEMENTS = ("💡 Tip: For seamless cloud",)
"""Starts of Lightning's info lines that advertise its cloud packages (litlogger, litmodels) on every run; they say
nothing about the run, so the CLI drops them."""


def _not_an_advertisement(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(ADVERTISEMENTS)


def quiet_known_warnings() -> None:
    """Installs the filters of :data:`QUIET_WARNINGS` and :data:`HARMLESS_LIBRARY_WARNINGS`, and drops
    :data:`ADVERTISEMENTS` from Lightning's info log."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for message, category, module in HARMLESS_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_an_advertisement not in rank_zero_log.filters:
        rank_zero_log.addFilter(_not_an_advertisement)


def _innermost(traceback: TracebackType | None) -> TracebackType | None:
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback


def is_project_error(error: BaseException) -> bool:
    """Whether ``error`` was raised by a ``raise`` statement in this package (one of its own checks).

    Errors that a library raised, or that Python raised inside our code (a failed operation, not a ``raise``), are
    bugs or unforeseen failures and keep their traceback.
    """
    if not isinstance(error, Exception):
        return False
    last = _innermost(error.__traceback__)
    if last is None or not str(last.tb_frame.f_globals.get("__name__", "")).startswith("vrpo_pl"):
        return False
    code = last.tb_frame.f_code
    return any(i.offset == last.tb_lasti and i.opname == "RAISE_VARARGS" for i in dis.get_instructions(code))


def error_line(error: BaseException) -> str:
    """``error: <message>`` on one line, prefixed by the rank in a multi-process run."""
    if isinstance(error, OSError) and error.strerror:
        message = error.strerror + (f": {error.filename!r}" if error.filename else "")
    else:
        message = str(error) or type(error).__name__
    # Lightning's launcher sets LOCAL_RANK in every process it runs (and removes WORLD_SIZE at teardown).
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = getattr(rank_zero_only, "rank", 0)
    where = f"[rank {rank}] " if world > 1 or rank or "LOCAL_RANK" in os.environ else ""
    return f"error: {where}{' '.join(message.split())}"


def run_reporting_errors(function: Callable[..., object], *args) -> None:
    """Calls ``function(*args)``; the project's own errors end the process with :func:`error_line` on stderr and
    exit status 2 (the traceback only with ``VRPO_DEBUG=1``). In a multi-process run, a process whose collective
    failed because another one exited says so in one line and exits 1 (see :func:`lost_a_peer`). Other exceptions
    propagate with their traceback."""
    try:
        function(*args)
    except Exception as error:
        if debug_enabled():
            raise
        if is_project_error(error):
            sys.stderr.flush()
            print(error_line(error), file=sys.stderr, flush=True)
            sys.exit(2)
        if lost_a_peer(error):
            sys.stderr.flush()
            first = str(error).splitlines()[0][:160]
            print(error_line(RuntimeError(f"another process of this run stopped (its error is above), so this one lost "
                                          f"its connection: {first}")), file=sys.stderr, flush=True)
            sys.exit(1)
        raise


def lost_a_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process of a multi-process run exited (gloo's
    "Connection closed by peer"): that process printed the cause; a traceback here would bury it."""
    text = str(error)
    return ("LOCAL_RANK" in os.environ and isinstance(error, RuntimeError)
            and any(s in text for s in ("Connection closed by peer", "Connection reset by peer")))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``vrpo`` console script (``args`` for tests; default: ``sys.argv``); errors as in
    :func:`run_reporting_errors`."""
    run_reporting_errors(cli, args)


if __name__ == "__main__":
    main()
