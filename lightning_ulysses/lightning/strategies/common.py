"""What every Ulysses strategy does besides wrapping the model (DDP or FSDP2).

* the DP×SP mesh and its groups, ranks and sizes;
* the sampler over ``dp`` replicas and worker seeds by ``dp_rank`` (SP peers read the same samples);
* the sharding collate swapped into train/val/test dataloaders, and a fingerprint check that SP
  peers really hold the same batch;
* Ulysses applied to every HF model of the LightningModule in ``setup`` and removed in ``teardown``;
* the check that a training loss went through an SP reduction (``check_loss``), and the SP group
  that :mod:`lightning_ulysses.losses.objectives` reduce over while SP is active;
* predict under SP (``predict_mode="sp"``), with prediction writers on SP rank 0 only;
* configuration errors found before the first step: ``sp`` against the model's heads and the world,
  attention backends that cannot run or train here (in the launching process when the model already
  exists, else in ``setup``, reported by rank 0 alone), and a first training batch without labels;
* a stock ``ThroughputMonitor`` refused under SP (``UlyssesThroughputMonitor`` counts the job);
* checkpoints free of the patch, written atomically with a completion marker, checked before they
  load and unpickled without running code (:mod:`lightning_ulysses.lightning.checkpoint_io`).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, NoReturn

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ...parallel.attention import check_overlap_chunks
from ...parallel.comm import gather_sequence
from ..checkpoint_io import remove_marker, resolve_for_load, safe_unpickling, write_atomically
from ..data import FINGERPRINT_KEY, ShardingCollate, fingerprint_mismatch
from ...models.apply import UlyssesHandle, apply_ulysses, check_packed_documents, check_ring_layout, find_hf_models
from ...models.preflight import check_backend_available, check_backend_trains, choose_model_split
from ...parallel.mesh import ParallelDims, build_mesh, validate_sp, warn_if_sp_spans_nodes
from ...losses.objectives import is_sp_reduced, register_group_source

UNSUPPORTED_PRECISION = ("TransformerEnginePrecision", "BitsandbytesPrecision")

LOCAL_LOSS_ERROR = (
    "the training loss never went through a reduction over the SP group: under Ulysses SP each rank holds only "
    "seq/sp tokens, so a loss computed from this rank's logits alone is its chunk's mean, not the sequence's (and "
    "a shift of the local labels loses a target at every chunk edge). Return the HF model's `out.loss`, or build "
    "the loss with lightning_ulysses.losses.objectives (sp_token_mean, sp_sequence_sum, sp_gather_tokens with "
    "sp_shift_labels(batch)); see README, 'Custom objectives'. If the loss is rank-local on purpose, pass "
    "check_loss=False to the strategy."
)

NO_LABELS_ERROR = (
    "the first training batch has no `labels` (nor `shift_labels`), so the HF model returned loss=None{how}. "
    "Give the dataloader's rows `labels` (e.g. labels = input_ids, -100 where no loss is wanted; the strategy "
    "shifts them on the full sequence), pass labels=... to the model in training_step, or compute your own "
    "objective from the logits with lightning_ulysses.losses.objectives (sp_token_mean, sp_sequence_sum, "
    "sp_gather_tokens); see README, 'Custom objectives'."
)
# How long ranks other than 0 wait before stopping on a configuration error every rank found, so that
# rank 0's report is the one launchers show (the process observer of Lightning's script launcher kills
# rank 0 once a child exits; multiprocessing launchers re-raise the first failure).
PEER_GRACE_S = 10.0


def _report_once(error: Exception, rank: int) -> NoReturn:
    """Raise ``error`` on rank 0; other ranks, which found the same error, stop with one line."""
    if rank == 0:
        raise error
    time.sleep(PEER_GRACE_S)
    raise SystemExit(f"[rank {rank}] stopped by the {type(error).__name__} that rank 0 reports.")


class UlyssesMixin:
    """Sequence-parallel behaviour shared by :class:`UlyssesStrategy` and :class:`UlyssesFSDPStrategy`.

    Must come before the Lightning strategy class in the bases.
    """

    def _init_ulysses(self, sp: int | Literal["auto"], eval_mode: str, check_batches: bool,
                      overlap_chunks: int = 1, predict_mode: str = "bypass", check_loss: bool = True,
                      debug_skip_attention: bool = False, packed_documents: str = "refuse",
                      batch_axes: dict[str, int | None] | None = None, ring: int | None = None,
                      vision_sp: bool = False, ring_layout: str = "zigzag") -> None:
        self._ring_layout = check_ring_layout(ring_layout)  # passed to every apply_ulysses
        if ring is not None and (not isinstance(ring, int) or isinstance(ring, bool) or ring < 1):
            raise ValueError(f"ring must be a positive integer or None, got {ring!r}.")
        self._ring_requested = ring
        self._topology_warned = False
        self._debug_skip_attention = debug_skip_attention  # apply_ulysses warns when it is on
        self._packed_documents = check_packed_documents(packed_documents)
        self._vision_sp = bool(vision_sp)  # passed to every apply_ulysses (models/vision_sp.py)
        self._batch_axes = dict(batch_axes or {})
        if sp != "auto" and (not isinstance(sp, int) or isinstance(sp, bool) or sp < 1):
            raise ValueError(f"sp must be a positive integer or 'auto', got {sp!r}.")
        if eval_mode not in ("sp", "bypass"):
            raise ValueError(f"eval_mode must be 'sp' or 'bypass', got {eval_mode!r}.")
        if predict_mode not in ("sp", "bypass"):
            raise ValueError(f"predict_mode must be 'sp' or 'bypass', got {predict_mode!r}.")
        self._predict_mode = predict_mode
        self._check_loss = check_loss
        self._loss_checked = False
        self._labels_checked = False
        self._unregister_group: Any = None
        self._writer_patches: list[tuple[BasePredictionWriter, dict[str, Any]]] = []
        self._sp_requested = sp
        self._eval_mode = eval_mode
        self._check_batches = check_batches
        self._overlap_chunks = check_overlap_chunks(overlap_chunks)  # early; the heads are checked in setup
        self._dims: ParallelDims | None = None
        self._handles: list[UlyssesHandle] = []
        self._collates: list[tuple[DataLoader, Any]] = []

    # -- sizes and groups ---------------------------------------------------------------------

    @property
    def sp_size(self) -> int:
        """Sequence-parallel degree (``"auto"``: the processes per node)."""
        return self.num_processes if self._sp_requested == "auto" else self._sp_requested

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def sp_rank(self) -> int:
        """Rank inside the SP group; SP groups are contiguous global ranks."""
        return self.global_rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.global_rank // self.sp_size

    @property
    def device_mesh(self):
        """The ``("dp", "sp")`` ``DeviceMesh`` (after ``setup_environment``)."""
        return self._dims.mesh if self._dims is not None else None

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self._require_dims().sp_group

    @property
    def ring_size(self) -> int:
        """Ring degree of the ``sp = ring × ulysses`` split (1: pure Ulysses); known once the models
        are wrapped (``setup``)."""
        return self._dims.ring_size if self._dims is not None else 1

    @property
    def ulysses_size(self) -> int:
        return self.sp_size // self.ring_size

    @property
    def ring_group(self) -> dist.ProcessGroup | None:
        """The ranks that pass key/value blocks around (``None`` without a ring)."""
        return self._require_dims().ring_group

    @property
    def ulysses_group(self) -> dist.ProcessGroup:
        """The ranks that exchange heads (the SP group without a ring)."""
        return self._require_dims().ulysses_group

    @property
    def split_mesh(self):
        """The ``("dp", "ring", "ulysses")`` ``DeviceMesh`` when the SP group runs a ring, else ``None``."""
        return self._dims.split_mesh if self._dims is not None else None

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self._require_dims().dp_group

    def _require_dims(self) -> ParallelDims:
        if self._dims is None:
            raise RuntimeError("the DP x SP mesh exists only after the strategy's setup_environment().")
        return self._dims

    def _validate_world(self) -> None:
        validate_sp(self.num_nodes * self.num_processes, self.sp_size)

    def _guard_launch(self) -> None:
        """Make the launcher run :meth:`_check_before_launch` before it starts any worker (the Trainer
        knows the LightningModule only then, not when the launcher is configured)."""
        launcher = getattr(self, "_launcher", None)
        if launcher is not None and "launch" not in vars(launcher):
            launcher.launch = partial(_checked_launch, self, launcher.launch)

    def _check_before_launch(self, trainer: Any) -> None:
        """The configuration checks that need the model, for models built in ``__init__``: run once in the
        launching process, so the error comes before workers start instead of from every rank."""
        module = self.lightning_module
        if module is None or trainer is None:
            return
        if trainer.state.fn == TrainerFn.PREDICTING and self._predict_mode == "bypass":
            return  # SP is not applied
        models = find_hf_models(module)
        if models:
            rank = self.cluster_environment.global_rank() if self.cluster_environment is not None else 0
            self._preflight(models, self.num_nodes * self.num_processes, trainer.state.fn == TrainerFn.FITTING, rank)

    def _preflight(self, models: list[nn.Module], world: int, training: bool, rank: int) -> tuple[int, int]:
        """``sp`` against every model's heads and the world — returning the ``(ulysses, ring)`` split
        that serves them — and whether each attention backend runs (and trains) here; the error is
        reported by rank 0 alone."""
        device = self.root_device.type if getattr(self, "parallel_devices", None) else "cpu"
        fresh = [m for m in models
                 if not str(getattr(m.config, "_attn_implementation", None) or "").startswith("ulysses_")]
        try:
            split = choose_model_split(fresh or models, self.sp_size, world, self._ring_requested,
                                       getattr(self, "num_processes", None))
            for model in fresh:  # an already-applied model: apply_ulysses says so
                backend = getattr(model.config, "_attn_implementation", None) or "eager"
                check_backend_available(backend)
                if training:
                    check_backend_trains(backend, device)
        except ValueError as error:
            _report_once(error, rank)
        return split

    def _build_mesh(self) -> None:
        # The strategy's timeout for the SP and DP groups too, so a stalled SP peer fails the job in time.
        # the topology warning waits for the ring x ulysses split (_wrap_hf_models)
        self._dims = build_mesh(self.root_device.type, self.sp_size, timeout=getattr(self, "_timeout", None))

    @property
    def sequences_sharded(self) -> bool:
        """Whether the running stage shards each sequence over the SP group; ``False`` in stages that
        bypass SP, where every rank holds distinct full-length samples."""
        return not self._sp_bypassed()

    def _sp_bypassed(self) -> bool:
        """True while the current stage runs the models unpatched on full sequences: predict with
        ``predict_mode="bypass"``, and validation/test with ``eval_mode="bypass"``."""
        trainer = getattr(self.lightning_module, "_trainer", None) if self.lightning_module is not None else None
        if trainer is None:
            return False
        if trainer.state.fn == TrainerFn.PREDICTING:
            return self._predict_mode == "bypass"
        return self._eval_mode == "bypass" and trainer.state.stage != RunningStage.TRAINING

    # -- data ---------------------------------------------------------------------------------

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self._sp_bypassed():  # full sequences, no SP peers: every rank may take distinct samples
            return {"num_replicas": self.world_size, "rank": self.global_rank}
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        if self._sp_bypassed():
            return dataloader
        if not isinstance(dataloader, DataLoader):
            raise TypeError(
                f"UlyssesStrategy needs torch DataLoaders to shard sequences; got {type(dataloader).__name__}."
            )
        if isinstance(dataloader.dataset, IterableDataset) and self.dp_size > 1 and not getattr(
            dataloader.dataset, "ulysses_dp_sharded", False
        ):
            raise ValueError(
                "an IterableDataset under UlyssesStrategy with dp > 1 must give every rank of an SP group the same "
                "samples and different samples to different DP groups: shard it by "
                "`trainer.strategy.dp_rank` / `dp_size` (not the global rank), then set `ulysses_dp_sharded = True` "
                "on the dataset. Or use a map-style Dataset, which the strategy shards for you."
            )
        if _default_worker_init(dataloader.worker_init_fn) and int(os.environ.get("PL_SEED_WORKERS", 0)):
            # Lightning seeds workers by global rank (Fabric before this hook); SP peers must draw the
            # same augmentations.
            dataloader.worker_init_fn = partial(pl_worker_init_function, rank=self.dp_rank)
        if not isinstance(dataloader.collate_fn, ShardingCollate):
            self._collates.append((dataloader, dataloader.collate_fn))
            dataloader.collate_fn = ShardingCollate(
                dataloader.collate_fn, self.sp_rank, self.sp_size, fingerprint=self._check_batches,
                batch_axes=self._batch_axes,
            )
        return dataloader

    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        if isinstance(batch, dict) and FINGERPRINT_KEY in batch:
            batch = copy.copy(batch)  # keeps a ShardedBatch one (it warns when user code reads labels)
            self._check_same_batch(batch.pop(FINGERPRINT_KEY))
        return super().batch_to_device(batch, device, dataloader_idx)

    def _check_same_batch(self, fingerprint: torch.Tensor) -> None:
        dims = self._require_dims()
        if dims.sp_size == 1:
            return
        device = torch.device("cpu") if dist.get_backend(dims.sp_group) == "gloo" else self.root_device
        seen = gather_sequence(fingerprint.to(device)[None], dims.sp_group, dim=0)
        differing = fingerprint_mismatch(seen)
        if differing:
            raise RuntimeError(
                f"ranks of one SP group received different batches ({', '.join(differing)} differ), so Ulysses "
                "would stitch unrelated sequences or label sets together. Use the strategy's sampler (map-style "
                "dataset, use_distributed_sampler=True) or shard iterable datasets by trainer.strategy.dp_rank, "
                "and seed every rank identically (random masking or augmentation included)."
            )

    # -- model --------------------------------------------------------------------------------

    def _check_precision(self) -> None:
        plugin = getattr(self, "precision_plugin", None) or self.precision  # Trainer / Fabric strategies
        name = type(plugin).__name__
        if name in UNSUPPORTED_PRECISION:
            raise ValueError(
                f"precision plugin {name} is not supported by Ulysses SP (its layers bypass the attention "
                "interface); use '32-true', 'bf16-mixed', 'bf16-true', '16-mixed' or '16-true'."
            )

    def _apply_ulysses(self, module: nn.Module) -> None:
        trainer = self.lightning_module._trainer
        predicting = trainer is not None and trainer.state.fn == TrainerFn.PREDICTING
        if self._handles or (predicting and self._predict_mode == "bypass"):
            return
        # Under predict_mode="sp" the predict batches are sharded, so the models must run sharded even
        # in eval mode, whatever eval_mode says for validation.
        self._handles = self._wrap_hf_models(module, "sp" if predicting else self._eval_mode,
                                             "the LightningModule; build the HF model in __init__ or configure_model")
        self.lightning_module._device_mesh = self.device_mesh
        if predicting:
            self._silence_peer_writers(trainer)

    def _wrap_hf_models(self, module: nn.Module, eval_mode: str, where: str) -> list[UlyssesHandle]:
        """Apply Ulysses to every HF model in ``module``; register the SP group for the objectives."""
        models = find_hf_models(module)
        if not models:
            raise ValueError(
                f"{type(self).__name__} found no transformers PreTrainedModel in {where}. Without one the "
                "sharded sequences would be attended locally."
            )
        trainer = getattr(self.lightning_module, "_trainer", None) if hasattr(self, "lightning_module") else None
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        ulysses, ring = self._preflight(models, self.world_size, fitting, self.global_rank)
        dims = self._require_dims()
        if dims.ring_size == 1 and ring > 1:  # collective: every rank reaches it with the same models
            self._dims = dims = dims.split(ulysses, timeout=getattr(self, "_timeout", None))
        elif dims.ring_size != ring:
            raise ValueError(
                f"this module needs the split ulysses={ulysses} x ring={ring}, but the strategy's SP groups already "
                f"run ulysses={dims.ulysses_size} x ring={dims.ring_size} for the modules set up before; pass ring= "
                "to the strategy to fix one split for all of them."
            )
        if self.global_rank == 0 and not self._topology_warned:  # once per job
            self._topology_warned = True
            warn_if_sp_spans_nodes(self.world_size, self.sp_size, self.num_processes, ulysses)
        groups = ({"ring_group": dims.ring_group, "ulysses_group": dims.ulysses_group} if ring > 1 else {})
        handles = [
            apply_ulysses(m, self.sp_group, eval_mode=eval_mode, overlap_chunks=self._overlap_chunks,
                          debug_skip_attention=self._debug_skip_attention, packed_documents=self._packed_documents,
                          vision_sp=self._vision_sp, ring_layout=self._ring_layout, **groups)
            for m in models
        ]
        if self._unregister_group is None:
            self._unregister_group = register_group_source(self._active_sp_group)
        self._loss_checked = False
        self._labels_checked = False
        return handles

    def _active_sp_group(self) -> dist.ProcessGroup | None:
        """The SP group while the models run sharded (what ``objectives.current_sp_group`` returns)."""
        if not self._handles or self._sp_bypassed() or not all(h.active for h in self._handles):
            return None
        return self.sp_group

    def _silence_peer_writers(self, trainer: Any) -> None:
        # Every SP peer holds the same predicted samples; only SP rank 0 writes them, so a writer sees
        # each sample once.
        if self.sp_rank == 0:
            return
        for cb in trainer.callbacks:
            if isinstance(cb, BasePredictionWriter):
                names = ("write_on_batch_end", "write_on_epoch_end")
                self._writer_patches.append((cb, {n: cb.__dict__[n] for n in names if n in cb.__dict__}))
                for n in names:
                    setattr(cb, n, _skip_write)

    # -- the first training batches ---------------------------------------------------------------

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Run the step; until one step has a loss, name missing labels as the cause of a lost loss."""
        if self._labels_checked or not self._handles:
            return super().training_step(*args, **kwargs)
        if not _lacks_labels(args[0] if args else kwargs.get("batch")):
            self._labels_checked = True
            return super().training_step(*args, **kwargs)
        # labels may still come from the step itself (labels=input_ids) or a custom objective: judge the outcome
        lossless: list[bool] = []
        hooks = [h.model.register_forward_hook(partial(_note_lossless, lossless)) for h in self._handles]
        try:
            out = super().training_step(*args, **kwargs)
        except Exception as error:
            if any(lossless):
                raise ValueError(NO_LABELS_ERROR.format(how=", and the training step failed on it")) from error
            raise
        finally:
            for hook in hooks:
                hook.remove()
        if any(lossless) and _step_loss(out) is None:
            raise ValueError(NO_LABELS_ERROR.format(how=" and the training step returned no loss"))
        self._labels_checked = True
        return out

    # -- the loss check -------------------------------------------------------------------------

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Refuse a rank-local loss (``check_loss``), then back-propagate as the base strategy does."""
        self._check_loss_reduced(loss)
        return super().backward(loss, *args, **kwargs)

    def _check_loss_reduced(self, loss: Any) -> None:
        # Checked until one loss passes: a training loop's loss keeps its structure from step to step.
        if not self._check_loss or self._loss_checked or self.sp_size == 1 or self._active_sp_group() is None:
            return
        if not isinstance(loss, Tensor) or loss.grad_fn is None:
            return
        if not is_sp_reduced(loss):
            raise RuntimeError(LOCAL_LOSS_ERROR)
        self._loss_checked = True

    def _adapt_throughput(self, trainer: Any) -> None:
        # Lightning's ThroughputMonitor counts every rank as a replica of whole samples: under SP its
        # global rates miss for dp = 1 and its device rates are the SP group's. Refuse it rather than
        # log wrong numbers (or edit its private state).
        if self.sp_size > 1 and any(isinstance(cb, ThroughputMonitor) for cb in trainer.callbacks):
            raise ValueError(
                "Lightning's ThroughputMonitor miscounts under sequence parallelism (it takes every rank for a "
                "replica holding whole samples). Use lightning_ulysses.UlyssesThroughputMonitor, with the same "
                "arguments: global rates count the job's distinct samples and tokens, device rates this device's."
            )

    def _remove_ulysses(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for loader, collate in self._collates:
            loader.collate_fn = collate
        self._collates = []
        for cb, saved in self._writer_patches:
            for n in ("write_on_batch_end", "write_on_epoch_end"):
                cb.__dict__.pop(n, None)
            cb.__dict__.update(saved)
        self._writer_patches = []
        if self._unregister_group is not None:
            self._unregister_group()
            self._unregister_group = None
        module = getattr(self, "lightning_module", None)  # Fabric strategies have none
        if module is not None and module._device_mesh is self.device_mesh:
            module._device_mesh = None

    # -- checkpoints --------------------------------------------------------------------------

    def _clean_checkpoint(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Replace HF configs in saved hyperparameters that still name this run's SP attention."""
        names = {h.name: h for h in self._handles}
        if not names:
            return checkpoint
        out = dict(checkpoint)
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in out:
                out[key] = _restore_configs(out[key], names)
        return out

    _sharded_checkpoints = False  # whether every rank writes (FSDP), or rank 0 alone (DDP)

    def _write_checkpoint(self, path: Any, write: Callable[[Path], None], state: dict[str, Any]) -> None:
        """Run ``write(staged)`` (the base strategy's save) through :func:`write_atomically`.

        Called on every rank. Sharded checkpoints: every rank writes, so the ranks agree on the path and
        wait for each other; otherwise only rank 0 writes and nobody waits (a DDP save may run on rank 0
        alone).
        """
        sharded = self._sharded_checkpoints
        if sharded:
            path = self.broadcast(path)
        step = state.get("global_step")
        write_atomically(path, write, global_step=step if type(step) is int else None,
                         is_rank_zero=self.is_global_zero, barrier=self.barrier if sharded else None)

    def _read_checkpoint(self, path: Any, weights_only: bool | None, load: Callable[[Path], Any]) -> Any:
        """Check the checkpoint at ``path`` (a torn ``last`` one falls back to the newest complete one),
        then run ``load(path)`` (the base strategy's, with ``weights_only=True``) under
        :func:`safe_unpickling`. Nothing is loaded from a checkpoint that fails either check."""
        if weights_only is False:
            rank_zero_warn(
                f"{type(self).__name__} loads checkpoints with torch.load(weights_only=True) whatever weights_only "
                "says; allow further types with torch.serialization.safe_globals([...]) around the call."
            )
        path = resolve_for_load(path, fall_back=self._is_last_checkpoint(path))
        with safe_unpickling(path):
            return load(path)

    def _is_last_checkpoint(self, path: Any) -> bool:
        """Whether ``path`` has the name a ``ModelCheckpoint`` of the Trainer gives its ``last`` checkpoint
        (what ``ckpt_path="last"`` resolves to); always ``False`` under Fabric."""
        module = getattr(self, "lightning_module", None)
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is None:
            return False
        path = Path(path)
        return any(
            path.suffix == cb.FILE_EXTENSION and path.stem.startswith(cb.CHECKPOINT_NAME_LAST)  # Lightning's own test
            for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
        )


class TrainerCheckpointsMixin:
    """The Trainer strategies' checkpoint hooks, on :class:`UlyssesMixin`'s helpers (Fabric's signatures
    differ: :class:`~.fabric.FabricUlyssesMixin`). Comes first in the bases."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write the checkpoint free of the patch, atomically, with its completion marker: the file (rank 0)
        or DCP folder (every rank its shards) at ``filepath`` is the previous one or the new one, whole."""
        checkpoint = self._clean_checkpoint(checkpoint)
        save = super().save_checkpoint
        self._write_checkpoint(filepath, lambda staged: save(checkpoint, staged, storage_options=storage_options),
                               checkpoint)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checked checkpoint with ``weights_only=True``; a torn one is refused before any weight
        loads, a torn ``last.ckpt`` falls back to the newest complete one (warning)."""
        load = super().load_checkpoint
        return self._read_checkpoint(checkpoint_path, weights_only, lambda path: load(path, weights_only=True))

    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove a checkpoint (top-k pruning) with its sidecar marker."""
        super().remove_checkpoint(filepath)
        if self.is_global_zero:
            remove_marker(filepath)


def _checked_launch(strategy: UlyssesMixin, launch: Callable[..., Any], function: Callable[..., Any], *args: Any,
                    trainer: Any = None, **kwargs: Any) -> Any:
    # module level (with partial) so that a spawn launcher can still pickle the strategy
    strategy._check_before_launch(trainer)
    return launch(function, *args, trainer=trainer, **kwargs)


def _lacks_labels(batch: Any) -> bool:
    return isinstance(batch, Mapping) and batch.get("labels") is None and batch.get("shift_labels") is None


def _note_lossless(seen: list[bool], module: nn.Module, args: Any, output: Any) -> None:
    if module.training and isinstance(output, Mapping) and "logits" in output:
        seen.append(output.get("loss") is None)


def _step_loss(out: Any) -> Any:
    return out.get("loss") if isinstance(out, Mapping) else out


def _default_worker_init(fn: Any) -> bool:
    """None, or Lightning's own seeding by global rank (which Fabric adds before ``process_dataloader``)."""
    return fn is None or (isinstance(fn, partial) and fn.func is pl_worker_init_function)


def _skip_write(*args: Any, **kwargs: Any) -> None:
    return None


def _restore_configs(obj: Any, names: dict[str, UlyssesHandle]) -> Any:
    from transformers import PretrainedConfig

    if isinstance(obj, PretrainedConfig):
        current = getattr(obj, "_attn_implementation_internal", None)
        if current in names:
            original = dict((id(c), v) for c, v in names[current]._saved_attn).get(id(obj))
            obj = copy.deepcopy(obj)
            obj._attn_implementation_internal = original
        return obj
    if isinstance(obj, dict):
        new = copy.copy(obj)  # keeps AttributeDict and other dict subclasses
        for k, v in obj.items():
            new[k] = _restore_configs(v, names)
        return new
    if isinstance(obj, (list, tuple)):
        return type(obj)(_restore_configs(v, names) for v in obj)
    return obj
