"""Classify one architecture under SP against the untouched model: exact, refused or untestable.

Runs inside a worker of an SP group (every rank calls :func:`classify` with the same arguments).
Anything else — a mismatch ("wrong") or an exception that is not ours ("foreign") — is a defect
the support-matrix test reports.
"""

from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .configs import VOCAB, build_tiny

SEQ = 32
BATCH = 2
RTOL = 1e-5


@dataclass
class Verdict:
    arch: str
    head: str  # "causal" or "masked"
    cls: str
    verdict: str  # exact | refused | untestable | wrong | foreign
    reason: str = ""
    details: dict[str, float] = field(default_factory=dict)
    variant: str = ""  # "" for the default config; else the configuration row (lightning_ulysses/support/variants.py)
    # how the default config was compared, reused by its configuration rows
    dtype: str = "float64"
    eval_mode: bool = False


def _inputs(head: str, padded: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, VOCAB, (BATCH, SEQ), generator=g)
    if head == "masked":
        labels = torch.full_like(ids, -100)
        pick = torch.rand(ids.shape, generator=g) < 0.3
        labels[pick] = ids[pick]
        ids = ids.masked_fill(pick, 3)  # the tiny config's mask token
    else:
        labels = ids.clone()
        labels[0, 3:9] = -100
    batch = {"input_ids": ids, "labels": labels}
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :5] = 0  # left padding on row 1
        batch["attention_mask"] = mask
        batch["input_ids"] = ids.masked_fill(mask == 0, 0)
        # The target of the first real token is predicted from padding: no real token to attend
        # to, so its value is backend noise; lightning_ulysses ignores it, and so does the reference.
        labels[1, 5] = -100
        batch["labels"] = labels.masked_fill(mask == 0, -100)
    return batch


def _call(model: torch.nn.Module, batch: dict[str, Any]) -> Any:
    kwargs = dict(batch)
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params or hasattr(model.config, "use_cache"):
        kwargs["use_cache"] = False
    return model(**kwargs)


def _short(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)[-2:]
    where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames))
    return f"{type(e).__name__}: {str(e)[:200]} (at {where})"


def _rel(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.detach().double(), e.detach().double()
    return (a - e).norm().item() / max(e.norm().item(), 1e-30)


def _is_random_in_training(model: torch.nn.Module, head: str) -> bool:
    batch = _inputs(head, False)
    try:
        with torch.no_grad():
            torch.manual_seed(11)
            a = _call(model, batch).logits
            torch.manual_seed(12)
            b = _call(model, batch).logits
    except Exception:  # noqa: BLE001 - the non-SP model fails: reported as untestable below
        return False
    return not torch.equal(a, b)


def compare(ref: torch.nn.Module, model: torch.nn.Module, batch: dict[str, torch.Tensor], variant: str,
            sp_group: Any, row: Verdict, real: torch.Tensor | None = None,
            groups: dict[str, Any] | None = None) -> dict[str, float] | Verdict | None:
    """Run ``batch`` through ``ref`` (untouched) and ``model`` under SP; the group's worst relative
    errors (logits at real tokens, loss, aux loss, gradients, gradient ratios), or ``row`` with its
    verdict set (refused / foreign / untestable on the plain batch), or ``None`` when the non-SP
    model itself fails on a non-plain batch. ``real [b, s]`` marks the tokens whose logits are
    compared (default: the batch's ``attention_mask``, else all). ``groups``: ``ring_group`` and
    ``ulysses_group`` splitting ``sp_group`` as ulysses x ring (:func:`~lightning_ulysses.apply_ulysses`),
    or ``None`` (pure Ulysses)."""
    from lightning_ulysses import apply_ulysses, shard_batch
    from lightning_ulysses.models.analysis import UnsupportedModelError

    sp = dist.get_world_size(sp_group)
    rank = dist.get_rank(sp_group)

    def verdict(kind: str, reason: str) -> Verdict:
        return Verdict(row.arch, row.head, row.cls, kind, reason, variant=row.variant)

    ref.zero_grad(set_to_none=True)
    try:
        ref_out = _call(ref, batch)
        if not torch.isfinite(ref_out.loss):
            raise FloatingPointError("the non-SP loss is not finite")
        ref_out.loss.backward()
    except Exception as e:  # noqa: BLE001
        if variant == "plain" or row.variant:
            return verdict("untestable", f"the non-SP model fails: {type(e).__name__}: {e}"[:300])
        return None
    try:
        handle = apply_ulysses(model, sp_group, packed_documents="refuse", **(groups or {}))
    except UnsupportedModelError as e:
        return verdict("refused", str(e))
    except Exception as e:  # noqa: BLE001
        return verdict("foreign", f"apply: {_short(e)}")
    model.zero_grad(set_to_none=True)
    try:
        shard = shard_batch(batch, rank, sp)
        out = _call(model, shard)
        out.loss.backward()
    except UnsupportedModelError as e:
        handle.remove()
        return verdict("refused", f"at forward ({variant}): {e}")
    except Exception as e:  # noqa: BLE001
        handle.remove()
        return verdict("foreign", f"{variant}: {_short(e)}")
    handle.remove()
    chunk = out.logits.shape[1]  # seq / sp, after the padding shard_batch adds to reach a multiple of sp
    lo = rank * chunk
    if real is None:
        real = batch.get("attention_mask", torch.ones(batch["input_ids"].shape))
    valid = real[:, lo:lo + chunk].bool()
    k = valid.shape[1]  # this rank's real positions (fewer than chunk on the last ranks of a padded row)
    errs = {
        f"{variant}/logits": _rel(out.logits[:, :k][valid], ref_out.logits[:, lo:lo + k][valid]),
        f"{variant}/loss": _rel(out.loss, ref_out.loss),
    }
    if getattr(ref_out, "aux_loss", None) is not None:
        errs[f"{variant}/aux_loss"] = _rel(out.aux_loss, ref_out.aux_loss)
    worst_grad, worst_ratio = 0.0, 0.0
    pairs = [(p, q) for p, q in zip(model.parameters(), ref.parameters()) if p.grad is not None or q.grad is not None]
    total = sum(float(q.grad.double().norm() ** 2) for _, q in pairs if q.grad is not None) ** 0.5
    # Gradients that are zero in exact arithmetic (a key bias: softmax ignores a per-query
    # constant) come out as rounding noise in both runs; they are measured against a floor of
    # 1e-4 of the whole gradient's norm instead of their own norm.
    floor = 1e-4 * total
    for p, q in pairs:
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=sp_group)
        g /= sp
        e = q.grad if q.grad is not None else torch.zeros_like(q)
        err = (g.double() - e.double()).norm().item()
        scale = max(e.double().norm().item(), floor, 1e-30)
        worst_grad = max(worst_grad, err / scale)
        if e.double().norm().item() >= floor:
            ratio = (g.double().flatten() @ e.double().flatten() / (e.double().flatten() @ e.double().flatten())).item()
            worst_ratio = max(worst_ratio, abs(ratio - 1))
    errs[f"{variant}/grads"] = worst_grad
    errs[f"{variant}/grad_ratio"] = worst_ratio
    # Every rank decides on the worst error of the group so they agree on the verdict.
    t = torch.tensor(list(errs.values()), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=sp_group)
    return dict(zip(errs, t.tolist()))


def classify(arch: str, head: str, cls: str, sp_group: Any, variants=("plain", "padded"),
             base: dict[str, Any] | None = None, groups: dict[str, Any] | None = None) -> Verdict:
    """Classify ``cls`` of model type ``arch`` (``head`` ``"causal"`` or ``"masked"``) on every rank of
    ``sp_group``: a tiny random build of its default config (of ``base``, a full-size config dict,
    when given: :func:`~.configs.build_tiny`) under SP against the untouched build, on ``variants``
    of the batch (``"plain"``, ``"padded"``: left padding), split by ``groups`` as in :func:`compare`.
    Every rank returns the same verdict."""
    try:
        ref = build_tiny(arch, cls, base=base)
        model = build_tiny(arch, cls, base=base)
    except Exception as e:  # noqa: BLE001
        return Verdict(arch, head, cls, "untestable", f"tiny config could not be built: {type(e).__name__}: {e}"[:300])
    try:
        for variant in variants:
            loss = _call(ref, _inputs(head, variant == "padded")).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(variant)
            loss.backward()
    except Exception:  # noqa: BLE001 - some kernels (grouped MoE matmuls) have no float64, some eager
        # paths turn fully masked padding rows into NaN in float64: float32 then
        ref = build_tiny(arch, cls, dtype=torch.float32, base=base)
        model = build_tiny(arch, cls, dtype=torch.float32, base=base)
    note = ""
    eval_mode = _is_random_in_training(ref, head)
    if eval_mode:
        # e.g. sampled expert routing: no two runs agree, with or without SP. The deterministic
        # (eval) forward and backward are compared instead, and the verdict says so.
        ref.eval()
        model.eval()
        note = "compared in eval mode: the training forward samples random numbers"
    how = {"dtype": str(next(ref.parameters()).dtype).removeprefix("torch."), "eval_mode": eval_mode}
    details: dict[str, float] = {}
    for variant in variants:
        batch = _inputs(head, variant == "padded")
        result = compare(ref, model, batch, variant, sp_group, Verdict(arch, head, cls, ""), groups=groups)
        if isinstance(result, Verdict):
            return result
        if result is None:
            # e.g. the model does not take a padding mask (or its eager path turns fully masked
            # padding rows into NaN); the plain case still decides, and the verdict says so.
            note = (note + "; " if note else "") + f"{variant} rows not compared: the non-SP model fails on them"
            continue
        details.update(result)
    bad = {k: v for k, v in details.items() if not v <= RTOL}
    if bad:
        worst = max(bad, key=bad.get)
        return Verdict(arch, head, cls, "wrong", f"{worst} relative error {bad[worst]:.2e}", details, **how)
    return Verdict(arch, head, cls, "exact", note, details, **how)
