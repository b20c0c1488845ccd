"""``UlyssesFSDPStrategy``: FSDP2 (``fully_shard``) over the DP×SP mesh with Ulysses SP."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from typing_extensions import override

from ..activation_checkpointing import CheckpointHandle, checkpoint_decoder_layers, decoder_layers
from ...models.apply import find_hf_models
from ...parallel.mesh import world_mesh
from .common import TrainerCheckpointsMixin, UlyssesMixin

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLOAD_BACKEND = "cpu:gloo,cuda:nccl"


def offload_policy(device: torch.device) -> Any:
    """FSDP2's ``CPUOffloadPolicy`` for a run on ``device``: sharded parameters, gradients and hence the
    optimizer state live on the host. Pinned host memory (for asynchronous copies) needs CUDA."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy(pin_memory=device.type == "cuda")


def move_buffers(module: nn.Module, device: torch.device) -> None:
    """Move every buffer of ``module`` to ``device`` and leave the parameters where they are (on the host,
    where FSDP2's CPU offload keeps them; ``module.to`` would move them too)."""
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and buf.device != device:
                sub._buffers[name] = buf.to(device)


class FSDPShardingMixin:
    """How the Ulysses FSDP2 strategies (Trainer and Fabric) shard the HF models: every decoder layer
    (the model's ``_no_split_modules``), then each model, over the whole world or within SP groups."""

    def _init_sharding(self, sharding: str, param_dtype: str | None, reduce_dtype: str | None,
                       reshard_after_forward: bool) -> None:
        if sharding not in ("full", "hybrid"):
            raise ValueError(f"sharding must be 'full' or 'hybrid', got {sharding!r}.")
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value is not None and value not in _DTYPES:
                raise ValueError(f"{name} must be one of {sorted(_DTYPES)} or None, got {value!r}.")
        self._sharding = sharding
        self._param_dtype = param_dtype
        self._reduce_dtype = reduce_dtype
        self._reshard_after_forward = reshard_after_forward

    def _init_checkpointing(self, activation_checkpointing: bool, offload_activations: bool) -> None:
        if offload_activations and not activation_checkpointing:
            raise ValueError("offload_activations offloads the checkpointed layer inputs: set activation_checkpointing=True.")
        self._activation_checkpointing = activation_checkpointing
        self._offload_activations = offload_activations
        self._ac_handles: dict[int, CheckpointHandle] = {}  # id(HF model) -> its undo

    def _checkpoint_layers(self, module: nn.Module) -> None:
        """Checkpoint every decoder layer of each HF model in ``module`` not checkpointed yet (a later
        stage, or Fabric setting up a second module, wraps nothing twice); called before sharding."""
        if not self._activation_checkpointing:
            return
        for model in find_hf_models(module):
            if id(model) not in self._ac_handles:
                self._ac_handles[id(model)] = checkpoint_decoder_layers(model, offload=self._offload_activations)

    def _remove_checkpointing(self) -> None:
        for handle in self._ac_handles.values():
            handle.remove()
        self._ac_handles = {}

    def _shard_mesh(self) -> DeviceMesh:
        if self._sharding == "hybrid":
            return self._dims.mesh  # 2D: replicate over "dp", shard over "sp"
        return world_mesh(self.root_device.type)  # the world group itself: it has the strategy's timeout

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if any(isinstance(m, FSDPModule) for m in module.modules()):
            return  # the user's configure_model sharded it (or a previous stage did)
        mesh = self._shard_mesh()
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self._reshard_after_forward}
        if self._param_dtype or self._reduce_dtype:
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=_DTYPES.get(self._param_dtype), reduce_dtype=_DTYPES.get(self._reduce_dtype)
            )
        if getattr(self, "_offload_params", False):
            kwargs["offload_policy"] = offload_policy(self.root_device)
        models = find_hf_models(module)
        covered = {p for m in models for p in m.parameters()}
        stray = [n for n, p in module.named_parameters() if p.requires_grad and p not in covered]
        if stray:
            raise ValueError(
                f"parameters outside the HF model would not be sharded nor have gradients reduced: {stray[:5]}. "
                "Shard them yourself with torch.distributed.fsdp.fully_shard (in configure_model, or before "
                "fabric.setup)."
            )
        for model in models:
            for layer in decoder_layers(model):
                fully_shard(layer, **kwargs)
            fully_shard(model, **kwargs)


class UlyssesFSDPStrategy(FSDPShardingMixin, TrainerCheckpointsMixin, UlyssesMixin, ModelParallelStrategy):
    """Ulysses sequence parallelism with parameters sharded by FSDP2.

    Same contract as :class:`~lightning_ulysses.UlyssesStrategy` (mesh, sampler, sharding collate,
    exact loss and logging); the model is sharded with ``torch.distributed.fsdp.fully_shard``
    instead of being replicated by DDP. Without a user ``configure_model`` that already applied
    ``fully_shard``, every HF decoder layer (the model's ``_no_split_modules``) and then each HF
    model are sharded automatically.

    Args:
        sp: sequence-parallel degree; ``"auto"`` uses the processes per node.
        sharding: ``"full"`` shards parameters over all ``dp x sp`` ranks (ZeRO-3);
            ``"hybrid"`` shards within each SP group and replicates across DP groups (HSDP).
        param_dtype: dtype FSDP2 computes in (``MixedPrecisionPolicy.param_dtype``: ``"bfloat16"``,
            ``"float16"``, ``"float32"``); ``None`` keeps the parameters' dtype.
        reduce_dtype: dtype FSDP2 reduces gradients in (``MixedPrecisionPolicy.reduce_dtype``);
            ``None`` keeps the parameters' dtype.
        activation_checkpointing: checkpoint every decoder layer (non-reentrant).
        offload_activations: with checkpointing, keep each layer's input on the CPU between
            forward and backward.
        offload_params: FSDP2's ``CPUOffloadPolicy``: the sharded parameters, their gradients and
            the optimizer state stay in host memory and the optimizer step runs on the host; each
            layer's parameters are copied to the device for its forward and backward. For models
            whose training state does not fit the devices (the single-GPU long-context recipe).
            On CUDA the default process group becomes ``"cpu:gloo,cuda:nccl"`` so that collectives
            on host tensors (the gradient norm for clipping) work.
        reshard_after_forward: FSDP2's option; ``False`` trades memory for one all-gather less.
        eval_mode: ``"sp"`` runs validation/test sharded (exact, long-context safe); ``"bypass"``
            runs the models unpatched in eval mode on full sequences.
        check_batches: compare a fingerprint of each batch across the SP group and raise if peers
            received different samples (one tiny all-gather per step).
        overlap_chunks: head groups per rank whose all-to-alls overlap another group's attention
            (see :func:`~lightning_ulysses.apply_ulysses`); 1 overlaps nothing.
        predict_mode: ``"bypass"`` (default) runs ``predict`` unpatched on full sequences, every rank
            on distinct samples; ``"sp"`` runs it sharded like training (one sample per SP group, for
            sequences too long for one device): return whole-sequence results with
            :func:`~lightning_ulysses.sp_gather_tokens`; prediction writers run on SP rank 0 only.
        check_loss: at the first training steps, raise if the loss passed to backward never went
            through a reduction over the SP group (a rank-local loss, silently wrong under SP; see
            :mod:`lightning_ulysses.losses.objectives`). ``False`` for a loss that is rank-local on purpose.
        save_distributed_checkpoint: ``True`` writes a sharded (DCP) checkpoint folder; ``False``
            gathers a single full checkpoint file on rank 0.
        process_group_backend: ``"nccl"``/``"gloo"``; default by device.
        timeout: timeout of every process group, the mesh's SP and DP groups included (so a
            deadlock fails instead of hanging).
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
    """

    strategy_name = "ulysses_fsdp"
    _sharded_checkpoints = True  # every rank writes its shards

    def __init__(
        self,
        sp: int | Literal["auto"] = "auto",
        sharding: Literal["full", "hybrid"] = "full",
        param_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        reduce_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        activation_checkpointing: bool = False,
        offload_activations: bool = False,
        offload_params: bool = False,
        reshard_after_forward: bool = True,
        eval_mode: Literal["sp", "bypass"] = "sp",
        check_batches: bool = True,
        overlap_chunks: int = 1,
        predict_mode: Literal["sp", "bypass"] = "bypass",
        check_loss: bool = True,
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
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self._init_sharding(sharding, param_dtype, reduce_dtype, reshard_after_forward)
        self._init_checkpointing(activation_checkpointing, offload_activations)
        self._offload_params = offload_params
        self._init_ulysses(sp, eval_mode, check_batches, overlap_chunks, predict_mode, check_loss,
                           debug_skip_attention=debug_skip_attention,
                           packed_documents=packed_documents, batch_axes=batch_axes, ring=ring,
                           vision_sp=vision_sp, ring_layout=ring_layout)

    @override
    def _configure_launcher(self) -> None:
        self._validate_world()
        super()._configure_launcher()
        self._guard_launch()  # the model-dependent checks, in the launching process too

    @override
    def setup_environment(self) -> None:
        self._validate_world()
        ParallelStrategy.setup_environment(self)
        self._setup_distributed()
        self._build_mesh()
        self._device_mesh = self._dims.mesh
        self.lightning_module._device_mesh = self._device_mesh

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        if any(isinstance(m, FullyShardedDataParallel) for m in self.model.modules()):
            raise TypeError(
                "found modules wrapped in FSDP1 (FullyShardedDataParallel); UlyssesFSDPStrategy uses FSDP2: apply "
                "torch.distributed.fsdp.fully_shard in configure_model, or let the strategy shard for you."
            )
        self._check_precision()
        self._apply_ulysses(self.lightning_module)
        if trainer.state.fn == TrainerFn.FITTING:
            self._checkpoint_layers(self.lightning_module)
        self._shard(self.lightning_module)
        # FSDP2's CPU offload wants the sharded parameters materialised in host memory
        _materialize_distributed_module(self.model, torch.device("cpu") if self._offload_params else self.root_device)
        self._check_offload()
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING and not self._offload_params:  # offload: state stays on host
            _optimizers_to_device(self.optimizers, self.root_device)
        self._adapt_throughput(trainer)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        if self._offload_params:
            move_buffers(self.model, self.root_device)
        else:
            super().model_to_device()

    @override
    def _get_process_group_backend(self) -> str:
        if self._offload_params and self._process_group_backend is None and self.root_device.type == "cuda":
            return OFFLOAD_BACKEND
        return super()._get_process_group_backend()

    def _check_offload(self) -> None:
        if not self._offload_params:
            return
        assert self.model is not None
        on_device = [n for n, p in self.model.named_parameters() if p.device.type != "cpu"]
        if on_device:
            raise ValueError(
                f"offload_params=True but parameters are not in host memory: {on_device[:3]}. A configure_model "
                "that applies fully_shard itself must pass offload_policy=CPUOffloadPolicy() to it."
            )

    @override
    def teardown(self) -> None:
        self._remove_ulysses()
        self._remove_checkpointing()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("ulysses_fsdp", cls, description="Ulysses SP over FSDP2, sp = processes per node")
        for sp in (2, 4, 8):
            strategy_registry.register(f"ulysses_fsdp_sp{sp}", cls, description=f"Ulysses SP over FSDP2, sp={sp}", sp=sp)
