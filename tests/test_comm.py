"""The all-to-all exchange, its inverse and their backward, on their own."""

import pytest
import torch
import torch.distributed as dist

from lightning_ulysses.parallel.comm import gather_sequence, heads_from_sequence, sequence_from_heads, sum_over_group
from lightning_ulysses.parallel.mesh import build_mesh
from tests.distributed import run_distributed


def _full(seed, shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _exchange(rank, world, sp):
    dims = build_mesh("cpu", sp)
    group, r = dims.sp_group, dims.sp_rank
    b, hq, hk, s, d = 2, 4, 8, 12, 3
    q_full, k_full = _full(dims.dp_rank, (b, hq, s, d)), _full(10 + dims.dp_rank, (b, hk, s, d))
    sl = s // sp
    # Each rank holds a sequence chunk; make one of them non-contiguous as HF's transposed views are.
    q = q_full[:, :, r * sl:(r + 1) * sl].clone().requires_grad_()
    k = k_full[:, :, r * sl:(r + 1) * sl].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    q_h, k_h = heads_from_sequence([q, k], group)
    torch.testing.assert_close(q_h, q_full[:, r * hq // sp:(r + 1) * hq // sp], rtol=0, atol=0)
    torch.testing.assert_close(k_h, k_full[:, r * hk // sp:(r + 1) * hk // sp], rtol=0, atol=0)
    # Round trip: head-sharded [b, s, h/sp, d] back to sequence-sharded [b, s/sp, h, d].
    back = sequence_from_heads(q_h.transpose(1, 2), group)
    torch.testing.assert_close(back, q.detach().transpose(1, 2), rtol=0, atol=0)
    # Backward of the exchange is the inverse exchange: a weighted sum's gradient lands on the
    # exact elements each rank sent.
    wq, wk = _full(99, q_full.shape), _full(98, k_full.shape)
    loss = (q_h * wq[:, r * hq // sp:(r + 1) * hq // sp]).sum() + (k_h * wk[:, r * hk // sp:(r + 1) * hk // sp]).sum()
    loss.backward()
    torch.testing.assert_close(q.grad, wq[:, :, r * sl:(r + 1) * sl], rtol=0, atol=0)
    torch.testing.assert_close(k.grad, wk[:, :, r * sl:(r + 1) * sl], rtol=0, atol=0)
    # sum_over_group: forward sum, backward sum of upstream grads.
    x = torch.tensor(float(r + 1), dtype=torch.float64, requires_grad=True)
    y = sum_over_group(x, group)
    assert y.item() == sum(range(1, sp + 1))
    (y * (r + 1)).backward()
    assert x.grad.item() == sum(range(1, sp + 1))
    g = gather_sequence(torch.full((2, 1), r), group)
    assert g.tolist() == [list(range(sp))] * 2
    return True


@pytest.mark.parametrize("sp", [2, 4])
def test_exchange_roundtrip_and_backward(sp):
    assert all(run_distributed(_exchange, 4, sp))
