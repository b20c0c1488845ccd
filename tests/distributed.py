"""Test helpers for fork-started gloo runs: the runner (from the package) and relative comparisons.

Every process group gets a short timeout so a deadlock fails the test instead of hanging CI,
and every run gets its own free port and a clean distributed environment.
"""

from __future__ import annotations

import torch

# The fork + gloo runner lives in the package (the support matrix and the check command use it too).
from lightning_ulysses.support.runner import _DIST_ENV, PG_TIMEOUT, free_port, run_distributed  # noqa: F401


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, name: str = "") -> None:
    """Relative closeness on the whole tensor: ||a - e|| <= rtol * ||e|| (plus a tiny floor for zeros)."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).norm().item()
    ref = expected.norm().item()
    assert err <= rtol * ref + 1e-12, f"{name}: relative error {err / max(ref, 1e-30):.3e} > {rtol:.1e}"


def grad_ratio(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """<a, e> / <e, e>: 1.0 when the gradients agree, ``sp`` or ``1/sp`` when a scaling bug hides."""
    a = actual.detach().double().flatten()
    e = expected.detach().double().flatten()
    return (a @ e / (e @ e)).item()


def assert_sp_grads(model: torch.nn.Module, ref: torch.nn.Module, group, sp: int, what: str) -> None:
    """Every parameter gradient of ``model`` (run under SP), summed over the SP ``group`` and divided by
    ``sp`` (what DDP's average over dp x sp ranks does), equals ``ref``'s to 1e-5 relative, and its ratio
    to it is 1 (so a factor-of-sp error cannot hide)."""
    import torch.distributed as dist

    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=group)
        g /= sp
        assert_close_rel(g, q.grad, name=f"{what} {name}")
        assert abs(grad_ratio(g, q.grad) - 1) < 1e-5, f"{what} {name}"
