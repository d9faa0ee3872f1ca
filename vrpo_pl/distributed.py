"""Data-parallel training over several processes: DDP and FSDP2 from the same config, chosen by flag.

    vrpo fit --config configs/tiny.yaml --trainer.strategy ddp --trainer.devices 2
    vrpo fit --config configs/tiny.yaml --trainer.strategy fsdp2 --trainer.devices 2
    vrpo fit --config configs/vrpo.yaml --trainer.strategy fsdp2 --trainer.devices 8 --trainer.num_nodes 2

- ``ddp`` (Lightning's ``DDPStrategy``): every process holds the whole models; :class:`~vrpo_pl.system.RLSystem`
  averages the gradients itself, once per optimizer step (one training step runs many backward passes through two
  models, which DDP's reducer does not allow).
- ``fsdp2`` (:class:`FSDP2Strategy`, a Lightning ``ModelParallelStrategy`` with every process data-parallel):
  ``RLSystem.configure_model`` applies ``torch.distributed.fsdp.fully_shard`` to each decoder layer and then to
  the root of the models that train (the policy and the critic, with or without LoRA). Works on CPU (gloo) and
  GPUs (nccl). Checkpoints are one file by default (see :class:`FSDP2Strategy`).
- ``fsdp`` (FSDP1, Lightning's ``FSDPStrategy``): GPUs only; refused on CPU by :func:`check_strategy`.

Where ranks meet (every collective of a training step is here): :func:`all_reduce_sum` (loss denominators,
metrics, advantage whitening, the non-finite vote), :func:`all_gather_flat` (running reward statistics),
:func:`no_ddp_sync` and :func:`average_gradients` (DDP: one gradient all-reduce per optimizer step),
:func:`clip_grad_norm` (the global norm, also of FSDP2's sharded gradients) and :func:`shard_trainable_models`.

Frozen models stay out of optimizers and are not sharded: the full fine-tuning reference copy, the separate
guide LM of ``FrozenLMTargets`` and a reward model are replicated on every process. With LoRA the reference is the
adapter-disabled policy, whose frozen base weights are sharded with the adapters that need them.

Multi-node: Lightning's own ``--trainer.num_nodes N`` with its launchers (``torchrun``, SLURM, or any cluster
environment Lightning detects); each node runs ``--trainer.devices`` processes. Nothing here launches processes.
"""

from __future__ import annotations

import math
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import Tensor, nn

from vrpo_pl.checkpoint import SHARDED_METADATA

FSDP2_FLAG = "--trainer.strategy fsdp2"
"""The command-line flag that selects FSDP2 (see :class:`FSDP2Strategy`)."""


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism: Lightning's ``ModelParallelStrategy`` with every process in the data-parallel mesh.

    Selected with ``--trainer.strategy fsdp2`` (registered in Lightning's ``StrategyRegistry`` when
    ``vrpo_pl.distributed`` is imported; the ``vrpo`` command does) or by class path
    ``vrpo_pl.distributed.FSDP2Strategy``. ``RLSystem.configure_model`` shards the trainable models over the
    mesh's ``data_parallel`` dimension. Tensor parallelism is not supported (no plan for Hugging Face models).

    Checkpoints: by default the full trainable weights and optimizer states are gathered to rank 0 and written as
    one file through the trainer's ``CheckpointIO`` (atomic, see :mod:`vrpo_pl.checkpoint`), which resumes on any
    number of processes and which ``python -m vrpo_pl.export`` reads. ``save_distributed_checkpoint=True`` writes
    Lightning's sharded directory instead (each rank its shard, for models too large for one process's memory):
    resuming from it needs FSDP2 again (tested on the same number of processes, exact); the directory is written
    atomically too (:meth:`save_checkpoint`), and ``python -m vrpo_pl.export`` does not read it.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        process_group_backend: Literal["gloo", "nccl"] | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        """
        Args:
            save_distributed_checkpoint: write sharded checkpoint directories instead of one (atomic) file.
            process_group_backend: None picks gloo on CPU and nccl on CUDA.
            timeout: collective-operation timeout (Lightning's default when None).
        """
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        # Every process is a data-parallel replica: the mesh is (world_size, 1), not (num_nodes, devices).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Lightning's saving; a sharded directory is written whole or not at all.

        Every rank writes its shard into a temporary sibling directory, which rank 0 then puts in the target's
        place (:func:`vrpo_pl.checkpoint.replace_directory`): a crash, or a full disk, while saving leaves the
        previous checkpoint as it was, and no shard of an earlier save survives beside the new ones.

        Raises:
            CheckpointSaveError: the write failed on a full disk, a quota or permissions (the previous checkpoint
                is intact).
        """
        from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

        from vrpo_pl.checkpoint import as_save_error, prepare_staging, replace_directory, staging_directory

        if not self._save_distributed_checkpoint or not _is_local_file_protocol(str(filepath)):
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        staging = prepare_staging(path) if self.global_rank == 0 else staging_directory(path)
        self.barrier("vrpo_staging_ready")
        try:
            super().save_checkpoint(checkpoint, staging, storage_options)  # every rank's shard, rank 0's meta.pt
            self.barrier("vrpo_shards_written")
            if self.global_rank == 0:
                replace_directory(staging, path)
        except BaseException as error:  # also torch.distributed.checkpoint's CheckpointException (a BaseException)
            if self.global_rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            save_error = as_save_error(path, error)
            if save_error is None:
                raise
            raise save_error from error
        self.barrier("vrpo_checkpoint_in_place")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir() and (path / SHARDED_METADATA).is_file():
            return _load_sharded_trainable(path, self.model, self.optimizers, weights_only)
        return super().load_checkpoint(path, weights_only=weights_only)


def _load_sharded_trainable(path: Path, model: nn.Module, optimizers, weights_only: bool | None) -> dict[str, Any]:
    """Loads a sharded checkpoint directory that holds only the trainable weights (``RLSystem.on_save_checkpoint``).

    Lightning's loader asks the checkpoint for every weight of the module, frozen ones included, and fails; here
    the weights the checkpoint lacks keep their built values (the fingerprint check in ``on_load_checkpoint``
    still refuses a checkpoint of another configuration).
    """
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"state_dict": get_model_state_dict(model)}
    load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, state["state_dict"], options=StateDictOptions(strict=False))
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"
        optimizer_state = {key: get_optimizer_state_dict(model, optimizer)}
        load(optimizer_state, checkpoint_id=path)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optimizer_state[key])
    return torch.load(path / SHARDED_METADATA, weights_only=weights_only)


def register_strategies() -> None:
    """Adds ``fsdp2`` to Lightning's ``StrategyRegistry`` (idempotent), so ``--trainer.strategy fsdp2`` works."""
    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register(
            "fsdp2", FSDP2Strategy,
            description="FSDP2 (fully_shard) over all processes, data parallel only (vrpo_pl.distributed)",
        )


_FSDP1_NAMES = ("fsdp", "fsdp_cpu_offload", "FSDPStrategy", "lightning.pytorch.strategies.FSDPStrategy",
                "lightning.pytorch.strategies.fsdp.FSDPStrategy")


def check_strategy(strategy: str, accelerator: str, cuda_available: bool | None = None) -> None:
    """Refuses FSDP1 where it cannot run: on CPU (Lightning and torch both need an accelerator for it).

    Args:
        strategy: ``--trainer.strategy`` as a name or class path.
        accelerator: ``--trainer.accelerator`` as a name or class path (``cpu``, ``gpu``, ``cuda``, ``auto``).
        cuda_available: stands in for ``torch.cuda.is_available()`` (tests).

    Raises:
        ValueError: FSDP1 on CPU, naming the flag and the FSDP2 alternative.

    >>> check_strategy("ddp", "cpu")
    >>> check_strategy("fsdp", "gpu", cuda_available=True)
    """
    if strategy not in _FSDP1_NAMES:
        return
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not cuda or "cpu" in accelerator.lower():
        raise ValueError(
            f"--trainer.strategy {strategy} (FSDP1) needs GPUs and cannot run on CPU "
            f"(--trainer.accelerator {accelerator}). For sharded training on CPU use FSDP2: {FSDP2_FLAG} "
            "(vrpo_pl.distributed.FSDP2Strategy, a lightning.pytorch.strategies.ModelParallelStrategy with "
            "fully_shard); or --trainer.strategy ddp."
        )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (also inside a peft wrapper), in order.

    They are the modules whose class the model lists in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``).
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """Applies FSDP2's ``fully_shard`` to each decoder layer of ``model`` and then to its root, over ``mesh``.

    Frozen parameters inside (LoRA's base weights) are sharded with the layer that uses them; they receive no
    gradients and stay out of optimizers.

    Args:
        model: a trainable model (the policy, or the critic: its layers inside the backbone, the head with the root).
        mesh: the 1-D data-parallel ``DeviceMesh``.

    Returns:
        ``model``, sharded in place.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"FSDP2: found no decoder layers in {type(model).__name__} (no module listed in _no_split_modules); "
            "use --trainer.strategy ddp for this model"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if hasattr(model, "get_base_model") and hasattr(model, "generate"):
        # peft's generate() calls the inner model's generate(), never the wrapper's forward: without this the
        # root's parameters (embeddings, head) would stay sharded during sampling.
        register_fsdp_forward_method(model, "generate")
    for module in model.modules():
        if hasattr(module, "generate"):
            # transformers' own FSDP2 marker: `generate` then runs with synced_gpus, i.e. every rank keeps
            # calling forward (each one collective) until all ranks' sequences have ended.
            module._is_fsdp_managed_module = True
    # The value model returns views (values = head(...).squeeze(-1), the VIB's chunks); FSDP2 warns that an
    # in-place op on them would skip its pre-backward hook. The losses use them out of place only, and the
    # root's parameters stay unsharded after forward anyway (tests/test_distributed.py compares the gradients
    # with a single process).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w+\) returned a view tensor")
    return model


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(tensor: Tensor, op) -> Tensor:
    """``tensor`` reduced by ``op`` over all ranks (a new tensor; ``tensor`` itself when there is one process)."""
    if world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all ranks (a new tensor; ``tensor`` itself when there is one process)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_gather_flat(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` (the same shape on all ranks), concatenated flat in rank order."""
    if world_size() == 1:
        return tensor.flatten()
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat([p.flatten() for p in parts])


def all_gather_ragged(values: Tensor) -> Tensor:
    """Every rank's 1-D ``values`` (their lengths may differ), concatenated in rank order."""
    if world_size() == 1:
        return values
    length = all_reduce_max(torch.tensor(float(values.numel()), device=values.device))
    padded = torch.full((int(length),), float("nan"), dtype=torch.float64, device=values.device)
    padded[: values.numel()] = values.double()
    lengths = all_gather_flat(torch.tensor([float(values.numel())], device=values.device))
    parts = all_gather_flat(padded).view(world_size(), -1)
    return torch.cat([part[: int(n)] for part, n in zip(parts, lengths.tolist(), strict=True)]).to(values.dtype)


def all_reduce_max(tensor: Tensor) -> Tensor:
    """The elementwise maximum of ``tensor`` over all ranks."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def loss_normalizers(mask: Tensor, world: int) -> dict[str, float]:
    """Token and sequence counts of a mini-batch over all ranks, as the loss denominators.

    Data-parallel gradients are averaged over ranks, so each rank divides by (global count / world size): the
    averaged gradient is then that of the global token (or sequence) mean.
    """
    counts = torch.stack([mask.sum(), torch.tensor(float(mask.shape[0]), device=mask.device)])
    counts = all_reduce_sum(counts)
    return {"num_tokens": float(counts[0]) / world, "num_seqs": float(counts[1]) / world}


@contextmanager
def no_ddp_sync(wrapper: nn.Module | None) -> Iterator[None]:
    """Keeps DDP from reducing gradients on each backward; :func:`average_gradients` reduces once per step.

    One training step runs many backward passes through two models, which DDP's reducer (one backward per forward)
    does not allow. ``wrapper``: the strategy's wrapped module (``trainer.model``); anything but DDP is a no-op.
    """
    with wrapper.no_sync() if isinstance(wrapper, nn.parallel.DistributedDataParallel) else nullcontext():
        yield


def average_gradients(wrapper: nn.Module | None, params: list[nn.Parameter]) -> None:
    """Averages gradients over data-parallel ranks in one all-reduce under DDP (``wrapper``, the strategy's wrapped
    module, is a ``DistributedDataParallel``); a no-op otherwise (FSDP2 reduce-scatters its own in backward).

    Every gradient, flattened, plus one presence flag per parameter: a parameter that got no gradient on some rank
    counts as zero there and still gets the average everywhere, so the replicas take the same optimizer step (the
    buffers line up because every rank lists the same parameters).
    """
    ranks = world_size()
    if not isinstance(wrapper, nn.parallel.DistributedDataParallel) or ranks == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([*(g.flatten().to(present.dtype) for g in grads), present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat[: -len(params)] /= ranks
    offset = 0
    for p, g, anywhere in zip(params, grads, flat[-len(params) :].tolist(), strict=True):
        if anywhere > 0:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            p.grad = g
        offset += g.numel()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None) -> Tensor:
    """Clips the global gradient norm to ``max_norm`` (None: no clipping) and returns the norm before clipping as a
    plain tensor, also for FSDP2's DTensor gradients."""
    return full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf))


def shard_trainable_models(mesh, *models: nn.Module | None) -> None:
    """FSDP2: ``fully_shard`` each trainable model over the mesh's data-parallel dimension (frozen copies stay whole).

    Raises:
        ValueError: a mesh with tensor parallelism (no plan for Hugging Face models).
    """
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "tensor parallelism is not supported (no plan for Hugging Face models): use --trainer.strategy fsdp2, "
            "which makes every process data-parallel"
        )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    for model in models:
        if model is not None:
            shard_model(model, dp_mesh)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor: ``clip_grad_norm_`` over FSDP2's DTensor gradients returns a DTensor."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


register_strategies()
