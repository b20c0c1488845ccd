"""``vision_sp``: the images of a batch encoded once over the SP group instead of on every SP rank.

Without it every SP rank runs the vision tower and projector on the sample's whole images
(:mod:`.multimodal`). With it, the call the outer model makes to encode its images —
``get_image_features`` / ``get_video_features`` of the module whose forward merges them — is cut:

1. the images are split into ``sp`` contiguous shares, balanced by cost: by patch count for
   Qwen2-VL-style encoders (``pixel_values`` ``[patches, ...]`` with an ``image_grid_thw`` row of
   ``[t, h, w]`` per image: the patches of whole images), by index for LLaVA / Gemma 3-style ones
   (``pixel_values`` ``[images, channels, height, width]``, ``image_sizes`` cut alike);
2. this rank encodes its share only (vision tower *and* projector, the model's own code);
3. the features the outer model merges (``pooler_output``, and Qwen3-VL's per-layer
   ``deepstack_features``) travel in one all-gather over the SP group
   (:func:`~lightning_ulysses.parallel.uneven.gather_shares`, shares padded to the largest), and the
   outer model gets them for the whole batch, in image order, as its encoder returns them; it merges
   them and derives its positions on the full row exactly as before.

Exact because these encoders encode every image on its own (attention within an image or a frame,
per-image windows and position embeddings, per-token projectors): an image's features do not depend
on which other images share the call. Encoders with batch statistics (batch norm) are not split.

Gradients: the gather's backward sums every rank's gradient of the whole batch's features over the
SP group and hands each rank the part of its own images. Every rank's gradient carries the ``sp x``
scale of every SP gradient (docs/sp-loss.md), so rank ``r``'s vision parameters receive ``sp x`` the
gradient of its images, and the sum over the SP group — what DDP's average over ``dp x sp`` ranks
takes, ``/ sp`` — is the non-SP gradient, the same rule as the replicated tower.

A rank whose share is empty (fewer images than ``sp``) still encodes one image — the cheapest, no
more than any rank's share — and contributes none of it: its vision parameters take part in the
forward and get an exact zero gradient, so DDP (``find_unused_parameters=False``) and FSDP (whose
per-module all-gathers every rank must join) see the same modules run on every rank, and the rank
joins the collective. Training forwards encode in a per-rank random stream, drawn from the shared
one by the same single draw on every rank (SP peers keep identical shared streams although their
encoders ran on different images).

Where the encoder call does not have one of these two forms (another signature, pixel values that
are not a tensor, precomputed per-image tensors of the whole batch), the images are encoded
replicated, as without ``vision_sp``: :func:`plan_vision_split` says why at ``apply_ulysses`` time.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..parallel.uneven import gather_shares
from .context import ForwardContext
from .patching import bind_call
from .multimodal import CompositeParts
from .source import source_of as _source

# The encoding calls an outer forward may make on itself, and the grid argument of the Qwen form.
_METHODS = {"get_image_features": "image_grid_thw", "get_video_features": "video_grid_thw"}
# Parameters of the LLaVA / Gemma 3 form: the images, and options that apply to all of them.
_INDEX_PARAMS = {"pixel_values", "vision_feature_layer", "vision_feature_select_strategy", "image_sizes",
                 "output_hidden_states"}
_PER_IMAGE_ARGS = ("image_sizes",)  # per-image arguments of the index form, cut with the images
# What transformers' vision encoders accept precomputed for the whole call (transformers.vision_utils,
# also with an image_ / video_ prefix): one share cannot use them, so such a call is refused.
_PRECOMPUTED = ("cu_seqlens", "max_seqlen", "position_ids", "window_index", "cu_window_seqlens", "interp_indices",
                "interp_weights", "bilinear_indices", "bilinear_weights", "merged_shape")
# Encoder outputs the outer model merges, with the number of list levels above the per-image
# features (Qwen3-VL's deepstack: one entry per layer). Every other output field (per-layer states,
# attentions) stays with the rank that computed it and comes back as None.
FEATURE_FIELDS = {"pooler_output": 0, "deepstack_features": 1}
_MISSING = object()

Form = Literal["grid", "index"]


@dataclass
class VisionSplit:
    """How a composite model encodes its images, for :func:`split_vision`.

    Attributes:
        owner: the submodule whose forward calls the encoding methods (``model.model``: Qwen2VLModel, ...).
        methods: each encoding method the owner's forward calls, and its form: ``"grid"`` (patches of
            whole images with a ``[t, h, w]`` grid per image) or ``"index"`` (images along dim 0).
    """

    owner: nn.Module
    methods: dict[str, Form]


def plan_vision_split(model: nn.Module, parts: CompositeParts) -> tuple[VisionSplit | None, str]:
    """Whether ``model``'s images can be encoded split over the SP group; reads the model, changes nothing.

    Returns:
        The plan, or ``None`` and the reason the images stay replicated.
    """
    name = type(model).__name__
    language = set(parts.module.modules())
    owners = [m for m in model.modules() if m not in language
              and any(f"self.{method}(" in _source(type(m).forward) for method in _METHODS)]
    if len(owners) != 1:
        return None, f"{name} does not encode its images through one get_image_features call of its own forward"
    owner = owners[0]
    forward_src = _source(type(owner).forward)
    methods: dict[str, Form] = {}
    for method, grid in _METHODS.items():
        if f"self.{method}(" not in forward_src:
            continue
        params = [p for p in inspect.signature(getattr(owner, method)).parameters.values()
                  if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = [p.name for p in params]
        if len(names) == 2 and names[1] == grid:
            methods[method] = "grid"
        elif names and names[0] == "pixel_values" and set(names) <= _INDEX_PARAMS:
            methods[method] = "index"
        else:
            return None, f"{type(owner).__name__}.{method}({', '.join(names)}) is not an encoder call vision_sp splits"
    encoder = [m for m in owner.modules() if m not in language]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder):
        return None, f"{name}'s vision modules use batch statistics (batch norm): images are not encoded apart"
    return VisionSplit(owner, methods), ""


def balanced_shares(weights: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut ``weights`` (per image, in order) into ``parts`` contiguous ``[lo, hi)`` ranges whose
    largest sum is the smallest possible, every range holding an image while there are images left
    for it (ranges past the last image are empty). The same on every rank."""
    weights = [max(int(w), 1) for w in weights]

    def cut(capacity: int) -> list[tuple[int, int]] | None:
        ranges, lo = [], 0
        for k in range(parts):
            later, hi, load = parts - k - 1, lo, 0
            while hi < len(weights) and load + weights[hi] <= capacity:
                if hi > lo and len(weights) - hi <= later:
                    break  # leave an image to each later range
                load += weights[hi]
                hi += 1
            ranges.append((lo, hi))
            lo = hi
        return ranges if lo == len(weights) else None

    low, high = max(weights, default=1), max(sum(weights), 1)
    while low < high:  # the smallest capacity that fits in `parts` ranges
        mid = (low + high) // 2
        if cut(mid) is None:
            low = mid + 1
        else:
            high = mid
    return cut(low) or [(0, len(weights))] + [(len(weights), len(weights))] * (parts - 1)


class _Call:
    """One encoding call cut into this rank's share: which images, and the arguments that encode them."""

    def __init__(self, form: Form, method: str, pixel_key: str, call: dict[str, Any], sp: int, rank: int) -> None:
        if form == "grid":
            grid_key = _METHODS[method]
            grid = call[grid_key]
            patches = [int(t * h * w) for t, h, w in grid.tolist()]
            if call[pixel_key].shape[0] != sum(patches):
                raise RuntimeError(f"vision_sp: {pixel_key} has {call[pixel_key].shape[0]} rows but {grid_key} "
                                   f"describes {sum(patches)} patches.")
            weights, per_image = patches, {grid_key}
        else:
            sizes = call.get("image_sizes")
            weights = ([int(h * w) for h, w in torch.as_tensor(sizes).tolist()] if sizes is not None
                       else [1] * call[pixel_key].shape[0])
            patches, per_image = [1] * len(weights), {k for k in _PER_IMAGE_ARGS if call.get(k) is not None}
        for key, value in call.items():
            bare = key.removeprefix("image_").removeprefix("video_")
            if bare in _PRECOMPUTED and value is not None:
                raise ValueError(
                    f"vision_sp splits the images of {method} over the SP ranks, but the call carries {key!r}, "
                    "precomputed for all of its images; drop it or use vision_sp=False."
                )
        self.images = len(weights)
        self.lo, self.hi = balanced_shares(weights, sp)[rank]
        # an empty share encodes the cheapest image (see the module docstring) and keeps none of it
        first = self.lo if self.hi > self.lo else min(range(self.images), key=lambda i: weights[i])
        last = self.hi if self.hi > self.lo else first + 1
        rows = [0, *torch.tensor(patches).cumsum(0).tolist()]
        self.call = dict(call)
        self.call[pixel_key] = call[pixel_key][rows[first]:rows[last]]
        for key in per_image:
            self.call[key] = call[key][first:last]

    @property
    def count(self) -> int:
        """Images of this rank's share (0 for an empty one, whatever it encoded)."""
        return self.hi - self.lo


def _leaves(value: Any, depth: int) -> list[tuple[Any, ...]]:
    """The feature tensors of one output field as ``(path, tensor or per-image tuple/list)`` leaves."""
    if depth == 0:
        return [((), value)]
    return [((i, *path), leaf) for i, item in enumerate(value) for path, leaf in _leaves(item, depth - 1)]


def _share_of(leaf: Any, count: int) -> tuple[Tensor, list[int] | None]:
    """A leaf's rows for this rank's ``count`` images: a per-image sequence is concatenated (its
    per-image row counts returned), a tensor (images or their tokens concatenated) is kept whole."""
    if isinstance(leaf, (tuple, list)):
        kept = list(leaf)[:count]
        return (torch.cat(kept) if kept else leaf[0][:0]), [t.shape[0] for t in kept]
    return (leaf if count else leaf[:0]), None


def _gather_features(out: Any, share: _Call, ctx: ForwardContext) -> Any:
    """The encoder output for the whole call from every rank's share output: one all-gather of the
    features (and one of their sizes, a few integers)."""
    fields = {k: getattr(out, k, None) for k in FEATURE_FIELDS}
    fields = {k: v for k, v in fields.items() if v is not None}
    leaves = [(k, path, leaf) for k, v in fields.items() for path, leaf in _leaves(v, FEATURE_FIELDS[k])]
    shares = [_share_of(leaf, share.count) for _, _, leaf in leaves]
    n = share.images
    # per rank: its image count, then per leaf its rows, its row width and (per-image leaves) the rows of each image
    meta: list[int] = [share.count]
    for rows, per_image in shares:
        meta += [rows.shape[0], _width(rows)]
        if per_image is not None:
            meta += per_image + [0] * (n - len(per_image))
    local = torch.tensor(meta, dtype=torch.long, device=shares[0][0].device if shares else None)
    everyone = [torch.empty_like(local) for _ in range(ctx.sp_size)]
    dist.all_gather(everyone, local, group=ctx.group)
    table = torch.stack(everyone).tolist()
    if sum(row[0] for row in table) != n:
        raise RuntimeError(f"vision_sp: the SP ranks split different images ({[row[0] for row in table]} of {n}); "
                           "every SP rank must get the same images.")
    dtypes = {rows.dtype for rows, _ in shares}
    if len(dtypes) > 1:
        raise RuntimeError(f"vision_sp: the encoder returned features of several dtypes {sorted(map(str, dtypes))}.")
    flat = torch.cat([rows.reshape(-1) for rows, _ in shares])
    sizes, layout = [], []  # per rank: its flat size; per rank and leaf: (rows, width, per-image rows)
    for row in table:
        pos, size, parts = 1, 0, []
        for rows, per_image in shares:
            count, width = row[pos], row[pos + 1]
            pos += 2
            images = None
            if per_image is not None:
                images = row[pos:pos + row[0]]
                pos += n
            parts.append((count, width, images))
            size += count * width
        sizes.append(size)
        layout.append(parts)
    full = gather_shares(flat, sizes, ctx.group)
    pieces: list[list[Tensor]] = [[] for _ in leaves]
    per_image_rows: list[list[int]] = [[] for _ in leaves]
    offset = 0
    for parts in layout:
        for j, (count, width, images) in enumerate(parts):
            trailing = shares[j][0].shape[1:]
            pieces[j].append(full[offset:offset + count * width].view(count, *trailing))
            offset += count * width
            per_image_rows[j] += images or []
    rebuilt: dict[str, Any] = {}
    for j, (key, path, leaf) in enumerate(leaves):
        whole = torch.cat(pieces[j])
        value = type(leaf)(whole.split(per_image_rows[j])) if isinstance(leaf, (tuple, list)) else whole
        rebuilt[(key, path)] = value
    result = {}
    for key, value in fields.items():
        result[key] = _rebuild(value, FEATURE_FIELDS[key], lambda path, k=key: rebuilt[(k, path)])
    return type(out)(**result)


def _width(rows: Tensor) -> int:
    """Elements per row of a tensor that may hold no row."""
    width = 1
    for d in rows.shape[1:]:
        width *= d
    return width


def _rebuild(value: Any, depth: int, leaf: Callable[[tuple[int, ...]], Any], path: tuple[int, ...] = ()) -> Any:
    if depth == 0:
        return leaf(path)
    return type(value)(_rebuild(item, depth - 1, leaf, (*path, i)) for i, item in enumerate(value))


@contextlib.contextmanager
def _rank_stream(ctx: ForwardContext, training: bool, device: torch.device) -> Iterator[None]:
    """In training, encode in a stream of this rank's own, seeded by one draw of the shared stream."""
    if not training:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    seed = int(torch.randint(0, 2**62, (1,)).item())
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        torch.manual_seed(seed + 7_000_003 * (ctx.sp_rank + 1))
        yield


def split_vision(split: VisionSplit, running: Callable[[], ForwardContext | None]) -> Callable[[], None]:
    """Make ``split.owner``'s encoding calls encode this rank's share of the images and gather the features.

    Inside an SP forward (``running()`` returns its context) each call runs on this rank's share and
    returns the whole call's features (module docstring); outside one, and for a call made from inside
    another split call (Qwen3-VL's video features call its image features), the model's own method runs.

    Returns:
        The function that removes the patches (the owner's methods are its class's again).
    """
    owner = split.owner
    state = {"inside": False}
    saved = {m: owner.__dict__.get(m, _MISSING) for m in split.methods}

    def wrap(method: str, form: Form) -> Callable[..., Any]:
        original = getattr(owner, method)
        signature = inspect.signature(original)
        pixel_key = next(iter(signature.parameters))  # pixel_values / pixel_values_videos

        def encode(*args: Any, **kwargs: Any) -> Any:
            ctx = running()
            if ctx is None or ctx.sp_size == 1 or state["inside"]:
                return original(*args, **kwargs)
            call = bind_call(signature, args, kwargs)
            return_dict = call.pop("return_dict", True)
            pixels = call.get(pixel_key)
            if not isinstance(pixels, Tensor) or (form == "grid" and call.get(_METHODS[method]) is None):
                return original(*args, **kwargs)  # not a form we split: replicated, as without vision_sp
            share = _Call(form, method, pixel_key, call, ctx.sp_size, ctx.sp_rank)
            state["inside"] = True
            try:
                with _rank_stream(ctx, owner.training and torch.is_grad_enabled(), pixels.device):
                    out = original(**share.call, return_dict=True)
            finally:
                state["inside"] = False
            gathered = _gather_features(out, share, ctx)
            return gathered if return_dict is not False else gathered.to_tuple()

        return encode

    for method, form in split.methods.items():
        setattr(owner, method, wrap(method, form))  # an instance attribute: nn.Module stores it in __dict__

    def undo() -> None:
        for method, value in saved.items():
            if value is _MISSING:
                owner.__dict__.pop(method, None)
            else:
                owner.__dict__[method] = value

    return undo
