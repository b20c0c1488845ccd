"""``UlyssesStrategy``: DDP over all ``dp x sp`` ranks with Ulysses sequence parallelism."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from .common import TrainerCheckpointsMixin, UlyssesMixin


class UlyssesStrategy(TrainerCheckpointsMixin, UlyssesMixin, DDPStrategy):
    """Ulysses sequence parallelism for HuggingFace models, on top of Lightning's DDP.

    ``Trainer(strategy=UlyssesStrategy(sp=4), devices=8)`` builds a ``("dp", "sp")`` device mesh
    (SP groups are contiguous ranks), applies Ulysses to every transformers ``PreTrainedModel`` in
    the LightningModule for fit/validate/test, gives every rank of an SP group the same samples and
    keeps this rank's sequence chunk of each batch. DDP reduces gradients over all ``dp x sp``
    ranks, which together with the SP loss (docs/sp-loss.md) reproduces a non-SP run exactly.

    Args:
        sp: sequence-parallel degree; ``"auto"`` uses the processes per node.
        eval_mode: ``"sp"`` runs validation/test sharded (exact, long-context safe);
            ``"bypass"`` runs the models unpatched in eval mode on full sequences.
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
        find_unused_parameters: passed to ``DistributedDataParallel``.
        static_graph: passed to ``DistributedDataParallel``.
        gradient_as_bucket_view: passed to ``DistributedDataParallel``.
        process_group_backend: ``"nccl"``/``"gloo"``; default by device.
        timeout: timeout of every process group (so a deadlock fails instead of hanging).
        start_method: ``"popen"`` (script launcher), ``"spawn"``, ``"fork"`` or ``"forkserver"``.
        debug_skip_attention: **debug only, wrong results**: every attention layer but the last skips
            its attention computation (see :func:`~lightning_ulysses.apply_ulysses`), to find the memory
            limit of a configuration quickly. Off by default; warns loudly when on.
        packed_documents: rows that are packed (``position_ids`` restarting inside a row) *and* carry an
            ``attention_mask``: ``"refuse"`` (default) raises at the first such batch, because the
            non-SP transformers model attends across their documents; ``"split"`` keeps the
            documents (and the padding) apart, as in a packed row without a mask (README, "Packed rows").
        batch_axes: ``{key: sequence axis}`` for per-token batch keys the sharding collate does not
            know (``{key: None}`` passes a key whole); an unknown tensor with an axis of the row
            length is refused otherwise (see :func:`~lightning_ulysses.shard_batch`).
        ring: ring degree of the split ``sp = ring × ulysses`` (README, "Beyond the head count"):
            ``None`` (default) picks the largest Ulysses degree the model's heads allow that also
            divides the processes per node, and runs the rest of ``sp`` as ring attention (so ``sp``
            may exceed the heads); ``ring=sp`` is a pure ring, ``ring=1`` pure Ulysses.
        vision_sp: split a vision-language model's images over the SP ranks (each encodes its share,
            the features are all-gathered; :func:`~lightning_ulysses.apply_ulysses`). Default ``False``.
        ring_layout: under a ring, ``"zigzag"`` (default) re-lays each causal layer's ring blocks out
            so that every ring rank computes the same share of the causal attention (one all-to-all of
            half blocks on the ring group each way); ``"contiguous"`` keeps the data path's blocks.
            Same results (:func:`~lightning_ulysses.apply_ulysses`).

    The LightningModule sees the mesh as ``self.device_mesh``; the strategy exposes ``sp_group``,
    ``dp_group``, ``sp_rank``, ``dp_rank``, ``sp_size`` and ``dp_size``, and for the split ``ring_group``,
    ``ulysses_group``, ``ring_size``, ``ulysses_size`` and ``split_mesh``. ``predict`` bypasses SP
    unless ``predict_mode="sp"``.
    """

    strategy_name = "ulysses"

    def __init__(
        self,
        sp: int | Literal["auto"] = "auto",
        eval_mode: Literal["sp", "bypass"] = "sp",
        check_batches: bool = True,
        overlap_chunks: int = 1,
        predict_mode: Literal["sp", "bypass"] = "bypass",
        check_loss: bool = True,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        debug_skip_attention: bool = False,
        packed_documents: Literal["refuse", "split"] = "refuse",
        batch_axes: dict[str, int | None] | None = None,
        ring: int | None = None,
        vision_sp: bool = False,
        ring_layout: Literal["zigzag", "contiguous"] = "zigzag",
    ) -> None:
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            find_unused_parameters=find_unused_parameters,
            static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view,
        )
        self._init_ulysses(sp, eval_mode, check_batches, overlap_chunks, predict_mode, check_loss,
                           debug_skip_attention=debug_skip_attention,
                           packed_documents=packed_documents, batch_axes=batch_axes, ring=ring,
                           vision_sp=vision_sp, ring_layout=ring_layout)

    @override
    def _configure_launcher(self) -> None:
        self._validate_world()  # in the launching process, before any worker starts
        super()._configure_launcher()
        self._guard_launch()  # the model-dependent checks, in the launching process too

    @override
    def setup_environment(self) -> None:
        self._validate_world()
        super().setup_environment()
        self._build_mesh()

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        self._check_precision()
        self._apply_ulysses(self.lightning_module)
        super().setup(trainer)
        self._adapt_throughput(trainer)

    @override
    def teardown(self) -> None:
        self._remove_ulysses()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("ulysses", cls, description="Ulysses SP over DDP, sp = processes per node")
        for sp in (2, 4, 8):
            strategy_registry.register(f"ulysses_sp{sp}", cls, description=f"Ulysses SP over DDP with sp={sp}", sp=sp)
