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

Frozen models stay out of optimizers and are not sharded: the full fine-tuning reference copy, the separate
guide LM of ``FrozenLMTargets`` and a reward model are replicated on every process. With LoRA the reference is the
adapter-disabled policy, whose frozen base weights are sharded with the adapters that need them.

Multi-node: Lightning's own ``--trainer.num_nodes N`` with its launchers (``torchrun``, SLURM, or any cluster
environment Lightning detects); each node runs ``--trainer.devices`` processes. Nothing here launches processes.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

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
    that directory is not written atomically, and resuming from it needs the same number of processes.
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


def register_strategies() -> None:
    """Adds ``fsdp2`` to Lightning's ``StrategyRegistry`` (idempotent), so ``--trainer.strategy fsdp2`` works."""
    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register(
            "fsdp2", FSDP2Strategy,
            description="FSDP2 (fully_shard) over all processes, data parallel only (vrpo_pl.distributed)",
        )


def check_strategy(strategy: Any, accelerator: Any, cuda_available: bool | None = None) -> None:
    """Refuses FSDP1 where it cannot run: on CPU, Lightning and torch both need an accelerator for it.

    Args:
        strategy: ``--trainer.strategy`` as given (a name, a Strategy, or a class_path dict).
        accelerator: ``--trainer.accelerator`` as given (``cpu``, ``gpu``, ``cuda``, ``auto``, ...).
        cuda_available: override of ``torch.cuda.is_available()`` (for tests).

    Raises:
        ValueError: for FSDP1 on CPU, naming the flag and the FSDP2 alternative.
    """
    if isinstance(strategy, dict):
        strategy = strategy.get("class_path", "")
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if name not in ("fsdp", "fsdp_cpu_offload", "FSDPStrategy", "lightning.pytorch.strategies.FSDPStrategy",
                    "lightning.pytorch.strategies.fsdp.FSDPStrategy"):
        return
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    accelerator_name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    on_cpu = accelerator_name.startswith("cpu") or (accelerator_name in ("auto", "") and not cuda)
    if on_cpu or not cuda:
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
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"FSDP2: found no decoder layers in {type(model).__name__} (no module listed in _no_split_modules); "
            "use --trainer.strategy ddp for this model"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor: ``clip_grad_norm_`` over FSDP2's DTensor gradients returns a DTensor."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


register_strategies()
