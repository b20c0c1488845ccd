"""Composite vision-language models under SP, the vision tower replicated (README, "Vision-language models").

A vision-language model (Qwen2-VL, Qwen2.5-VL, LLaVA, Gemma 3, ...) is a vision tower and a projector
beside a language model. The outer model embeds the tokens, runs the vision tower on the images,
scatters the image features into the image placeholders of ``inputs_embeds`` (``masked_scatter``,
which reads *every* placeholder of the row, in order) and derives positions from the whole row
(Qwen's mrope ``get_rope_index`` numbers the text after an image from the image's grid). None of
that can run on a chunk: the chunk does not know how many image tokens precede it, nor where an
image starts. So under SP:

1. the handle gathers the row's ``input_ids`` and the other per-token inputs the outer model reads
   (``attention_mask``, ``mm_token_type_ids``, ``token_type_ids``) in its one all-gather of the
   forward, and calls the outer model with the **full** row; every SP rank then runs the vision
   tower and the projector on the sample's whole images (replicated; with ``vision_sp=True`` each
   rank encodes its share of the images and the features are all-gathered: :mod:`.vision_sp`);
2. the outer model merges the features and computes its positions on the full row, exactly as
   without SP, and calls its language model with full-row ``inputs_embeds`` and ``position_ids``;
3. :func:`wrap_language_model` cuts those to this rank's chunk (and whatever else is indexed by
   the row's tokens, e.g. Qwen3-VL's deepstack features) before the language model runs under
   Ulysses attention, so the language model sees what a text model sees under SP.

Masks the outer model builds from the whole row are rebuilt from the gathered inputs: bidirectional
blocks (Gemma 3's image tokens, PaliGemma's prefix: :func:`image_blocks_rule`,
:func:`attach_image_blocks`, ``SequenceMetadata.blocks``), and a causal mask handed to a language
model whose attention modules say otherwise (:attr:`CompositeParts.causal_mask`).

Gradients: the features of every image enter every rank's full row, and only this rank's chunk
continues, so the vision tower (and the token embedding) of rank ``r`` receive the gradient of the
loss through chunk ``r`` only, at the ``sp x`` scale of every SP gradient (docs/sp-loss.md). The sum
over the SP group — what DDP's average over ``dp x sp`` ranks takes, ``/ sp`` — is the non-SP gradient,
as for every other parameter.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor, nn

from ..parallel.masks import SequenceMetadata
from .context import ForwardContext
from .patching import add_forward_wrapper, base_forward, bind_call, remove_forward_wrapper
from .source import source_of as _source

# The sub-configs a supported composite may have: its language model's and its vision tower's.
TEXT_KEY = "text_config"
VISION_KEYS = ("vision_config",)
# Per-token inputs the outer model reads on the whole row besides input_ids and attention_mask:
# the modality of each token (mrope numbers image tokens by their grid) and Gemma 3's image tokens.
ROW_INPUTS = ("mm_token_type_ids", "token_type_ids")
# Inputs of a language model indexed by the row's tokens that an outer model hands it besides
# inputs_embeds and position_ids: Qwen3-VL's deepstack adds visual features at the image tokens.
_VISUAL_POSITIONS = "visual_pos_masks"
_VISUAL_FEATURES = "deepstack_visual_embeds"
# What an outer model builds its image-block (bidirectional) attention from.
_IMAGE_BLOCK_MASK = ("block_sequence_ids", "token_type_ids_mask_function")
# The two forms of block ids Ulysses rebuilds (see image_blocks_rule): a function of the model's own
# module numbering each run of image tokens (Gemma 3), and PaliGemma's prefix (every token of type 0).
_BLOCK_FUNCTION = "get_block_sequence_ids_for_mask"
_BLOCK_FUNCTION_CALL = re.compile(rf"\b{_BLOCK_FUNCTION}\(\s*(\w+)")
_PREFIX_BLOCK = re.compile(r"block_sequence_ids\W*=\s*torch\.where\(\s*(\w+)\s*==\s*0\s*,\s*0\s*,\s*-1\s*\)")
# The sliding window limits the blocks too: Gemma 3's sliding masks AND the window after ORing the blocks in.
_WINDOWED_BLOCKS = "and_mask_function=sliding_window_overlay"


def _unsupported(message: str) -> Exception:
    from .analysis import UnsupportedModelError

    return UnsupportedModelError(message)


@dataclass
class CompositeParts:
    """What the handle must know of a supported composite model.

    Attributes:
        language_model: the name of the language model submodule (what Ulysses attention runs in).
        module: that submodule.
        row_inputs: the outer forward's per-token inputs, besides ``input_ids`` and
            ``attention_mask``, gathered to the full row (:data:`ROW_INPUTS` it takes).
        image_blocks: how the outer model lets tokens attend to each other both ways (Gemma 3's
            image tokens, PaliGemma's prefix), ``None`` when it does not.
        causal_mask: the outer model hands its language model a causal mask (``create_causal_mask``)
            although the language model's attention modules say ``is_causal = False`` (PaliGemma sets
            ``use_bidirectional_attention`` on its Gemma for backward compatibility): the mask is what
            eager and sdpa honour, so Ulysses runs the language model's attention causal.
    """

    language_model: str
    module: nn.Module
    row_inputs: tuple[str, ...]
    image_blocks: ImageBlocks | None
    causal_mask: bool = False


@dataclass
class ImageBlocks:
    """An outer model's bidirectional blocks: block ids ``[b, seq]`` (``-1``: no block) derived from
    one per-token input of the whole row; tokens of one block attend to each other both ways.

    Attributes:
        key: the row input the ids come from (``token_type_ids``, ``mm_token_type_ids``).
        ids: ``[b, seq]`` input -> ``[b, seq]`` block ids, or ``None`` for a form Ulysses does not
            rebuild (a batch giving ``key`` is then refused).
        windowed: a layer's sliding window limits the block too (Gemma 3), or the block is added
            after the window (PaliGemma) — :attr:`~..parallel.masks.SequenceMetadata.blocks_windowed`.
    """

    key: str
    ids: Callable[[Tensor], Tensor] | None
    windowed: bool


def composite_parts(model: nn.Module, components: list[str]) -> CompositeParts:
    """The language model of a composite ``model`` whose other components Ulysses runs replicated,
    or :class:`~.analysis.UnsupportedModelError` naming what is not supported."""
    from transformers import PreTrainedModel

    name = type(model).__name__
    others = [c for c in components if c != TEXT_KEY and c not in VISION_KEYS]
    if others or TEXT_KEY not in components:
        raise _unsupported(
            f"{name} is a composite model with components Ulysses does not run ({', '.join(others or components)}); "
            "only a vision tower beside one language model (text_config + vision_config) is supported under SP, "
            "not audio encoders, speech decoders, perceiver resamplers or a second language model."
        )
    text = getattr(model.config, TEXT_KEY)
    found = [(n, m) for n, m in model.named_modules()
             if m is not model and isinstance(m, PreTrainedModel) and m.config is text]
    found = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]
    if len(found) != 1:
        raise _unsupported(
            f"{name} is a composite model in which {len(found)} submodules hold its text_config; Ulysses needs "
            "exactly one language model to shard."
        )
    lm_name, lm = found[0]
    if getattr(lm, "base_model", lm) is not lm:
        raise _unsupported(
            f"{name} is a composite model whose language model {lm_name!r} ({type(lm).__name__}) has its own head; "
            "only composites whose language model is a backbone (the head on the outer model) are supported."
        )
    _check_language_model_call(model, lm_name)
    params = inspect.signature(base_forward(model)).parameters  # under any wrapper (the tiled loss)
    if "input_ids" not in params or "position_ids" not in params:
        raise _unsupported(f"{name}.forward takes no input_ids / position_ids; not supported under SP.")
    outer = [m for n, m in model.named_modules() if m is model or (lm_name.startswith(n + ".") and n)]
    row_inputs = tuple(k for k in ROW_INPUTS if k in params)
    causal_mask = (any("create_causal_mask(" in _source(type(m).forward) for m in outer)
                   and any(getattr(m, "is_causal", True) is False for m in lm.modules()))
    return CompositeParts(lm_name, lm, row_inputs, image_blocks_rule(outer, row_inputs), causal_mask)


def _check_language_model_call(model: nn.Module, lm_name: str) -> None:
    """Refuse a composite whose outer model hands its language model the token ids (or no
    ``inputs_embeds``) rather than the merged embeddings (Mllama, Kosmos-2.5: the images reach the
    text through cross-attention, and the language model embeds the tokens itself), read from the
    calling module's forward: Ulysses merges the images into ``inputs_embeds`` on the whole row and
    cuts those."""
    import ast
    import textwrap

    parent_name, _, attr = lm_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    try:
        tree = ast.parse(textwrap.dedent(_source(type(parent).forward)))
    except SyntaxError:
        return
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == attr and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"]
    def embeds_itself(call: ast.Call) -> bool:
        given = {k.arg: k.value for k in call.keywords}
        ids = given.get("input_ids")
        return "inputs_embeds" not in given or not (ids is None or (isinstance(ids, ast.Constant) and ids.value is None))

    if calls and all(embeds_itself(c) for c in calls):
        raise _unsupported(
            f"{type(model).__name__} hands its language model {lm_name!r} ({type(parent).__name__}.forward) the token "
            "ids, not merged inputs_embeds: its images do not enter as embeddings merged into the row (e.g. they are read through "
            "cross-attention), so Ulysses SP cannot shard the row after the merge. This composite is not supported."
        )


def image_blocks_rule(outer: list[nn.Module], row_inputs: tuple[str, ...]) -> ImageBlocks | None:
    """How the modules that run before the language model (``outer``: the composite and its inner
    ``...Model``) build bidirectional blocks, read from their forward's source.

    Rebuilt: block ids computed by the model module's own ``get_block_sequence_ids_for_mask`` on a row
    input (Gemma 3: one block per run of image tokens; exact by construction, it is the model's
    function), and PaliGemma's prefix (``torch.where(token_type_ids == 0, 0, -1)``: one block). Any
    other use of ``block_sequence_ids`` / ``token_type_ids_mask_function`` gives a rule with no ids,
    whose batches are refused when they carry its input.
    """
    for module in outer:
        src = _source(type(module).forward)
        if not any(k in src for k in _IMAGE_BLOCK_MASK):
            continue
        home = inspect.getmodule(type(module))
        function = getattr(home, _BLOCK_FUNCTION, None)
        call = _BLOCK_FUNCTION_CALL.search(src)
        if call and call.group(1) in row_inputs and callable(function):
            return ImageBlocks(call.group(1), function, windowed=_WINDOWED_BLOCKS in _source(home))
        prefix = _PREFIX_BLOCK.search(src)
        if prefix and prefix.group(1) in row_inputs:
            return ImageBlocks(prefix.group(1), _prefix_block, windowed=False)
        key = next((k for k in row_inputs if k in src), "token_type_ids")
        return ImageBlocks(key, None, windowed=True)
    return None


def _prefix_block(token_types: Tensor) -> Tensor:
    """PaliGemma's prefix-LM block: every token of type 0 (image and prompt) in block 0."""
    return torch.where(token_types == 0, 0, -1)


def composite_objective(model: nn.Module) -> str | None:
    """``"causal"`` for an image-text-to-text head, ``None`` for the bare composite (no head)."""
    from transformers.models.auto import modeling_auto as auto

    heads = set(auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    heads |= set(getattr(auto, "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES", {}).values())
    if any(c.__name__ in heads for c in type(model).__mro__):
        return "causal"
    if getattr(model, "base_model", model) is model:
        return None
    raise _unsupported(
        f"{type(model).__name__} is a composite model whose head is not an image-text-to-text (causal LM) head; "
        "only those (and the bare composite, without a head) are supported for composite models under SP."
    )


def check_composite_call(parts: CompositeParts | None, model: nn.Module, call: dict[str, Any]) -> None:
    """Refuse a composite's call without ``input_ids``: its images are merged at their placeholder
    tokens on the whole row, which ``inputs_embeds`` no longer show."""
    if parts is not None and call.get("input_ids") is None:
        raise ValueError(
            f"{type(model).__name__} under Ulysses SP needs input_ids [batch, seq/sp] (not inputs_embeds): "
            "the images are merged at their placeholder tokens on the whole row."
        )


def full_row_inputs(parts: CompositeParts | None, call: dict[str, Any]) -> list[tuple[str, Tensor]]:
    """The per-token inputs ``[b, seq/sp]`` of this call that the outer model reads on the whole row
    (``input_ids`` first, then those of :data:`ROW_INPUTS` given); ``[]`` for a text model.

    The handle gathers them over the SP group in its one metadata all-gather of the forward."""
    if parts is None:
        return []
    return [("input_ids", call["input_ids"])] + [(k, call[k]) for k in parts.row_inputs if call.get(k) is not None]


def call_with_full_row(parts: CompositeParts, model: nn.Module, call: dict[str, Any],
                       row_inputs: list[tuple[str, Tensor]], gathered: Tensor, mask: Tensor | None,
                       full_mask: Tensor, given: Tensor | None, full_positions: Tensor) -> dict[str, Tensor]:
    """Put the whole row's inputs into the outer model's ``call`` (in place) and return them.

    Args:
        row_inputs: what :func:`full_row_inputs` returned (this rank's chunks).
        gathered: the same inputs gathered over the SP group, ``[len(row_inputs), b, seq]`` (int64).
        mask: this rank's ``attention_mask`` chunk, or ``None``; ``full_mask``: its gathered row ``[b, seq]``.
        given: this rank's ``position_ids`` chunk, or ``None``; ``full_positions``: its gathered planes
            ``[planes, b, seq]``.

    Returns:
        ``{name: [b, seq]}`` of the gathered row inputs, in their own dtypes.
    """
    whole = {key: gathered[i].to(value.dtype) for i, (key, value) in enumerate(row_inputs)}
    check_row_inputs(parts, model, whole)
    call.update(whole)
    if mask is not None:
        call["attention_mask"] = full_mask.to(mask.dtype)  # get_rope_index skips the padding
    if given is not None:
        call["position_ids"] = full_positions if given.dim() == 3 else full_positions[0]
    return whole


def check_row_inputs(parts: CompositeParts, model: nn.Module, full: dict[str, Tensor]) -> None:
    """Refuse a batch whose full-row inputs ask for a mask Ulysses does not rebuild."""
    rule = parts.image_blocks
    if rule is not None and rule.ids is None and full.get(rule.key) is not None:
        raise _unsupported(
            f"{type(model).__name__} lets some tokens attend to each other bidirectionally when given {rule.key}, "
            "in a form Ulysses SP does not rebuild. Call it without "
            f"{rule.key} (causal attention over image tokens too) or without SP."
        )


def attach_image_blocks(parts: CompositeParts, model: nn.Module, metadata: SequenceMetadata,
                        full: dict[str, Tensor]) -> None:
    """Give ``metadata`` the whole row's bidirectional blocks ``[b, seq]``, derived from the gathered
    row inputs ``full`` as the outer model derives them (nothing when the batch has none)."""
    rule = parts.image_blocks
    types = full.get(rule.key) if rule is not None and rule.ids is not None else None
    if types is None:
        return
    blocks = rule.ids(types).long()
    if not bool((blocks >= 0).any()):
        return
    if metadata.doc_ids is not None:
        raise _unsupported(
            f"this batch has packed rows (position_ids restarting inside a row) and {rule.key} asking "
            f"{type(model).__name__} for bidirectional blocks: transformers composes the two differently in its "
            "full and sliding-window layers, so Ulysses SP does not rebuild that mask. Do not pack these rows, "
            f"or call the model without {rule.key}."
        )
    ends_in_prefix = (types[:, -1] == 0) & (types == 1).any(-1)
    if rule.ids is _prefix_block and metadata.valid is None and bool(ends_in_prefix.any()):
        # shard_batch pads a row to a multiple of sp with type 0 and, for rows with position_ids, no
        # padding mask: such padding would join the prefix block, which every prefix token attends to
        raise _unsupported(
            f"this batch has rows ending in {rule.key} 0 after their suffix (1) and no attention_mask: under SP "
            "these may be the padding added to reach a multiple of sp, which PaliGemma's prefix rule would let "
            "the prefix attend to. Pass an attention_mask (the padding is then masked), or rows whose length "
            "divides by sp."
        )
    metadata.blocks = blocks
    metadata.blocks_windowed = rule.windowed


# Attention backends for which transformers drops a causal mask that only says "causal" (no padding,
# no blocks) and lets the attention module's own ``is_causal`` decide instead.
_SKIPS_PLAIN_MASKS = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def check_mask_switch(parts: CompositeParts, model: nn.Module, metadata: SequenceMetadata, backend: str) -> None:
    """Refuse a batch on which the untouched model would attend bidirectionally although its outer
    model hands the language model a causal mask (:attr:`CompositeParts.causal_mask`).

    With sdpa or flash attention transformers materialises that mask only when it says more than
    "causal" (padding, bidirectional blocks); otherwise it passes none and the language model's
    ``is_causal = False`` makes attention bidirectional. The same model is thus causal on a padded
    batch and bidirectional on an unpadded one, a switch Ulysses SP does not reproduce (the padding
    it adds to reach a multiple of ``sp`` would flip it). ``backend``: the attention implementation
    the model was configured with (the one Ulysses wraps)."""
    if not parts.causal_mask or metadata.blocks is not None or metadata.valid is not None:
        return
    if backend not in _SKIPS_PLAIN_MASKS:
        return
    raise _unsupported(
        f"{type(model).__name__}'s language model is marked bidirectional (is_causal = False, e.g. "
        f"use_bidirectional_attention) while {type(model).__name__} hands it a causal mask; with {backend} and a "
        "batch without padding or blocks transformers drops that mask, so the model attends bidirectionally here "
        "and causally on padded batches. Ulysses SP does not reproduce that switch. Pass token_type_ids (the "
        "prefix-LM mask the model trains with), use attn_implementation='eager', or set the text config's "
        "use_bidirectional_attention=False (causal)."
    )


def check_encoders_run_on_every_rank(parts: CompositeParts, model: nn.Module, call: dict[str, Any]) -> None:
    """Refuse a batch whose images reach some ranks and not others while the model's parameters are
    sharded by FSDP2 (``DTensor`` parameters beside the language model).

    FSDP2 all-gathers a module's parameters when it runs and reduce-scatters only the gradients that
    exist: a rank whose batch has no ``pixel_values*`` skips the vision tower while another runs it,
    and the two ranks' collectives no longer match (a hang, or gloo's size mismatch). DDP copes
    (``find_unused_parameters=True``); FSDP2 does not, with or without SP. One all-reduce of a flag
    over the world (where FSDP2's groups live) per forward lets every rank refuse together instead of
    hanging; batches that agree (all with images, or all text-only) run as before."""
    from torch.distributed.tensor import DTensor

    prefix = parts.language_model + "."
    if not any(isinstance(p, DTensor) for n, p in model.named_parameters() if not n.startswith(prefix)):
        return
    has = any(isinstance(v, Tensor) and k.startswith("pixel_values") and v.numel() > 0 for k, v in call.items())
    device = next(parts.module.parameters()).device
    flags = torch.tensor([float(has), float(not has)], device=device)
    torch.distributed.all_reduce(flags)
    if flags[0] > 0 and flags[1] > 0:
        raise _unsupported(
            f"{type(model).__name__} is sharded by FSDP2 and this step's batches carry images on "
            f"{int(flags[0].item())} rank(s) and none on {int(flags[1].item())}: FSDP2 needs every rank to run "
            "the same modules (a rank without images skips the vision tower, and the collectives of its "
            "parameters no longer match). Give every batch at least one image (or none on every rank), or "
            "train with UlyssesStrategy / UlyssesFabricStrategy (DDP, find_unused_parameters=True)."
        )


def wrap_language_model(parts: CompositeParts, running: Callable[[], ForwardContext | None],
                        random_stream: Callable[[], ContextManager[None]]) -> Callable[[], None]:
    """Cut the full-row inputs the outer model hands its language model to this rank's chunk.

    Args:
        running: the context of the SP forward running now, ``None`` outside one (the language model
            then runs unchanged).
        random_stream: the context in which the language model draws its own dropout masks per SP
            rank (the vision tower, replicated, draws the shared stream: identical features on peers).

    Returns:
        The function that removes the wrapper.
    """
    module = parts.module
    signature = inspect.signature(module.forward)
    where = f"{parts.language_model!r} ({type(module).__name__})"

    def forward(next_forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ctx = running()
        if ctx is None:
            return next_forward(*args, **kwargs)
        call = bind_call(signature, args, kwargs)
        seq = ctx.metadata.seq_len
        lo, n = ctx.sp_rank * ctx.local_len, ctx.local_len
        embeds = call.get("inputs_embeds")
        if call.get("input_ids") is not None or embeds is None or embeds.shape[1] != seq:
            raise RuntimeError(
                f"the outer model called its language model {where} without the full row's inputs_embeds "
                f"([batch, {seq}, hidden]); lightning_ulysses cannot cut them to this rank's chunk."
            )
        call["inputs_embeds"] = embeds.narrow(1, lo, n)  # differentiable: the gradient lands in the chunk
        positions = call.get("position_ids")
        if positions is None:
            # the outer model derived none (a text-only row): the language model's own default,
            # derived on the whole row by the handle
            positions = ctx.metadata.position_ids
        local = positions.narrow(-1, lo, n)
        # rotary modules run on the whole row's positions (whole_sequence.py): they are these
        ctx.gathered[id(local)] = (local, positions)
        call["position_ids"] = local
        mask = call.get("attention_mask")
        masks = mask.values() if isinstance(mask, dict) else [mask]
        if any(m is not None and not (isinstance(m, Tensor) and m.dim() == 2) for m in masks):
            raise RuntimeError(
                f"the outer model handed its language model {where} a prepared attention mask; Ulysses rebuilds "
                "masks from the gathered padding and positions only, so this mask cannot be honoured."
            )
        call["attention_mask"] = None  # the padding is in the gathered metadata
        if "use_cache" in signature.parameters:
            # a cache would hold one chunk; some outer models pass their config's default (True) on
            call["use_cache"] = False
        cache = call.get("cache_position")
        if isinstance(cache, Tensor) and cache.shape[-1] == seq:
            call["cache_position"] = cache.narrow(-1, lo, n)
        _cut_visual_features(call, seq, lo, n, where)
        if parts.causal_mask:
            call["is_causal"] = True  # reaches the attention through the layers' **kwargs (CompositeParts)
        with random_stream():
            return next_forward(**call)

    token = add_forward_wrapper(module, forward, priority=100)
    return lambda: remove_forward_wrapper(module, token)


def _cut_visual_features(call: dict[str, Any], seq: int, lo: int, n: int, where: str) -> None:
    """Keep the visual features the language model adds at this chunk's image tokens (Qwen3-VL's
    deepstack: one ``[image tokens of the batch, hidden]`` tensor per layer, in row-major token order)."""
    where_visual = call.get(_VISUAL_POSITIONS)
    features = call.get(_VISUAL_FEATURES)
    if where_visual is None:
        if features is not None:
            raise RuntimeError(f"{where} was given {_VISUAL_FEATURES} without {_VISUAL_POSITIONS}.")
        return
    if where_visual.dim() != 2 or where_visual.shape[1] != seq:
        raise RuntimeError(f"{where}: {_VISUAL_POSITIONS} of shape {tuple(where_visual.shape)} is not [batch, {seq}].")
    in_chunk = torch.zeros_like(where_visual, dtype=torch.bool)
    in_chunk[:, lo:lo + n] = True
    keep = in_chunk[where_visual.bool()]  # per image token of the batch, in the features' order
    call[_VISUAL_POSITIONS] = where_visual[:, lo:lo + n]
    if features is not None:
        call[_VISUAL_FEATURES] = [f[keep] for f in features]
