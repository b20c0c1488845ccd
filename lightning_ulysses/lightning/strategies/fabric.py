"""Lightning Fabric twins of the Ulysses strategies: ``Fabric(strategy=UlyssesFabricStrategy(sp=2))`` and
``UlyssesFSDPFabricStrategy`` (FSDP2).

The behaviour is the Trainer strategies' own (:class:`~.common.UlyssesMixin`): the DP×SP mesh, the
sampler over ``dp`` replicas, the sharding collate, the SP-peer batch check, the loss check, the SP
group for :mod:`lightning_ulysses.losses.objectives`. What differs is only where Fabric hands things over:

* ``fabric.setup(model)`` / ``fabric.setup_module(model)`` apply Ulysses to every transformers model
  inside before DDP wraps it; a frozen model (a DPO reference, a distillation teacher) is patched
  but not wrapped, since DDP has nothing to reduce for it;
* ``fabric.setup_dataloaders`` shards the batches; the batch check runs while the loop iterates
  (Fabric moves batches itself, without a strategy hook);
* ``fabric.backward`` checks the loss, ``fabric.save`` writes checkpoints that load without SP, atomically
  with a completion marker, and ``fabric.load`` checks it and unpickles with ``weights_only=True``.

Fabric has no stages: evaluation batches are sharded like training ones, so the models always run
sharded (use :meth:`UlyssesFabricStrategy.bypass` to run them unpatched, e.g. to generate).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Callable, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy
from lightning.fabric.strategies.parallel import ParallelStrategy
from torch import nn
from typing_extensions import override

from ..data import FINGERPRINT_KEY
from .common import UlyssesMixin, _restore_configs
from .fsdp import FSDPShardingMixin


class _CheckedLoader:
    """A DataLoader whose iterator checks each batch's fingerprint across the SP group, then drops it.

    Fabric copies a loader's ``__dict__`` into its own wrapper, so this one carries the DataLoader's
    attributes (``dataset``, ``sampler``, ...) the same way.
    """

    def __init__(self, loader: Any, check: Callable[[torch.Tensor], None]) -> None:
        self.__dict__.update(loader.__dict__)
        self._ulysses_loader = loader
        self._ulysses_check = check

    def __len__(self) -> int:
        return len(self._ulysses_loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self._ulysses_loader:
            if isinstance(batch, dict) and FINGERPRINT_KEY in batch:
                batch = batch.copy()  # a ShardedBatch stays one (it warns when user code reads labels)
                self._ulysses_check(batch.pop(FINGERPRINT_KEY))
            yield batch


class FabricUlyssesMixin(UlyssesMixin):
    """The Fabric side of :class:`~.common.UlyssesMixin`; comes before the Fabric strategy in the bases."""

    def _sp_bypassed(self) -> bool:
        return False  # no stages: every dataloader Fabric sets up is sharded

    def process_dataloader(self, dataloader: Any) -> Any:
        dataloader = super().process_dataloader(dataloader)
        return _CheckedLoader(dataloader, self._check_same_batch) if self._check_batches else dataloader

    def batch_to_device(self, batch: Any, device: torch.device | None = None) -> Any:
        # Fabric's signature (no dataloader_idx); the loader already dropped the fingerprint.
        return super(UlyssesMixin, self).batch_to_device(batch, device)

    def _apply_to(self, module: nn.Module) -> None:
        self._check_precision()
        self._handles.extend(self._wrap_hf_models(module, "sp", "the module given to fabric.setup"))

    @contextlib.contextmanager
    def bypass(self) -> Iterator[None]:
        """Run every patched model unpatched inside the block (full sequences, no collectives), e.g. to
        generate; :func:`~lightning_ulysses.losses.objectives.current_sp_group` is ``None`` meanwhile."""
        with contextlib.ExitStack() as stack:
            for handle in self._handles:
                stack.enter_context(handle.bypass())
            yield

    def _clean_state(self, state: dict[str, Any]) -> dict[str, Any]:
        # HF configs saved next to the weights must not name this run's SP attention.
        names = {h.name: h for h in self._handles}
        return _restore_configs(state, names) if names else state

    def save_checkpoint(self, path: Any, state: dict[str, Any], storage_options: Any | None = None,
                        filter: dict[str, Callable[[str, Any], bool]] | None = None) -> None:
        """``fabric.save``: the state free of the patch, written atomically with its completion marker."""
        state = self._clean_state(state)
        save = super().save_checkpoint
        self._write_checkpoint(path, lambda staged: save(staged, state, storage_options=storage_options, filter=filter),
                               state)

    def load_checkpoint(self, path: Any, state: Any = None, strict: bool = True,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """``fabric.load``: a checked checkpoint, unpickled with ``weights_only=True``."""
        load = super().load_checkpoint
        return self._read_checkpoint(path, weights_only,
                                     lambda checked: load(checked, state, strict=strict, weights_only=True))

    def teardown(self) -> None:
        """Remove Ulysses from every model and restore the dataloaders' collate functions."""
        self._remove_ulysses()
        super().teardown()


class UlyssesFabricStrategy(FabricUlyssesMixin, DDPStrategy):
    """Ulysses sequence parallelism for Lightning Fabric, on top of Fabric's DDP.

    ``Fabric(strategy=UlyssesFabricStrategy(sp=2), devices=4)`` (or ``strategy="ulysses_sp2"``)
    builds the ``("dp", "sp")`` mesh; ``fabric.setup(model, optimizer)`` applies Ulysses to the
    transformers models in ``model``; ``fabric.setup_dataloaders`` gives every rank of an SP group the
    same samples and keeps its sequence chunk. With the model's ``out.loss`` or a loss from
    :mod:`lightning_ulysses.losses.objectives`, ``fabric.backward`` gives the gradients of plain DDP over
    ``dp`` replicas. Checkpoints from ``fabric.save`` load into the model without SP.

    Args:
        sp: sequence-parallel degree; ``"auto"`` uses the processes per node.
        check_batches: compare a fingerprint of each batch across the SP group and raise if peers
            received different samples.
        check_loss: raise at the first ``fabric.backward`` whose loss never went through a reduction
            over the SP group; ``False`` for a loss that is rank-local on purpose.
        overlap_chunks: head groups per rank whose all-to-alls overlap attention
            (see :func:`~lightning_ulysses.apply_ulysses`).
        debug_skip_attention: **debug only, wrong results**: every attention layer but the last skips
            its attention computation (see :func:`~lightning_ulysses.apply_ulysses`), to find the memory
            limit of a configuration quickly. Off by default; warns loudly when on.
        packed_documents: ``"refuse"`` (default) or ``"split"``: packed rows that also carry an
            ``attention_mask``, as in :class:`~lightning_ulysses.UlyssesStrategy`.
        batch_axes: sequence axes of batch keys the collate does not know, as in
            :class:`~lightning_ulysses.UlyssesStrategy`.
        ring: ring degree of ``sp = ring × ulysses`` (``None``: chosen from the model's heads), as in
            :class:`~lightning_ulysses.UlyssesStrategy`.
        vision_sp: split a vision-language model's images over the SP ranks, as in
            :class:`~lightning_ulysses.UlyssesStrategy`.
        ring_layout: the ring blocks' layout for causal attention (``"zigzag"``: balanced), as in
            :class:`~lightning_ulysses.UlyssesStrategy`.
        accelerator: set by Fabric from ``Fabric(accelerator=...)``.
        parallel_devices: set by Fabric from ``Fabric(devices=...)``.
        cluster_environment: set by Fabric (detected, or from ``Fabric(plugins=...)``).
        checkpoint_io: how ``fabric.save``/``fabric.load`` read and write files (Fabric's default).
        precision: set by Fabric from ``Fabric(precision=...)``.
        process_group_backend: ``"nccl"``/``"gloo"``; default by device.
        timeout: timeout of every process group, the mesh's SP and DP groups included (so a deadlock
            fails instead of hanging).
        start_method: how Fabric starts the processes it launches (as Fabric's ``DDPStrategy``).
        **ddp_kwargs: passed to ``torch.nn.parallel.DistributedDataParallel``.

    The strategy exposes ``sp_group``, ``dp_group``, ``sp_rank``, ``dp_rank``, ``sp_size``,
    ``dp_size`` and ``device_mesh`` (``fabric.strategy.sp_group``).
    """

    def __init__(
        self,
        sp: int | Literal["auto"] = "auto",
        check_batches: bool = True,
        check_loss: bool = True,
        overlap_chunks: int = 1,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        debug_skip_attention: bool = False,
        packed_documents: Literal["refuse", "split"] = "refuse",
        batch_axes: dict[str, int | None] | None = None,
        ring: int | None = None,
        vision_sp: bool = False,
        ring_layout: Literal["zigzag", "contiguous"] = "zigzag",
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision=precision, process_group_backend=process_group_backend,
            timeout=timeout, start_method=start_method, **ddp_kwargs,
        )
        self._init_ulysses(sp, "sp", check_batches, overlap_chunks, check_loss=check_loss,
                           debug_skip_attention=debug_skip_attention,
                           packed_documents=packed_documents, batch_axes=batch_axes, ring=ring,
                           vision_sp=vision_sp, ring_layout=ring_layout)

    @override
    def _configure_launcher(self) -> None:
        self._validate_world()  # in the launching process, before any worker starts
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        self._validate_world()
        super().setup_environment()
        self._build_mesh()

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        self._apply_to(module)
        if not any(p.requires_grad for p in module.parameters()):
            return module  # frozen (reference model, teacher): DDP would refuse it and has nothing to reduce
        return super().setup_module(module)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("ulysses", cls, description="Ulysses SP over DDP, sp = processes per node")
        for sp in (2, 4, 8):
            strategy_registry.register(f"ulysses_sp{sp}", cls, description=f"Ulysses SP over DDP with sp={sp}", sp=sp)


class UlyssesFSDPFabricStrategy(FSDPShardingMixin, FabricUlyssesMixin, ModelParallelStrategy):
    """Ulysses sequence parallelism for Lightning Fabric with parameters sharded by FSDP2.

    The Fabric twin of :class:`~lightning_ulysses.UlyssesFSDPStrategy`, with the contract of
    :class:`UlyssesFabricStrategy`: ``fabric.setup(model)`` applies Ulysses to the transformers models
    in ``model``, then shards every decoder layer and each model with ``fully_shard`` (all trainable
    parameters must belong to HF models, or be sharded by you before). ``fabric.save`` writes a
    sharded (DCP) folder, or one full file with ``save_distributed_checkpoint=False``; both load
    without SP (``python -m lightning_ulysses.convert_checkpoint`` turns a folder into one file).

    Args:
        sp: sequence-parallel degree; ``"auto"`` uses the processes per node.
        sharding: ``"full"`` shards parameters over all ``dp x sp`` ranks (ZeRO-3); ``"hybrid"``
            shards within each SP group and replicates across DP groups (HSDP).
        param_dtype: dtype FSDP2 computes in (``MixedPrecisionPolicy.param_dtype``); ``None`` keeps
            the parameters' dtype.
        reduce_dtype: dtype FSDP2 reduces gradients in; ``None`` keeps the parameters' dtype.
        reshard_after_forward: FSDP2's option; ``False`` trades memory for one all-gather less.
        activation_checkpointing: checkpoint every decoder layer (non-reentrant) at ``fabric.setup``.
        offload_activations: with checkpointing, keep each layer's input on the CPU between
            forward and backward.
        check_batches: compare a fingerprint of each batch across the SP group and raise if peers
            received different samples.
        check_loss: raise at the first ``fabric.backward`` whose loss never went through a reduction
            over the SP group; ``False`` for a loss that is rank-local on purpose.
        overlap_chunks: head groups per rank whose all-to-alls overlap attention
            (see :func:`~lightning_ulysses.apply_ulysses`).
        save_distributed_checkpoint: ``True`` writes a sharded (DCP) checkpoint folder; ``False``
            gathers one full checkpoint file on rank 0.
        process_group_backend: ``"nccl"``/``"gloo"``; default by device.
        timeout: timeout of every process group, the mesh's SP and DP groups included.
        debug_skip_attention: **debug only, wrong results**: as in :class:`UlyssesFabricStrategy`.
        packed_documents: ``"refuse"`` (default) or ``"split"``: packed rows that also carry an
            ``attention_mask``, as in :class:`~lightning_ulysses.UlyssesStrategy`.
        batch_axes: sequence axes of batch keys the collate does not know, as in
            :class:`~lightning_ulysses.UlyssesStrategy`.
        ring: ring degree of ``sp = ring × ulysses`` (``None``: chosen from the model's heads), as in
            :class:`~lightning_ulysses.UlyssesStrategy`.
        vision_sp: split a vision-language model's images over the SP ranks, as in
            :class:`~lightning_ulysses.UlyssesStrategy`.
        ring_layout: the ring blocks' layout for causal attention (``"zigzag"``: balanced), as in
            :class:`~lightning_ulysses.UlyssesStrategy`.
    """

    _sharded_checkpoints = True  # every rank writes its shards

    def __init__(
        self,
        sp: int | Literal["auto"] = "auto",
        sharding: Literal["full", "hybrid"] = "full",
        param_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        reduce_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        offload_activations: bool = False,
        check_batches: bool = True,
        check_loss: bool = True,
        overlap_chunks: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        debug_skip_attention: bool = False,
        packed_documents: Literal["refuse", "split"] = "refuse",
        batch_axes: dict[str, int | None] | None = None,
        ring: int | None = None,
        vision_sp: bool = False,
        ring_layout: Literal["zigzag", "contiguous"] = "zigzag",
    ) -> None:
        super().__init__(parallelize_fn=self._parallelize, save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self._init_sharding(sharding, param_dtype, reduce_dtype, reshard_after_forward)
        self._init_checkpointing(activation_checkpointing, offload_activations)
        self._init_ulysses(sp, "sp", check_batches, overlap_chunks, check_loss=check_loss,
                           debug_skip_attention=debug_skip_attention,
                           packed_documents=packed_documents, batch_axes=batch_axes, ring=ring,
                           vision_sp=vision_sp, ring_layout=ring_layout)

    @override
    def _configure_launcher(self) -> None:
        self._validate_world()
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        # Our ("dp", "sp") mesh instead of ModelParallelStrategy's data/tensor-parallel one.
        self._validate_world()
        ParallelStrategy.setup_environment(self)
        self._setup_distributed()
        self._build_mesh()
        self._device_mesh = self._dims.mesh

    @override
    def teardown(self) -> None:
        self._remove_ulysses()
        self._remove_checkpointing()
        # Fabric's ModelParallelStrategy.teardown ends by tearing down its checkpoint_io, a property that
        # raises NotImplementedError for this strategy (Lightning 2.6); the rest of it:
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision.teardown()
        self.accelerator.teardown()

    def _parallelize(self, module: nn.Module, mesh: Any) -> nn.Module:
        self._apply_to(module)
        self._checkpoint_layers(module)
        self._shard(module)
        return module

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("ulysses_fsdp", cls, description="Ulysses SP over FSDP2, sp = processes per node")
        for sp in (2, 4, 8):
            strategy_registry.register(f"ulysses_fsdp_sp{sp}", cls, description=f"Ulysses SP over FSDP2, sp={sp}",
                                       sp=sp)
