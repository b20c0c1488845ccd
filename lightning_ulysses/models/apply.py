"""Apply Ulysses SP to a HuggingFace model in place, reversibly: :func:`apply_ulysses`.

First the model is analysed (:func:`~lightning_ulysses.models.analysis.analyse_model`): it is either run
exactly or refused with :class:`~lightning_ulysses.models.analysis.UnsupportedModelError` before anything
is touched. Then, all of it per model and undone by :meth:`UlyssesHandle.remove`:

* gives the model a private copy of its config (transformers shares one between models);

* registers this model's Ulysses attention in transformers' ``AttentionInterface`` under a name
  unique to the handle, and points the model config's attention implementation at it (the name is
  not serialised by ``save_pretrained``). HF builds no mask for an unknown name, so no local mask
  can be silently misapplied; masks are rebuilt for the full sequence (:mod:`.masks`);
* wraps the model's ``forward`` (instance attribute) to gather the sequence metadata once per
  forward — global positions, padding, labels — derive global ``position_ids`` and
  ``shift_labels`` when the caller did not pass them, and hand a :class:`ForwardContext` to the
  attention and loss through the model's ``**kwargs`` (so activation-checkpoint recomputation sees
  the same context);
* replaces the model's ``loss_function`` (instance attribute) by the exact SP token mean
  (:mod:`.loss`), or computes the loss from the logits when the model does not call it (masked
  LMs, inline losses); makes an MoE load-balancing loss global (:mod:`.moe`);
* patches the non-attention token mixers that :mod:`.mixers` runs under SP;
* for a vision-language model, gathers the row's token ids so that the model merges its images and
  derives its positions on the whole row, and cuts its language model's inputs to the chunk
  (:mod:`.multimodal`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from ..parallel.attention import HeadLayout, check_backend, make_ulysses_attention
from ..parallel.comm import gather_sequence
from .analysis import ModelPlan, UnsupportedModelError, analyse_model
from .context import CONTEXT_KWARG, ForwardContext
from .debug import debug_attend_layer
from ..losses.sp_loss import causal_lm_loss_sum, shift_labels_full, sp_mean
from ..parallel.masks import SequenceMetadata
from .moe import add_to_loss, wants_router_logits, zero_coefficient
from .multimodal import (attach_image_blocks, call_with_full_row, check_composite_call,
                         check_encoders_run_on_every_rank, check_mask_switch, full_row_inputs, wrap_language_model)
from .patching import add_forward_wrapper, base_forward, bind_call, isolate_config, remove_forward_wrapper
from .positions import derive_positions
from .preflight import check_backend_available, check_backend_trains
from .vision_sp import plan_vision_split, split_vision
from .whole_sequence import CACHE_ARGUMENTS, apply_whole_sequence

IGNORE_INDEX = -100
PackedDocuments = Literal["refuse", "split"]
RingLayout = Literal["zigzag", "contiguous"]
_MISSING = object()
_ids = itertools.count()


def check_packed_documents(value: str) -> PackedDocuments:
    """``value`` if it is a valid ``packed_documents`` policy (``"refuse"`` or ``"split"``), else a
    ValueError; the strategies call it at construction, before any model exists."""
    if value not in ("refuse", "split"):
        raise ValueError(f"packed_documents must be 'refuse' or 'split', got {value!r}.")
    return value  # type: ignore[return-value]


def _config_tree(config: Any) -> Iterator[Any]:
    yield config
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            yield from _config_tree(sub)


class UlyssesHandle:
    """The result of :func:`apply_ulysses`; :meth:`remove` restores the model exactly.

    Attributes:
        model: the patched model.
        group: its SP process group.
        sp_size / sp_rank: size of ``group`` and this process's rank in it.
        backend: the model's own attention implementation, run on the full sequence.
        eval_mode: ``"sp"`` (eval runs sharded, like training) or ``"bypass"`` (in ``model.eval()``
            the model runs unpatched on whatever full sequence it is given, e.g. for generation).
        overlap_chunks: head groups per rank whose exchanges overlap attention compute (1: none).
        debug_skip_attention: the debug mode of :func:`apply_ulysses` is on (results are wrong).
        vision_sp: a vision-language model's images are encoded split over the SP group
            (:mod:`.vision_sp`); ``False`` when not asked for, not a composite, or its encoder call
            has another form (``vision_sp_reason`` then says why).
    """

    def __init__(self, model: nn.Module, group: ProcessGroup, eval_mode: Literal["sp", "bypass"] = "sp",
                 overlap_chunks: int = 1, debug_skip_attention: bool = False,
                 packed_documents: PackedDocuments = "refuse", ring_group: ProcessGroup | None = None,
                 ulysses_group: ProcessGroup | None = None, vision_sp: bool = False,
                 ring_layout: RingLayout = "zigzag") -> None:
        if eval_mode not in ("sp", "bypass"):
            raise ValueError(f"eval_mode must be 'sp' or 'bypass', got {eval_mode!r}.")
        self.ring_layout = check_ring_layout(ring_layout)
        self.packed_documents = check_packed_documents(packed_documents)
        if not dist.is_initialized():
            raise RuntimeError("apply_ulysses needs torch.distributed to be initialised (the SP group's world).")
        sp_size = dist.get_world_size(group)
        self.ring_size, self.ulysses_size = _split_sizes(sp_size, ring_group, ulysses_group)
        self.ring_group = ring_group if self.ring_size > 1 else None
        self.ulysses_group = ulysses_group if self.ring_size > 1 else group
        if self.ring_size > 1:
            rank = dist.get_rank(group)
            if (dist.get_rank(ring_group), dist.get_rank(ulysses_group)) != divmod(rank, self.ulysses_size):
                raise ValueError(
                    f"SP rank {rank} is ring rank {dist.get_rank(ring_group)} and Ulysses rank "
                    f"{dist.get_rank(ulysses_group)}; expected {divmod(rank, self.ulysses_size)} (Ulysses groups are "
                    "consecutive SP ranks, so that each ring rank's Ulysses group holds one contiguous block). Build "
                    "the groups with lightning_ulysses.parallel.mesh.ParallelDims.split."
                )
        # Everything that decides whether the model can be exact, before anything is touched; the
        # heads are shared by the Ulysses ranks only (a ring passes whole blocks).
        self.plan: ModelPlan = analyse_model(model, self.ulysses_size)
        if self.ring_size > 1:
            check_ring_plan(model, self.plan, overlap_chunks)
        composite = self.plan.composite
        # A vision-language model: Ulysses runs in its language model only, so heads and the
        # attention backend are the language model's (its vision tower keeps its own backend).
        config = composite.module.config if composite is not None else model.config
        self.model = model
        self.group = group
        self.sp_size = sp_size
        self.sp_rank = dist.get_rank(group)
        self.eval_mode = eval_mode
        num_heads = config.num_attention_heads
        num_kv = getattr(config, "num_key_value_heads", None) or num_heads
        self.layout = HeadLayout.validate(num_heads, num_kv, self.ulysses_size)
        if str(config._attn_implementation).startswith("ulysses_"):
            raise ValueError(
                f"{type(model).__name__} already has Ulysses applied; call remove() on its handle before applying "
                "again (the Ulysses strategies apply it for you in setup)."
            )
        self.backend = check_backend(config._attn_implementation)
        check_backend_available(self.backend)
        # Built (and its overlap_chunks validated) before anything of the model is touched.
        attend_layer = debug_attend_layer(model) if debug_skip_attention else None
        per_head = {id(model.get_submodule(name)): dims for name, dims in self.plan.per_head.items()}
        windows = {id(model.get_submodule(name)): w for name, w in self.plan.windows.items()}
        chunks = {id(model.get_submodule(name)): c for name, c in self.plan.chunks.items()}
        attention = make_ulysses_attention(self.backend, self.layout, self._context_from, overlap_chunks,
                                           debug_attend_layer=attend_layer, per_head=per_head, windows=windows,
                                           chunks=chunks, ring=self.ring_size > 1)
        self.overlap_chunks = overlap_chunks
        self.debug_skip_attention = debug_skip_attention
        split, self.vision_sp_reason = (plan_vision_split(model, composite) if vision_sp and composite is not None
                                        else (None, "" if composite is None else "vision_sp=False"))
        self.vision_sp = split is not None
        if vision_sp and composite is not None and split is None:
            warnings.warn(f"vision_sp: {self.vision_sp_reason}; its images are encoded whole on every SP rank.",
                          stacklevel=3)
        self.name = f"ulysses_{next(_ids)}"
        self._bypass_depth = 0
        self._current: ForwardContext | None = None
        self._removed = False

        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(self.name, attention)
        # transformers shares one config object between models built from it (policy + reference,
        # teacher + student): this model gets its own copy, so pointing it at the Ulysses attention
        # changes nothing another model sees.
        self._undo_config = isolate_config(model)
        config = composite.module.config if composite is not None else model.config
        self._saved_attn = [(c, c._attn_implementation_internal) for c in _config_tree(config)]
        self._set_attn(self.name)

        self._signature = inspect.signature(base_forward(model))
        # Outermost: inner wrappers (the tiled loss) see the prepared SP kwargs.
        self._forward_token = add_forward_wrapper(model, self._forward, priority=100)

        self._saved_loss = model.__dict__.get("_loss_function", _MISSING)
        self._orig_loss = model.loss_function
        model.loss_function = self._loss
        self._undo_mixers = [impl.apply(module, self._running_context) for _, module, impl in self.plan.mixers]
        self._undo_whole_sequence = apply_whole_sequence(model, self.plan.position_modules, self.plan.offset_modules,
                                                         self._running_context)
        self._undo_language_model = (wrap_language_model(composite, self._running_context, self._own_random_stream)
                                     if composite is not None else (lambda: None))
        self._undo_vision = split_vision(split, self._running_context) if split is not None else (lambda: None)

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while the patch is applied and not bypassed."""
        return not self._removed and self._bypass_depth == 0

    def remove(self) -> None:
        """Restore the model exactly as it was (attention, forward, loss); idempotent."""
        if self._removed:
            return
        from transformers.modeling_utils import AttentionInterface

        model = self.model
        for cfg, value in self._saved_attn:
            cfg._attn_implementation_internal = value
        remove_forward_wrapper(model, self._forward_token)
        if self._saved_loss is _MISSING:
            del model._loss_function
        else:
            model._loss_function = self._saved_loss
        self._undo_vision()
        self._undo_language_model()
        self._undo_whole_sequence()
        for undo in reversed(self._undo_mixers):
            undo()
        self._undo_config()
        AttentionInterface._global_mapping.pop(self.name, None)
        self._current = None
        self._removed = True

    @contextlib.contextmanager
    def bypass(self) -> Iterator[None]:
        """Run the model unpatched inside the block (full sequences on every rank, no collectives)."""
        self._bypass_depth += 1
        self._set_attn(None)
        try:
            yield
        finally:
            self._bypass_depth -= 1
            if self._bypass_depth == 0 and not self._removed:
                self._set_attn(self.name)

    def _set_attn(self, name: str | None) -> None:
        for cfg, original in self._saved_attn:
            cfg._attn_implementation_internal = name or original

    # -- forward ------------------------------------------------------------------------------

    def _forward(self, next_forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._bypass_depth or (self.eval_mode == "bypass" and not self.model.training):
            self._current = None  # SP mixers run their own forward outside an SP forward
            with self.bypass():
                return next_forward(*args, **kwargs)
        if self.model.training and torch.is_grad_enabled():  # before a whole forward, not at its backward
            check_backend_trains(self.backend, next(self.model.parameters()).device.type)
        call = bind_call(self._signature, args, kwargs)
        ctx, targets = self._prepare(call)
        self._current = ctx
        plan = self.plan
        aux = None
        if wants_router_logits(self.model, call):
            aux = plan.aux_loss
            if plan.aux_refused:
                raise UnsupportedModelError(
                    f"{type(self.model).__name__} adds an auxiliary loss that Ulysses cannot make global over the "
                    "sequence; call it with output_router_logits=False."
                )
        restore = zero_coefficient(self.model, aux.coef_attr) if aux is not None else None
        # A composite draws its own stream in its language model only (multimodal.py): the
        # replicated vision tower draws the shared one, so SP peers compute identical features.
        stream = self._own_random_stream() if self.plan.composite is None else contextlib.nullcontext()
        try:
            with stream:
                out = next_forward(**call)
        finally:
            coef = restore() if restore is not None else 0.0
        if ctx.attention_calls == 0:
            raise RuntimeError(
                f"{type(self.model).__name__} did not call its attention through transformers' AttentionInterface "
                "(nor a token mixer Ulysses shards), so Ulysses could not shard it; this model is not supported."
            )
        if targets is not None:
            # The model was called without labels (its loss is not computed through
            # self.loss_function, or it is a masked LM): the exact SP loss from its logits.
            out["loss"] = sp_mean(causal_lm_loss_sum(out.logits, targets), ctx.num_valid, ctx.group)
        elif call.get("labels") is not None and ctx.loss_calls == 0:
            raise RuntimeError(
                f"{type(self.model).__name__} computed its loss without `self.loss_function`; under SP that loss "
                "would be a local, wrong value. Call the model without labels and use lightning_ulysses.losses.objectives."
            )
        if aux is not None and getattr(out, "router_logits", None) is not None:
            b = (call.get("input_ids") if call.get("input_ids") is not None else call["inputs_embeds"]).shape[0]
            add_to_loss(out, aux.global_aux_loss(self.model, tuple(out.router_logits), ctx, b), coef)
        return out

    @contextlib.contextmanager
    def _own_random_stream(self) -> Iterator[None]:
        """In a training forward with dropout, give every SP rank its own random stream.

        SP ranks share one seed, so without this each rank would draw the same dropout mask for its
        chunk of the sequence (and, after the exchange, for its group of heads): masks would repeat
        across chunks and head groups. Each rank draws from a stream derived from the shared one and
        its SP rank; the shared stream advances by one draw on every rank alike and is restored
        afterwards, so everything outside the model still sees identical random numbers on SP peers.
        Activation-checkpoint recomputation replays the stream it saved, as without SP.
        """
        if not (self.model.training and self.plan.dropout) or self.sp_size == 1:
            yield
            return
        device = next(self.model.parameters()).device
        devices = [device] if device.type == "cuda" else []
        seed = int(torch.randint(0, 2**62, (1,)).item())
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
            torch.manual_seed(seed + 1_000_003 * (self.sp_rank + 1))
            yield

    def _running_context(self) -> ForwardContext | None:
        """The context of the SP forward running now (for non-attention mixers); ``None`` in a
        bypassed forward."""
        return None if self._bypass_depth else self._current

    def _prepare(self, call: dict[str, Any]) -> tuple[ForwardContext, Tensor | None]:
        """Gather the sequence metadata once and prepare the call; returns the context and, when the
        handle computes the loss itself, this rank's targets ``[b, seq/sp]``."""
        ref = call.get("input_ids")
        if ref is None:
            ref = call.get("inputs_embeds")
        if ref is None:
            raise ValueError("Ulysses SP needs input_ids or inputs_embeds of shape [batch, seq/sp].")
        composite = self.plan.composite
        check_composite_call(composite, self.model, call)
        if any(call.get(name) is not None for name in CACHE_ARGUMENTS):
            raise ValueError(
                "a KV cache cannot be used under Ulysses SP (it would hold one chunk). Generate inside "
                "`handle.bypass()` or apply with eval_mode='bypass'."
            )
        params = self._signature.parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if "use_cache" in params or (takes_kwargs and hasattr(self.model.config, "use_cache")):
            call["use_cache"] = False  # a cache would hold one chunk (some models take it through **kwargs)
        b, s_local = ref.shape[:2]
        device = ref.device
        plan = self.plan

        shapes = gather_sequence(torch.tensor([[b, s_local]], device=device), self.group, dim=0)
        if not bool((shapes == shapes[0]).all()):
            raise ValueError(
                f"every SP rank must hold an equal-length chunk of the same batch; got [batch, seq/sp] = "
                f"{shapes.tolist()}. Pad the full sequence to a multiple of sp before sharding "
                "(lightning_ulysses.lightning.data.shard_batch does)."
            )

        mask = call.pop("attention_mask", None)
        if mask is not None and mask.dim() != 2:
            raise ValueError("under Ulysses SP, attention_mask must be a 2D [batch, seq/sp] padding mask.")
        external = plan.objective == "masked" or (plan.objective == "causal" and not plan.loss_in_forward)
        labels = call.pop("labels", None) if external else call.get("labels")
        shift = call.pop("shift_labels", None) if external else call.get("shift_labels")
        if plan.objective is None and (labels is not None or shift is not None):
            raise ValueError(f"{type(self.model).__name__} has no LM head, so it takes no labels under Ulysses SP.")
        if plan.objective == "masked":
            label_src = labels  # a masked LM predicts the token at its own position: nothing shifts
        else:
            label_src = shift if shift is not None else labels
        given = call.get("position_ids")
        ids = call.get("input_ids")
        zeros = torch.zeros(b, s_local, dtype=torch.long, device=device)
        # Positions as [planes, b, s/sp]: one plane, or mrope's 3 (or 4, the first being the text
        # positions transformers detects packing from) for models that take 3-D position_ids.
        planes = _position_planes(given, b, s_local) if given is not None else zeros[None]
        rows = [*planes, (mask if mask is not None else torch.ones_like(zeros)).long()]
        if label_src is not None:
            rows.append(label_src.long().to(device))
        derive_from_ids = given is None and plan.positions == "from_input_ids" and ids is not None
        row_inputs = full_row_inputs(composite, call)  # a composite's, gathered in the same collective
        first_row_input = len(rows)
        rows += [value.long().expand(b, s_local) for _, value in row_inputs]
        if derive_from_ids:
            rows.append(ids.long())
        full = gather_sequence(torch.stack(rows), self.group, dim=2)  # one collective: [rows, b, seq]
        p = len(planes)
        full_mask, full_labels = full[p], full[p + 1] if label_src is not None else None
        lo = self.sp_rank * s_local

        if given is not None:
            # transformers reads documents from 2-D positions and from the text plane of 4-plane mrope
            # positions; 3-plane mrope positions describe no documents.
            text = full[0] if p in (1, 4) else None
            positions = text if text is not None else torch.arange(full.shape[-1], device=device).expand(b, -1)
        else:
            # Global positions, derived as the model would on the full sequence: local ones
            # (0..s/sp-1 on every rank) silently corrupt RoPE and learned positions.
            positions = derive_positions(plan.positions, b, full.shape[-1], device,
                                         mask=full_mask if mask is not None else None,
                                         input_ids=full[-1] if derive_from_ids else None,
                                         padding_idx=plan.padding_idx)
            if composite is None:
                call["position_ids"] = positions[:, lo : lo + s_local]
            # else the outer model derives its own (mrope) positions from the whole row; the language
            # model falls back on these when it derives none (multimodal.wrap_language_model)
        if composite is not None:
            whole = call_with_full_row(composite, self.model, call, row_inputs, full[first_row_input:], mask,
                                       full_mask, given, full[:p])
        metadata = SequenceMetadata.from_gathered(positions, full_mask.bool() if mask is not None else None)
        if given is None or p == 3:
            metadata.doc_ids = None  # derived positions never describe packed documents
        elif metadata.doc_ids is not None and (mask is not None or not plan.splits_packed_rows):
            self._packed_rows_differ(with_mask=mask is not None)
        if composite is not None:
            attach_image_blocks(composite, self.model, metadata, whole)  # Gemma 3's image tokens, ...
            check_mask_switch(composite, self.model, metadata, self.backend)
            check_encoders_run_on_every_rank(composite, self.model, call)
        if "cache_position" in self._signature.parameters and call.get("cache_position") is None:
            # the index of each token in the whole row, as the non-SP model numbers it (a composite
            # gets the whole row's, cut by its language model's wrapper)
            call["cache_position"] = (torch.arange(lo, lo + s_local, device=device) if composite is None
                                      else torch.arange(full.shape[-1], device=device))
        num_valid: Tensor | int = 0
        targets = None
        if label_src is not None:
            if plan.objective == "masked" or shift is not None:
                target_full = full_labels
            else:
                target_full = shift_labels_full(full_labels, IGNORE_INDEX)
            if mask is not None:
                # A padding query attends to no real token; what it "predicts" is backend noise.
                target_full = target_full.masked_fill(full_mask == 0, IGNORE_INDEX)
            num_valid = (target_full != IGNORE_INDEX).sum()  # a tensor: no host sync on GPUs
            local = target_full[:, lo : lo + s_local]
            if external:
                targets = local
            elif shift is None or mask is not None:
                call["shift_labels"] = local
        ctx = ForwardContext(self.group, self.sp_rank, self.sp_size, s_local, metadata, num_valid,
                             ulysses_group=self.ulysses_group, ring_group=self.ring_group, ring_size=self.ring_size,
                             ring_layout=self.ring_layout)
        call[CONTEXT_KWARG] = ctx
        return ctx, targets

    def _packed_rows_differ(self, with_mask: bool) -> None:
        """Packed rows (positions restarting) that the non-SP model would attend across: given with
        an attention_mask, or to a model whose masks ignore the restarts."""
        if self.packed_documents == "split":
            return  # documents kept apart, padding masked: the documented opt-in
        if with_mask:
            why = ("*and* an attention_mask. transformers keeps packed documents apart only when no attention_mask "
                   "is given: with a mask, the non-SP model attends across the documents of a row and masks only the "
                   "padding")
            fix = ("Drop the attention_mask (padding that restarts its positions is its own document, as in "
                   "lightning_ulysses.pack_documents and transformers' DataCollatorWithFlattening), or pass")
        else:
            if self.plan.mixers:
                how = ("its token mixers (Mamba, linear attention) carry their state across a document start "
                       "without SP")
            else:
                how = "its attention masks do not read position_ids (bidirectional, or built without them)"
            why = (f"for {type(self.model).__name__}: {how}, so the non-SP model mixes the documents of a packed "
                   "row")
            fix = "Do not pack rows for this model, or pass"
        raise UnsupportedModelError(
            f"this batch has packed rows (position_ids restart inside a row) {why}, whereas SP would keep them "
            f"apart: turning SP on would change what is trained. {fix} packed_documents='split' to the strategy / "
            "apply_ulysses to keep documents apart (and mask the padding)."
        )

    def _context_from(self, kwargs: dict[str, Any]) -> ForwardContext:
        ctx = kwargs.pop(CONTEXT_KWARG, None) or self._current
        if ctx is None:
            raise RuntimeError("Ulysses attention was called outside a Ulysses forward.")
        return ctx

    # -- loss ---------------------------------------------------------------------------------

    def _loss(
        self,
        logits: Tensor,
        labels: Tensor | None,
        vocab_size: int,
        num_items_in_batch: Tensor | int | None = None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        ctx = kwargs.pop(CONTEXT_KWARG, None)
        if ctx is None:
            return self._orig_loss(
                logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index, shift_labels=shift_labels, **kwargs,
            )
        ctx.loss_calls += 1
        local_sum = causal_lm_loss_sum(logits, shift_labels, ignore_index)
        total = num_items_in_batch if num_items_in_batch is not None else ctx.num_valid
        return sp_mean(local_sum, total, ctx.group)


def check_ring_layout(value: str) -> str:
    """``value`` if it names a ring layout (``"zigzag"`` or ``"contiguous"``), else a ValueError."""
    if value not in ("zigzag", "contiguous"):
        raise ValueError(f"ring_layout must be 'zigzag' or 'contiguous', got {value!r}.")
    return value


def _split_sizes(sp_size: int, ring_group: ProcessGroup | None,
                 ulysses_group: ProcessGroup | None) -> tuple[int, int]:
    """``(ring, ulysses)`` sizes of an SP group split by these groups (``(1, sp)`` without a ring)."""
    if (ring_group is None) != (ulysses_group is None):
        raise ValueError("pass both ring_group and ulysses_group (an SP group split as ring x ulysses), or neither.")
    if ring_group is None:
        return 1, sp_size
    ring, ulysses = dist.get_world_size(ring_group), dist.get_world_size(ulysses_group)
    if ring * ulysses != sp_size:
        raise ValueError(f"ring ({ring}) x ulysses ({ulysses}) must equal the SP group's size ({sp_size}).")
    return ring, ulysses


def check_ring_plan(model: nn.Module, plan: ModelPlan, overlap_chunks: int) -> None:
    """Refuse, before anything is touched, what cannot be exact across ring ranks."""
    name = type(model).__name__
    if plan.mixers:
        kinds = sorted({type(module).__name__ for _, module, _ in plan.mixers})
        raise UnsupportedModelError(
            f"{name} has token mixers ({', '.join(kinds)}) whose state runs in sequence order; they are sharded by "
            "heads (Ulysses) only, not across ring ranks. Use ring=1 with an sp its mixer heads allow."
        )
    if overlap_chunks > 1:
        raise ValueError("overlap_chunks > 1 overlaps the Ulysses exchange only; use overlap_chunks=1 with a ring.")


def _position_planes(given: Tensor, b: int, s_local: int) -> list[Tensor]:
    """``position_ids`` (``[s]``, ``[b | 1, s]`` or mrope's ``[planes, b | 1, s]``) as ``[b, s]`` planes."""
    given = given.long()
    if given.dim() == 1:
        given = given[None]
    if given.dim() == 2:
        return [given.expand(b, s_local)]
    if given.dim() == 3:
        return list(given.expand(given.shape[0], b, s_local).unbind(0))
    raise ValueError(f"position_ids of shape {tuple(given.shape)}: expected [batch, seq/sp] or [planes, batch, seq/sp].")


def find_hf_models(module: nn.Module) -> list[nn.Module]:
    """The outermost transformers ``PreTrainedModel`` instances inside ``module`` (itself included)."""
    from transformers import PreTrainedModel

    found: list[nn.Module] = []
    for _, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(sub in set(f.modules()) for f in found):
            found.append(sub)
    return found


def apply_ulysses(
    model: nn.Module, sp_group: ProcessGroup, *, eval_mode: Literal["sp", "bypass"] = "sp", overlap_chunks: int = 1,
    debug_skip_attention: bool = False, packed_documents: PackedDocuments = "refuse",
    ring_group: ProcessGroup | None = None, ulysses_group: ProcessGroup | None = None, vision_sp: bool = False,
    ring_layout: RingLayout = "zigzag",
) -> UlyssesHandle:
    """Apply Ulysses sequence parallelism to a HuggingFace ``PreTrainedModel`` in place.

    After this call every rank of ``sp_group`` calls the model with its own contiguous chunk
    (rank ``r`` holds tokens ``[r*s/sp, (r+1)*s/sp)``)::

        out = model(input_ids=[b, s/sp], position_ids=[b, s/sp] or [3, b, s/sp] (global, optional),
                    attention_mask=[b, s/sp] (padding, optional), labels=[b, s/sp] or
                    shift_labels=[b, s/sp] (shifted on the full sequence))

    and gets this chunk's logits ``[b, s/sp, vocab]`` and ``out.loss``: the exact token-mean loss of
    the **whole** sequence, identical on every SP rank, whose gradient summed over the SP group is
    ``sp x`` the non-SP gradient (the scale DDP's average over ``dp x sp`` ranks expects). Without
    ``position_ids`` the global ones are derived; with only ``labels``, the shifted labels are built
    on the gathered full sequence, so no target is lost at a chunk edge.

    Args:
        model: a transformers causal LM (``attn_implementation`` sdpa, eager, flex_attention or
            flash_attention_2/3), or a vision-language model (a vision tower beside its language
            model: the tower runs replicated on the whole images, the language model under SP;
            call it with ``input_ids`` and the images whole — :mod:`.multimodal`).
        sp_group: the process group of the ranks that share one sequence.
        eval_mode: ``"sp"`` runs eval sharded too; ``"bypass"`` runs ``model.eval()`` unpatched.
        overlap_chunks: split this rank's heads into that many groups and overlap each group's
            all-to-alls with another group's attention, forward and backward (asynchronous
            collectives; 1 = one exchange in, one out, nothing overlapped). Same results; pays off
            where the exchange is a visible share of the step and the backend runs collectives
            beside compute (NCCL streams). Must divide ``num_attention_heads / sp`` so that groups
            share whole KV heads; the error lists the valid values.
        debug_skip_attention: **debug only, wrong results**: every attention layer but the last skips
            its attention computation (the exchanges still run; a stand-in keeps what a linear-memory
            kernel keeps for backward and every projection in the graph), so that the memory limit of
            a configuration — the longest sequence that fits — is found in a fraction of the time;
            the last layer still computes attention, so its transient peak counts. Warns when applied.
        packed_documents: what a batch with packed rows (``position_ids`` restarting inside a row)
            *and* an ``attention_mask`` means. transformers keeps documents apart only without a
            mask, so the non-SP model attends across them; ``"refuse"`` (default) raises at that
            forward, ``"split"`` keeps documents apart and masks the padding.
        ring_group / ulysses_group: split the SP group as ``ring × ulysses``
            (:meth:`~lightning_ulysses.parallel.mesh.ParallelDims.split`): heads are exchanged inside each
            Ulysses group only, and ring attention passes key/value blocks around the ring group, so ``sp``
            may exceed what the heads allow. Both or neither; SP rank ``r`` must be ring rank
            ``r // ulysses`` and Ulysses rank ``r % ulysses`` (the chunks stay contiguous).
        vision_sp: for a vision-language model, split the batch's images over the SP ranks: each
            encodes its share (vision tower and projector) and the features are all-gathered
            (:mod:`.vision_sp`), exact like the replicated tower, with its time and activation
            memory divided by up to ``sp``. Where the model's encoder call has another form, its
            images are encoded replicated, with a warning saying why. No effect on text models.
        ring_layout: under a ring, ``"zigzag"`` (default) moves each causal layer's ring blocks into
            the causal-balanced layout (ring rank ``j`` holds halves ``j`` and ``2R-1-j`` of the
            sequence) for ring attention and back after it, one all-to-all of half blocks on the ring
            group each way (:mod:`lightning_ulysses.parallel.zigzag`), so that every ring rank computes
            the same number of block pairs; ``"contiguous"`` keeps the blocks as the data path cuts them.
            Same results. Layers with a sliding window or bidirectional attention, and ring blocks of
            odd length, always run contiguous. No effect without a ring.

    Raises:
        UnsupportedModelError: the model cannot run exactly under SP (README, "Supported models"):
            the message names the module and the reason.
        ValueError: heads not divisible by ``sp``, unsupported attention backend, and the like,
            with the numbers and the fix.
    """
    return UlyssesHandle(model, sp_group, eval_mode=eval_mode, overlap_chunks=overlap_chunks,
                         debug_skip_attention=debug_skip_attention, packed_documents=packed_documents,
                         ring_group=ring_group, ulysses_group=ulysses_group, vision_sp=vision_sp,
                         ring_layout=ring_layout)
