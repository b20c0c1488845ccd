"""The support matrix's image-text-to-text axis: every architecture registered for
``AutoModelForImageTextToText``, built tiny, run under SP with batches that carry images.

A tiny vision-language model needs more than a shrunk config: its placeholder tokens must lie inside
the tiny vocabulary, its images must fit its tower (a 4 x 4 grid of patches), and the number of
placeholder tokens per image is whatever its tower and projector make of that grid. This module
finds that number by asking the model itself (``get_image_features`` on the tiny image), so one
builder serves the two image input forms transformers' VLMs take:

- **grid** (Qwen2-VL and its descendants, GLM-4V, ...): ``pixel_values [patches, channels x
  temporal patch x patch x patch]`` with ``image_grid_thw [images, 3]``;
- **square** (LLaVA, Gemma 3, Mistral 3, InternVL, ...): ``pixel_values [images, channels, size,
  size]`` (with ``image_sizes [images, 2]`` where the forward takes them).

A model whose images take another form (tiles with ``pixel_attention_mask``, cross-attention
images, no vision tower) is ``untestable`` with that reason: the matrix never guesses a batch.
Each architecture is compared on a text-only batch and on an image batch whose two rows hold one
image each, the second straddling the SP chunk border, with :func:`~.parity.compare` (logits, loss,
every language, vision and projector gradient at 1e-5).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .configs import HIDDEN, VOCAB, build_tiny, keep_head_layout, normalised_config, tiny_config_kwargs
from .parity import RTOL, Verdict, _call, _is_random_in_training, _short, compare

HEAD = "image-text"
GRID = 4  # patches per side of the tiny image
TEXT_IDS = (4, 96)  # text token ids; the placeholders and delimiters sit above them
_IMAGE_KEYS = ("image_token_id", "image_token_index")
# placeholder / delimiter ids a VLM config may carry, moved inside the tiny vocabulary (96..127)
_SPECIAL_KEYS = _IMAGE_KEYS + (
    "video_token_id", "video_token_index", "vision_start_token_id", "vision_end_token_id", "boi_token_index",
    "eoi_token_index", "boi_token_id", "eoi_token_id", "image_start_token_id", "image_end_token_id",
    "audio_token_id", "audio_token_index", "vision_token_id", "image_break_token_id",
    "video_start_token_id", "video_end_token_id", "audio_start_token_id", "audio_end_token_id",
)

# a vision config's output width, which must be the language model's hidden size
_WIDTH_KEYS = ("out_hidden_size", "text_hidden_size", "output_hidden_size", "projection_dim")


class NoImageBatch(Exception):
    """No tiny image batch can be built for this model (reported as untestable, with the reason)."""


def architectures() -> list[tuple[str, str, str]]:
    """``(model_type, "image-text", class name)`` for every ``AutoModelForImageTextToText`` class."""
    from transformers.models.auto import modeling_auto as auto

    return [(k, HEAD, v) for k, v in auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items()]


def _special_ids(defaults: dict[str, Any]) -> dict[str, int]:
    out, next_id = {}, VOCAB - 1
    for key in _SPECIAL_KEYS:
        if isinstance(defaults.get(key), int) and not isinstance(defaults.get(key), bool):
            out[key] = next_id
            next_id -= 1
    return out


def image_config_kwargs(model_type: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Overrides of the tiny config that make images fit: placeholder ids inside the vocabulary,
    a square tower's image ``GRID`` patches a side, Gemma 3's pooled tokens per image 4. ``base``:
    the full-size config dict being shrunk (``build_tiny(..., base=)``), else the type's defaults."""
    from transformers import AutoConfig

    base = normalised_config(model_type, base)
    defaults = AutoConfig.for_model(model_type).to_dict() if base is None else base
    kwargs = tiny_config_kwargs(defaults)
    if base is not None:
        kwargs.update(keep_head_layout(base))
    out: dict[str, Any] = _special_ids(defaults)
    vision = kwargs.get("vision_config")
    if isinstance(vision, dict):
        size, patch = vision.get("image_size"), vision.get("patch_size")
        fit: dict[str, Any] = {}
        if isinstance(size, int) and isinstance(patch, int):
            fit["image_size"] = GRID * patch
        elif _pair(size) and _pair(patch):  # InternVL: [height, width]
            fit["image_size"] = [GRID * patch[0], GRID * patch[1]]
        merge = vision.get("spatial_merge_size")
        if isinstance(vision.get("window_size"), int) and isinstance(patch, int) and isinstance(merge, int):
            # Qwen2.5-VL's windows, in merged patches (window_size // merge // patch): 2 a side
            fit["window_size"] = 2 * merge * patch
        # the tower's output width is the language model's embedding width
        fit.update({k: HIDDEN for k in _WIDTH_KEYS if isinstance(vision.get(k), int)})
        out["vision_config"] = {**vision, **fit}
    # mrope's sections are filled in by the config class (not in its defaults): read them from a
    # built tiny config and rescale them to the tiny head
    if base is None:
        config = AutoConfig.for_model(model_type, **{**kwargs, **out})
    else:
        config = type(AutoConfig.for_model(model_type)).from_dict({**base, **kwargs, **out})
    text = getattr(config, "text_config", None)
    mrope = "mrope_section" in _modeling_source(model_type)
    for holder, key in ((text, "text_config"), (config, None)):
        sections = _tiny_mrope(holder, mrope)
        if sections is not None:
            if key is None:
                out["rope_parameters"] = sections
            else:
                out[key] = {**kwargs.get(key, {}), "rope_parameters": sections}
            break
    if isinstance(defaults.get("projection_dim"), int):  # PaliGemma: the projector's output width
        out["projection_dim"] = HIDDEN
    if isinstance(defaults.get("mm_tokens_per_image"), int):
        out["mm_tokens_per_image"] = 4
    if isinstance(defaults.get("image_seq_length"), int):
        out["image_seq_length"] = GRID * GRID
    return out


def _modeling_source(model_type: str) -> str:
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    from ..models.source import source_of

    try:
        module = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}.modeling_"
                                         f"{model_type_to_module_name(model_type)}")
    except ImportError:
        return ""
    return source_of(module)


def _pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)


def _tiny_mrope(config: Any, mrope: bool = False) -> dict[str, Any] | None:
    """``config``'s RoPE parameters with mrope's (temporal, height, width) sections rescaled to the
    tiny head's rotated half (the full-size sections sum to the full-size one's), or ``None``."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_type" not in params:  # absent, or one per layer type
        return None
    full = params.get("mrope_section")
    if not isinstance(full, list):
        # Qwen2-VL-style configs leave the sections to the rotary module's default ([16, 24, 24],
        # 128-dim heads); they say so by exempting the key from RoPE validation, or (``mrope``) the
        # modeling code reads the key
        if not (mrope or "mrope_section" in getattr(config, "ignore_keys_at_rope_validation", ())):
            return None
        full = [16, 24, 24]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    half = int(head_dim * (params.get("partial_rotary_factor") or 1.0)) // 2
    scaled = [max(1, round(half * s / sum(full))) for s in full]
    scaled[0] += half - sum(scaled)
    return {**params, "mrope_section": scaled}


def _vision(model: nn.Module) -> Any:
    vision = getattr(model.config, "vision_config", None)
    if vision is None:
        raise NoImageBatch("its config has no vision_config")
    return vision


def image_inputs(model: nn.Module, n_images: int, seed: int = 5, sizes: bool = False) -> dict[str, torch.Tensor]:
    """``n_images`` tiny images in the form ``model``'s forward takes them (square images with
    ``image_sizes`` when ``sizes``: Pixtral-style towers need them, CLIP-style ones reject them)."""
    params = inspect.signature(model.forward).parameters
    vision = _vision(model)
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    channels = getattr(vision, "in_channels", None) or getattr(vision, "num_channels", None) or 3
    patch = getattr(vision, "patch_size", None)
    if "image_grid_thw" in params:
        temporal = getattr(vision, "temporal_patch_size", None) or 1
        if not isinstance(patch, int):
            raise NoImageBatch("its vision config gives no integer patch_size for image_grid_thw patches")
        grid = torch.tensor([[1, GRID, GRID]] * n_images)
        pixels = torch.randn(n_images * GRID * GRID, channels * temporal * patch * patch, generator=g)
        return {"pixel_values": pixels.to(dtype), "image_grid_thw": grid}
    size = getattr(vision, "image_size", None)
    if _pair(size) and size[0] == size[1]:
        size = size[0]
    others = [k for k in ("pixel_attention_mask", "image_position_ids", "aspect_ratio_ids") if k in params]
    if others:
        raise NoImageBatch(f"its forward takes {', '.join(others)}: tiled images the matrix does not build")
    if "pixel_values" not in params or not isinstance(size, int):
        raise NoImageBatch("its images are neither grid patches (image_grid_thw) nor square pixel_values "
                           "of vision_config.image_size")
    pixels = torch.randn(n_images, channels, size, size, generator=g).to(dtype)
    out = {"pixel_values": pixels}
    if sizes and "image_sizes" in params:
        out["image_sizes"] = torch.tensor([[size, size]] * n_images)
    return out


def tokens_per_image(model: nn.Module) -> tuple[int, bool]:
    """How many placeholder tokens one tiny image fills — the features its tower and projector make
    of it, counted in language-model embeddings — and whether the images go with ``image_sizes``."""
    getter = getattr(model, "get_image_features", None)
    if getter is None:
        raise NoImageBatch("it has no get_image_features to size its image placeholders")
    taken = inspect.signature(getter).parameters
    forms = (False, True) if "image_sizes" in inspect.signature(model.forward).parameters else (False,)
    for sizes in forms:
        images = image_inputs(model, 1, sizes=sizes)
        try:
            with torch.no_grad():
                out = getter(**{k: v for k, v in images.items() if k in taken})
            break
        except Exception as e:  # noqa: BLE001 - the model itself fails on the tiny image
            failure = e
    else:
        raise NoImageBatch(f"its vision tower fails on a tiny image: {_short(failure)}") from failure
    features = getattr(out, "pooler_output", out)
    parts = features if isinstance(features, (list, tuple)) else [features]
    width = model.get_input_embeddings().embedding_dim
    parts = [p for p in parts if isinstance(p, torch.Tensor)]
    if not parts or any(p.shape[-1] != width for p in parts):
        raise NoImageBatch(f"its image features {[tuple(p.shape) for p in parts]} are not {width}-wide embeddings")
    return sum(p.numel() // width for p in parts), sizes


def image_token(model: nn.Module) -> int:
    for key in _IMAGE_KEYS:
        value = getattr(model.config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise NoImageBatch("its config names no image placeholder token (image_token_id / image_token_index)")


def image_batch(model: nn.Module, sp: int) -> dict[str, torch.Tensor]:
    """Two rows with one image each: row 0's at token 6, row 1's across the first chunk border
    (``seq / sp``); text tokens elsewhere, the first three of row 0 a prompt (no labels)."""
    n, sizes = tokens_per_image(model)
    ids_cfg = model.config
    start = getattr(ids_cfg, "vision_start_token_id", None)
    end = getattr(ids_cfg, "vision_end_token_id", None)
    seq = 32
    while seq < n + 16 or seq % (2 * sp):
        seq += 2 * sp
    border = seq // sp
    placed = [6, max(8, border - n // 2)]
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(*TEXT_IDS, (2, seq), generator=g)
    img = image_token(model)
    for row, at in enumerate(placed):
        if at + n + 1 > seq:
            raise NoImageBatch(f"{n} placeholder tokens per image do not fit a {seq}-token row")
        ids[row, at:at + n] = img
        if isinstance(start, int):
            ids[row, at - 1] = start
        if isinstance(end, int):
            ids[row, at + n] = end
    labels = ids.masked_fill(ids == img, -100)
    labels[0, :3] = -100
    batch: dict[str, torch.Tensor] = {"input_ids": ids, "labels": labels, **image_inputs(model, 2, sizes=sizes)}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        batch["mm_token_type_ids"] = (ids == img).long()
    return batch


def text_batch(model: nn.Module) -> dict[str, torch.Tensor]:
    """Two text-only rows (ids below the placeholders), the second right-padded."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(*TEXT_IDS, (2, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        batch["mm_token_type_ids"] = torch.zeros_like(ids)
    return batch


def classify_composite(arch: str, cls: str, sp_group: Any, base: dict[str, Any] | None = None,
                       groups: dict[str, Any] | None = None) -> Verdict:
    """One image-text-to-text architecture on every rank of ``sp_group``: a text-only batch, then
    the image batch, under SP against the untouched tiny build (of ``base``, a full-size config dict,
    when given: the ``check`` command), split by ``groups`` (:func:`~.parity.compare`). Every rank
    returns the same verdict."""
    import torch.distributed as dist

    row = Verdict(arch, HEAD, cls, "")

    def verdict(kind: str, reason: str = "", details: dict[str, float] | None = None, **how: Any) -> Verdict:
        return Verdict(arch, HEAD, cls, kind, reason, details or {}, **how)

    try:
        kwargs = image_config_kwargs(arch, base)
        ref = build_tiny(arch, cls, base=base, **kwargs)
        model = build_tiny(arch, cls, base=base, **kwargs)
    except Exception as e:  # noqa: BLE001
        return verdict("untestable", f"tiny config could not be built: {type(e).__name__}: {e}"[:300])
    try:
        loss = _call(ref, text_batch(ref)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError("text")
        loss.backward()
    except Exception:  # noqa: BLE001 - kernels without float64: float32 then (as the text matrix)
        ref = build_tiny(arch, cls, dtype=torch.float32, base=base, **kwargs)
        model = build_tiny(arch, cls, dtype=torch.float32, base=base, **kwargs)
    how = {"dtype": str(next(ref.parameters()).dtype).removeprefix("torch.")}
    note = ""
    if _is_random_in_training(ref, "causal"):
        ref.eval()
        model.eval()
        how["eval_mode"] = True
        note = "compared in eval mode: the training forward samples random numbers"
    details: dict[str, float] = {}
    sp = dist.get_world_size(sp_group)
    for name, make in (("text", text_batch), ("images", lambda m: image_batch(m, sp))):
        try:
            batch = make(ref)
        except NoImageBatch as e:
            return verdict("untestable", f"no tiny image batch: {e}"[:300], details, **how)
        # named as a row, so that compare reports the non-SP model's own failure as untestable
        result = compare(ref, model, batch, name, sp_group, Verdict(arch, HEAD, cls, "", variant=name),
                         groups=groups)
        if isinstance(result, Verdict):
            return Verdict(**{**result.__dict__, "variant": "", **how})
        details.update(result)
    bad = {k: v for k, v in details.items() if not v <= RTOL}
    if bad:
        worst = max(bad, key=bad.get)
        return verdict("wrong", f"{worst} relative error {bad[worst]:.2e}", details, **how)
    return verdict("exact", note, details, **how)
