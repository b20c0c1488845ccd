"""``vision_sp``: the batch's images split over the SP ranks, their features all-gathered.

For every family it claims (Qwen2-VL, Qwen2.5-VL, Qwen3-VL with deepstack, LLaVA, Gemma 3), at sp 2
and 4, with images spread unevenly (rows with 1, 2, 3 images, rows without, fewer images than sp):
logits, loss and every gradient — vision tower, projector, language model — equal the replicated
tower (``vision_sp=False``) and the non-SP model to 1e-5 relative in float32, gradients also as
ratios (a factor-of-sp error cannot hide); each rank encodes its balanced share of the patches
only. Then the pieces: the uneven gather's forward and adjoint, the balanced cut, the fall-back
with its reason, and remove().
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_ulysses import apply_ulysses, shard_batch
from lightning_ulysses.models.vision_sp import balanced_shares, plan_vision_split
from tests.distributed import assert_close_rel, grad_ratio, run_distributed
from tests.vlm_models import END, IMG, START
from tests.vlm_models import gemma3 as _gemma3
from tests.vlm_models import llava as _llava
from tests.vlm_models import qwen2_5_vl as _qwen2_5_vl
from tests.vlm_models import qwen2_vl as _qwen2_vl
from tests.vlm_models import qwen3_vl as _qwen3_vl

SEQ = 64  # room for three LLaVA images (16 tokens each) in a row; chunks of 32 (sp 2) and 16 (sp 4)


MODELS = {"qwen2_vl": (_qwen2_vl, "qwen"), "qwen2_5_vl": (_qwen2_5_vl, "qwen"), "qwen3_vl": (_qwen3_vl, "qwen"),
          "llava": (_llava, "index"), "gemma3": (_gemma3, "index")}
TOKENS = {"llava": 16, "gemma3": 4}  # image tokens per image (8x8 images)
# Qwen grids [t, h, w] of different sizes, so that the shares are balanced by patch count: a grid
# gives t*h*w patches and t*h*w/4 tokens (spatial merge 2).
GRIDS = [[1, 4, 4], [1, 2, 4], [1, 4, 6], [1, 2, 2], [1, 4, 2], [1, 2, 6]]
# Batches by images per row (4 rows: 3, 0, 2 and 1 images; 2 rows: 1 and 0 — one image, fewer than
# sp, so some ranks have an empty share).
BATCHES = {"3+0+2+1": [3, 0, 2, 1], "1+0": [1, 0]}


def _rows(images_per_row: list[int], tokens: list[int], seed: int) -> torch.Tensor:
    """Rows of text with image placeholders (delimited) spread over the row, ``tokens[i]`` for image i."""
    g = torch.Generator().manual_seed(seed)
    rows, k = [], 0
    for n in images_per_row:
        row = torch.randint(3, IMG - 1, (SEQ,), generator=g)
        start = 3
        for _ in range(n):
            row[start - 1], row[start:start + tokens[k]], row[start + tokens[k]] = START, IMG, END
            start += tokens[k] + 2 + 3  # a few text tokens between images
            k += 1
        assert start - 3 <= SEQ
        rows.append(row)
    return torch.stack(rows)


def _batch(name: str, images_per_row: list[int]) -> dict[str, torch.Tensor]:
    family = MODELS[name][1]
    n = sum(images_per_row)
    if family == "qwen":
        grids = GRIDS[:n]
        tokens = [t * h * w // 4 for t, h, w in grids]
    else:
        tokens = [TOKENS[name]] * n
    ids = _rows(images_per_row, tokens, seed=n)
    labels = ids.masked_fill(ids == IMG, -100)
    labels[0, :2] = -100  # a prompt
    batch = {"input_ids": ids, "labels": labels}
    g = torch.Generator().manual_seed(11)
    if family == "qwen":
        grid = torch.tensor(grids)
        batch.update(pixel_values=torch.randn(int(grid.prod(-1).sum()), 12, generator=g), image_grid_thw=grid,
                     mm_token_type_ids=(ids == IMG).long())
    else:
        batch["pixel_values"] = torch.randn(n, 3, 8, 8, generator=g)
    return batch


def _encoder(model):
    inner = model.model
    return inner.visual if hasattr(inner, "visual") else inner.vision_tower


def _reduced_grads(model, group, sp):
    """Each parameter's gradient summed over the SP group / sp: what DDP's average makes of it."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)
        grads[name] = g / sp
    return grads


def _logit_objective(logits, lo, group=None):
    """A fixed linear function of the logits of the row from ``lo`` on; with the SP ``group``, summed
    over it (its backward's sp x scale is that of every SP loss, docs/sp-loss.md)."""
    from lightning_ulysses.parallel.comm import sum_over_group

    weights = torch.randn(logits.shape[0], SEQ, logits.shape[-1], generator=torch.Generator().manual_seed(3))
    value = (logits * weights[:, lo:lo + logits.shape[1]]).sum() / weights.numel()
    return value if group is None else sum_over_group(value, group)


def _parity(rank, world, name, sp, labelled=True):
    """Without labels (Qwen3-VL under the minimum transformers, whose labelled forward is refused),
    a fixed linear objective of the logits stands for the loss."""
    from lightning_ulysses.parallel.mesh import build_mesh

    build, family = MODELS[name]
    dims = build_mesh("cpu", sp)
    models = {}
    for key in ("ref", "replicated", "split"):
        torch.manual_seed(0)
        models[key] = build().float()
    handles = {"replicated": apply_ulysses(models["replicated"], dims.sp_group, vision_sp=False),
               "split": apply_ulysses(models["split"], dims.sp_group, vision_sp=True)}
    assert handles["split"].vision_sp and not handles["replicated"].vision_sp, handles["split"].vision_sp_reason
    encoded = {key: [] for key in models}  # rows of pixel input each model's vision tower saw, per call
    for key, m in models.items():
        _encoder(m).register_forward_pre_hook(
            lambda mod, args, kwargs, key=key: encoded[key].append(
                (args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))).shape[0]),
            with_kwargs=True)
    n, lo = SEQ // sp, dims.sp_rank * SEQ // sp
    report = {}
    for batch_name, images_per_row in BATCHES.items():
        batch = _batch(name, images_per_row)
        if not labelled:
            del batch["labels"]
        for m in models.values():
            m.zero_grad()
            for e in encoded.values():
                e.clear()
        ref_out = models["ref"](**batch, use_cache=False)
        ref_loss = ref_out.loss if labelled else _logit_objective(ref_out.logits, 0)
        ref_loss.backward()
        outs, losses = {}, {}
        for key in ("replicated", "split"):
            outs[key] = models[key](**shard_batch(batch, dims.sp_rank, sp), use_cache=False)
            losses[key] = outs[key].loss if labelled else _logit_objective(outs[key].logits, lo, dims.sp_group)
            losses[key].backward()
        what = f"{name} sp={sp} {batch_name}"
        for key, out in outs.items():
            assert_close_rel(out.logits, ref_out.logits[:, lo:lo + n], name=f"{what} {key} logits")
            assert_close_rel(losses[key], ref_loss, name=f"{what} {key} loss")
        assert_close_rel(outs["split"].logits, outs["replicated"].logits, name=f"{what} split vs replicated logits")
        ref = {k: p.grad for k, p in models["ref"].named_parameters()}
        total = sum(g.double().norm() ** 2 for g in ref.values() if g is not None) ** 0.5
        reduced = {key: _reduced_grads(models[key], dims.sp_group, sp) for key in ("replicated", "split")}
        compared = set()
        for pname, q in ref.items():
            # a key bias's gradient is zero in exact arithmetic (softmax ignores a per-query constant):
            # rounding noise in every run, not a quantity to compare
            if q is None or q.double().norm() < 1e-6 * total:
                assert reduced["split"][pname].norm() < 1e-4 * total, f"{what} {pname}"
                continue
            for key in ("replicated", "split"):
                assert_close_rel(reduced[key][pname], q, name=f"{what} {key} {pname}")
                assert abs(grad_ratio(reduced[key][pname], q) - 1) < 1e-5, f"{what} {key} {pname}"
            assert_close_rel(reduced["split"][pname], reduced["replicated"][pname],
                             name=f"{what} split vs replicated {pname}")
            compared.add(pname.split(".")[1])
        report[batch_name] = {"compared": compared, "encoded": {k: list(v) for k, v in encoded.items()}}
    assert handles["replicated"].vision_sp_reason == "vision_sp=False"
    owner = models["split"].model
    patched = {m for m in ("get_image_features", "get_video_features") if hasattr(type(owner), m)}
    assert patched and patched <= set(owner.__dict__)
    for h in handles.values():
        h.remove()
    # remove() gives the owner its class's encoder methods back
    assert not patched & set(owner.__dict__), set(owner.__dict__)
    return report


def _expected_rows(name, images_per_row, sp, rank):
    """Pixel rows this rank's tower encodes under vision_sp: its balanced share, or the cheapest
    image when the share is empty."""
    n = sum(images_per_row)
    if MODELS[name][1] == "qwen":
        weights = [t * h * w for t, h, w in GRIDS[:n]]
    else:
        weights = [1] * n
    lo, hi = balanced_shares(weights, sp)[rank]
    return sum(weights[lo:hi]) if hi > lo else min(weights)


@pytest.mark.parametrize("name,sp", [(n, 2) for n in MODELS] + [("qwen2_vl", 4)])
def test_vision_sp_parity(name, sp):
    import transformers
    from packaging.version import Version

    # the known gap of tests/test_multimodal.py: under the minimum transformers a labelled Qwen3-VL
    # forward is refused, so its deepstack features (one concatenated tensor per layer there) are
    # checked through an objective of the logits
    labelled = name != "qwen3_vl" or Version(transformers.__version__) >= Version("5.23")
    reports = run_distributed(_parity, sp, name, sp, labelled, timeout=600)
    components = {"language_model", "lm_head"} | ({"visual"} if MODELS[name][1] == "qwen"
                                                  else {"vision_tower", "multi_modal_projector"})
    for batch_name, images_per_row in BATCHES.items():
        # every component's gradient was compared (the vision tower's and projector's too)
        assert components <= reports[0][batch_name]["compared"] | {"lm_head"}, reports[0][batch_name]["compared"]
        total = _expected_rows(name, images_per_row, 1, 0)
        for rank, report in enumerate(reports):
            encoded = report[batch_name]["encoded"]
            assert encoded["ref"] == encoded["replicated"] == [total], encoded
            # each rank encoded its balanced share only, once
            assert encoded["split"] == [_expected_rows(name, images_per_row, sp, rank)], (rank, encoded)


def test_balanced_shares():
    assert balanced_shares([16, 8, 24, 4], 2) == [(0, 2), (2, 4)]  # 24 | 28: the smallest largest share
    assert balanced_shares([16, 8, 24, 4], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert balanced_shares([5, 5, 5], 4) == [(0, 1), (1, 2), (2, 3), (3, 3)]  # fewer images than ranks
    assert balanced_shares([1], 2) == [(0, 1), (1, 1)]
    assert balanced_shares([], 3) == [(0, 0)] * 3
    for weights in ([3, 1, 4, 1, 5, 9, 2, 6], [100, 1, 1, 1], [1, 1, 1, 100]):
        for parts in (2, 3, 4):
            shares = balanced_shares(weights, parts)
            assert len(shares) == parts and shares[0][0] == 0 and shares[-1][1] == len(weights)
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))  # contiguous, in order
            largest = max(sum(weights[lo:hi]) for lo, hi in shares)
            # no contiguous cut into `parts` ranges has a smaller largest share (brute force)
            import itertools
            best = min(max(sum(weights[a:b]) for a, b in zip((0, *cut), (*cut, len(weights))))
                       for cut in itertools.combinations_with_replacement(range(len(weights) + 1), parts - 1)
                       if list(cut) == sorted(cut))
            assert largest == best, (weights, parts, shares)


def _gather(rank, world):
    from lightning_ulysses.parallel.uneven import gather_shares

    sizes = [3, 0, 2]  # rank 1 has an empty share
    torch.manual_seed(rank)
    x = torch.randn(sizes[rank], dtype=torch.float64, requires_grad=True)
    full = gather_shares(x, sizes, dist.group.WORLD)
    parts = [torch.empty(max(sizes), dtype=torch.float64) for _ in range(world)]
    padded = torch.zeros(max(sizes), dtype=torch.float64)
    padded[: sizes[rank]] = x.detach()
    dist.all_gather(parts, padded)
    expected = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    assert torch.equal(full.detach(), expected)
    # a different upstream gradient on every rank: each share gets the sum of all ranks' gradients of it
    weight = torch.arange(1.0, 6.0, dtype=torch.float64) * (rank + 1)
    (full * weight).sum().backward()
    total = torch.arange(1.0, 6.0, dtype=torch.float64) * sum(r + 1 for r in range(world))
    offsets = [0, 3, 3]
    assert torch.equal(x.grad, total[offsets[rank]:offsets[rank] + sizes[rank]])
    return True


def test_gather_shares_forward_and_adjoint():
    assert all(run_distributed(_gather, 3))


def test_fall_back_names_its_reason():
    """An encoder call of another form (Idefics3: pixel_values [batch, images, ...] with a pixel mask)
    is encoded replicated, and the plan says why."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from lightning_ulysses.models.analysis import analyse_model

    model = Idefics3ForConditionalGeneration(Idefics3Config(
        text_config={"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
                     "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 8, "patch_size": 2}, image_token_id=120))
    split, reason = plan_vision_split(model, analyse_model(model, 2).composite)
    assert split is None and "get_image_features(pixel_values, pixel_attention_mask" in reason, reason
