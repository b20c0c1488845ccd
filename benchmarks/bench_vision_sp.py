"""The vision tower under ``vision_sp``: each SP rank encodes its share of the images instead of all.

A small Qwen2-VL (vision tower of ``--vision-depth`` blocks, width ``--vision-width``; a 2-layer
language model) trains on one row holding ``--images`` images of ``--grid`` x ``--grid`` patches
(``grid^2 / 4`` tokens each, spatial merge 2) between text. For each sp (2, and 4 unless ``--quick``)
both modes run in the same processes, alternately (``vision_sp=False``: the replicated tower, every
rank encodes every image; ``True``: the images split by patch count, features all-gathered):

* ``vision fwd+bwd``: wall time of the vision tower's forward (``get_image_features``, the gather
  included) plus its backward — the time between the backward reaching the features and leaving the
  patch embedding — maximum over ranks, median of ``--steps`` timed steps after one warm-up;
* ``step``: the whole forward + backward, maximum over ranks, median;
* ``peak``: growth of the peak resident set (``VmHWM``, reset before each step) over the resident set
  before it, maximum over ranks: activations and gradients of the step, the tower's dominating.

Ratios are ``vision_sp / replicated`` of the same run. CPU (gloo), one torch thread per process
(each process stands for one device); on a 2-core machine sp 4 oversubscribes the cores, so its times
are pessimistic for both modes alike.

    python benchmarks/bench_vision_sp.py            # sp 2 and 4: ~1 min on 2 cores
    python benchmarks/bench_vision_sp.py --quick    # sp 2 only
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time
import warnings

import _common
import torch

from lightning_ulysses import apply_ulysses, shard_batch

IMG, VIDEO, START, END = 250, 251, 252, 253


def _model(args):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1 << 16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    vision = dict(depth=args.vision_depth, embed_dim=args.vision_width, hidden_size=128, num_heads=4, mlp_ratio=4,
                  patch_size=2, temporal_patch_size=1, spatial_merge_size=2, in_channels=3)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VIDEO, vision_start_token_id=START,
        vision_end_token_id=END, attn_implementation="sdpa")).float()


def _batch(args, sp: int) -> dict[str, torch.Tensor]:
    """One row: per image 8 text tokens, start, its tokens, end; padded with text to a multiple of sp."""
    tokens = args.grid * args.grid // 4
    g = torch.Generator().manual_seed(1)
    pieces = []
    for _ in range(args.images):
        pieces += [torch.randint(3, 200, (8,), generator=g), torch.tensor([START]), torch.full((tokens,), IMG),
                   torch.tensor([END])]
    ids = torch.cat(pieces)
    ids = torch.cat([ids, torch.randint(3, 200, ((-len(ids)) % (4 * sp) + 8,), generator=g)])[None]
    grid = torch.tensor([[1, args.grid, args.grid]] * args.images)
    pixels = torch.randn(int(grid.prod(-1).sum()), 12, generator=g)
    return {"input_ids": ids, "labels": ids.masked_fill(ids == IMG, -100), "pixel_values": pixels,
            "image_grid_thw": grid, "mm_token_type_ids": (ids == IMG).long()}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def _instrument(m) -> dict[str, float]:
    """Time stamps of the vision tower's forward (``f0``-``f1``: ``get_image_features``, over
    vision_sp's wrapper, so its gather is included) and backward (``b0``: the features' gradient
    arrives; ``b1``: it reaches the patch embedding, the tower's last module) in the returned dict."""
    clock: dict[str, float] = {}
    m.model.visual.register_forward_pre_hook(lambda *_: clock.__setitem__("f0", time.perf_counter()))
    encode = m.model.get_image_features

    def timed(*args, **kwargs):
        out = encode(*args, **kwargs)
        clock["f1"] = time.perf_counter()
        feats = out.pooler_output
        for piece in feats if isinstance(feats, (tuple, list)) else [feats]:  # per image: the first to get its
            piece.register_hook(lambda g: clock.setdefault("b0", time.perf_counter()) and None)  # gradient starts it
        return out

    m.model.get_image_features = timed  # an instance attribute; handle.remove() drops it
    m.model.visual.patch_embed.register_full_backward_pre_hook(
        lambda *_: clock.__setitem__("b1", time.perf_counter()) and None)
    return clock


def _run(rank, world, args):
    from lightning_ulysses.parallel.mesh import build_mesh

    # the patch embedding's backward hook fires on its output gradient (pixels need none): as meant
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: freed blocks leave the RSS
    dims = build_mesh("cpu", world)
    models = {mode: _model(args) for mode in (False, True)}
    handles = {mode: apply_ulysses(m, dims.sp_group, vision_sp=mode) for mode, m in models.items()}
    assert handles[True].vision_sp, handles[True].vision_sp_reason
    batch = shard_batch(_batch(args, world), dims.sp_rank, world)
    times = {mode: {"vision": [], "step": [], "peak": []} for mode in models}
    clocks = {mode: _instrument(m) for mode, m in models.items()}
    for step in range(args.steps + 1):
        for mode, m in models.items():  # alternately, so that drift of the machine hits both alike
            m.zero_grad(set_to_none=True)
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _rss_kib("VmRSS")
            c = clocks[mode]
            c.clear()
            torch.distributed.barrier()
            t0 = time.perf_counter()
            m(**batch, use_cache=False).loss.backward()
            t1 = time.perf_counter()
            values = _common.max_over_ranks([c["f1"] - c["f0"] + (c["b1"] - c["b0"]), t1 - t0,
                                             (_rss_kib("VmHWM") - before) / 1024])
            if step:
                for key, v in zip(("vision", "step", "peak"), values):
                    times[mode][key].append(v)
    for h in handles.values():
        h.remove()
    return {mode: {k: _common.median(v) for k, v in t.items()} for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--grid", type=int, default=16, help="patches per side of each image")
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--vision-width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="sp 2 only")
    args = parser.parse_args()
    print(_common.machine())
    tokens = len(_batch(args, 1)["input_ids"][0])
    print(f"Qwen2-VL, vision depth {args.vision_depth} width {args.vision_width}; {args.images} images of "
          f"{args.grid}x{args.grid} patches ({args.images * args.grid ** 2} patches), one row of ~{tokens} tokens; "
          f"median of {args.steps} steps, max over ranks\n")
    rows = []
    for sp in (2,) if args.quick else (2, 4):
        r = _common.launch(_run, sp, args, threads=1)[0]
        rep, split = r[False], r[True]
        rows.append([sp, f"{rep['vision'] * 1e3:.0f}", f"{split['vision'] * 1e3:.0f}",
                     f"{split['vision'] / rep['vision']:.2f}", f"{rep['step'] * 1e3:.0f}",
                     f"{split['step'] * 1e3:.0f}", f"{split['step'] / rep['step']:.2f}", f"{rep['peak']:.0f}",
                     f"{split['peak']:.0f}", f"{split['peak'] / rep['peak']:.2f}"])
    print(_common.table(["sp", "vision fwd+bwd replicated (ms)", "vision_sp (ms)", "ratio", "step replicated (ms)",
                         "vision_sp (ms)", "ratio", "peak replicated (MiB)", "vision_sp (MiB)", "ratio"], rows))


if __name__ == "__main__":
    main()
