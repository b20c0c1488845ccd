"""Sequence tiling: parity with untiled compute (values, input and parameter grads), one gradient
accumulation per parameter per backward, DDP, tiled MLPs on a real HF Llama, and the tiled LM loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from lightning_ulysses.tiling import (
    TiledMLP,
    agree_on_shards,
    sequence_tiled_compute,
    tile_bounds,
    tile_mlps,
)
from lightning_ulysses.losses.tiled_lm_loss import tiled_causal_lm_loss_sum
from tests.distributed import assert_close_rel, grad_ratio, run_distributed

HIDDEN = 8


class TinyMLP(nn.Module):
    """Per-token MLP with the LlamaMLP layout: forward([batch, seq, hidden]) -> [batch, seq, hidden]."""

    def __init__(self, hidden: int = HIDDEN, inter: int = 12) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter)
        self.down_proj = nn.Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _assert_grads(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual is not None, f"{name}: no gradient"
    assert_close_rel(actual, expected, name=name)
    if expected.count_nonzero():
        assert grad_ratio(actual, expected) == pytest.approx(1.0, abs=1e-5), name


def _assert_matches_untiled(out, ref, tiled_x, x, tiled_p, mlp):
    """Output, input gradient and every parameter gradient of the tiled run equal the untiled ones."""
    assert_close_rel(out, ref, name="output")
    _assert_grads(tiled_x, x.grad, "x")
    for name, p in mlp.named_parameters():
        _assert_grads(tiled_p[name], p.grad, name)


def _param_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def _count_accumulations(params) -> list[int]:
    counts = [0] * len(params)
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda _p, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


SHAPES = [  # (batch, seq, shards)
    (1, 12, 4),   # divisible
    (2, 12, 4),
    (1, 13, 4),   # uneven tiles
    (2, 10, 3),
    (2, 3, 5),    # seq shorter than shards: 3 tiles of 1
]


# --------------------------------------------------------------------------------------------------
# sequence_tiled_compute
# --------------------------------------------------------------------------------------------------
def test_tile_bounds() -> None:
    assert tile_bounds(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert tile_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert tile_bounds(3, 5) == [(0, 1), (1, 2), (2, 3)]
    assert tile_bounds(0, 3) == [(0, 0)]
    sizes = [e - s for s, e in tile_bounds(13, 4)]
    assert sizes == [t.shape[0] for t in torch.arange(13).tensor_split(4)]
    with pytest.raises(ValueError):
        tile_bounds(5, 0)


@pytest.mark.parametrize("reduction", [None, "mean", "sum"])
@pytest.mark.parametrize("batch,seq,shards", SHAPES)
def test_parity_explicit_params(batch: int, seq: int, shards: int, reduction: str | None) -> None:
    torch.manual_seed(0)
    mlp = TinyMLP()
    x = torch.randn(batch, seq, HIDDEN, requires_grad=True)
    upstream = torch.randn(batch, seq, HIDDEN) if reduction is None else torch.tensor(1.3)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return mlp(x)

    out = sequence_tiled_compute(fn, seq, shards, {"x": x}, {}, "x", compute_params=list(mlp.parameters()),
                                 output_reduction=reduction)
    out.backward(upstream)
    tiled_x, tiled_p = x.grad.clone(), _param_grads(mlp)

    x.grad = None
    mlp.zero_grad(set_to_none=True)
    ref = mlp(x)
    ref = {None: ref, "mean": ref.mean(), "sum": ref.sum()}[reduction]
    ref.backward(upstream)

    _assert_matches_untiled(out, ref, tiled_x, x, tiled_p, mlp)


@pytest.mark.parametrize("batch,seq,shards", [(1, 13, 4), (2, 3, 5)])
def test_parity_compute_params_none_module(batch: int, seq: int, shards: int) -> None:
    """compute_params=None with a bound method of a module: its parameters are found automatically."""
    torch.manual_seed(1)
    mlp = TinyMLP()
    x = torch.randn(batch, seq, HIDDEN, requires_grad=True)
    counts = _count_accumulations(list(mlp.parameters()))
    out = sequence_tiled_compute(mlp.forward, seq, shards, {"x": x}, {}, "x", output_reduction="mean")
    out.backward()
    assert counts == [1] * len(counts)
    tiled_x, tiled_p = x.grad.clone(), _param_grads(mlp)

    x.grad = None
    mlp.zero_grad(set_to_none=True)
    ref = mlp(x).mean()
    ref.backward()
    _assert_matches_untiled(out, ref, tiled_x, x, tiled_p, mlp)


def test_parity_compute_params_none_closure() -> None:
    """compute_params=None with a plain closure: leaf parameters it reads still get correct grads, once."""
    torch.manual_seed(2)
    w = nn.Parameter(torch.randn(HIDDEN, HIDDEN))
    b = nn.Parameter(torch.randn(HIDDEN))
    x = torch.randn(2, 11, HIDDEN, requires_grad=True)
    counts = _count_accumulations([w, b])

    def fn(h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ w + b)

    out = sequence_tiled_compute(fn, 11, 4, {"h": x}, {}, "h", output_reduction="sum")
    (out * 0.5).backward()
    assert counts == [1, 1]
    tiled = [x.grad.clone(), w.grad.clone(), b.grad.clone()]

    x.grad = w.grad = b.grad = None
    (fn(x).sum() * 0.5).backward()
    for name, t, r in zip(["x", "w", "b"], tiled, [x.grad, w.grad, b.grad]):
        _assert_grads(t, r, name)


@pytest.mark.parametrize("reduction", [None, "mean", "sum"])
def test_unshard_dimension_zero(reduction: str | None) -> None:
    """fn returns one value per tile; outputs are stacked on a new dim 0 and then reduced."""
    torch.manual_seed(3)
    mlp = TinyMLP()
    seq, shards = 10, 4
    x = torch.randn(2, seq, HIDDEN, requires_grad=True)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return mlp(x).pow(2).sum()

    out = sequence_tiled_compute(fn, seq, shards, {"x": x}, {}, "x", compute_params=list(mlp.parameters()),
                                 output_unshard_dimension=0, output_reduction=reduction)
    upstream = torch.randn(shards) if reduction is None else torch.tensor(2.0)
    out.backward(upstream)
    tiled_x, tiled_p = x.grad.clone(), _param_grads(mlp)

    x.grad = None
    mlp.zero_grad(set_to_none=True)
    per_tile = torch.stack([fn(t) for t in x.tensor_split(shards, dim=1)])
    ref = {None: per_tile, "mean": per_tile.mean(), "sum": per_tile.sum()}[reduction]
    ref.backward(upstream)
    _assert_matches_untiled(out, ref, tiled_x, x, tiled_p, mlp)


def test_mean_is_exact_over_uneven_tiles() -> None:
    """'mean' is the mean over all elements, not the mean of tile means (they differ for uneven tiles)."""
    x = torch.arange(7, dtype=torch.float32).reshape(1, 7, 1).requires_grad_()
    out = sequence_tiled_compute(lambda x: x * 1.0, 7, 3, {"x": x}, {}, "x", output_reduction="mean")
    assert out.item() == pytest.approx(3.0, rel=1e-7)
    out.backward()
    assert_close_rel(x.grad, torch.full_like(x, 1 / 7), name="x")


def test_other_sharded_and_passed_tensors() -> None:
    """Extra sharded tensors are split too but get no grad; passed tensors requiring grad get summed grads."""
    torch.manual_seed(4)
    seq = 9
    x = torch.randn(2, seq, HIDDEN, requires_grad=True)
    mask = torch.rand(2, seq, 1).round()
    mask_req = mask.clone().requires_grad_()
    scale_leaf = torch.randn(HIDDEN, requires_grad=True)
    scale = scale_leaf * 2  # a non-leaf passed tensor: its gradient must flow on to scale_leaf

    def fn(x: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, power: int) -> torch.Tensor:
        return (x * scale).pow(power) * mask

    out = sequence_tiled_compute(fn, seq, 4, {"x": x, "mask": mask_req}, {"scale": scale, "power": 2}, "x",
                                 output_reduction="mean")
    out.backward()
    assert mask_req.grad is None
    tiled = [x.grad.clone(), scale_leaf.grad.clone()]
    x.grad = scale_leaf.grad = None
    fn(x, mask, scale_leaf * 2, 2).mean().backward()
    _assert_grads(tiled[0], x.grad, "x")
    _assert_grads(tiled[1], scale_leaf.grad, "scale")


def test_output_concatenated_on_other_dim() -> None:
    """fn returning [batch, tile] (e.g. a per-token statistic) concatenated on dim -1."""
    torch.manual_seed(5)
    x = torch.randn(2, 7, HIDDEN, requires_grad=True)
    out = sequence_tiled_compute(lambda x: x.pow(2).sum(-1), 7, 3, {"x": x}, {}, "x",
                                 output_unshard_dimension=-1, output_reduction=None)
    upstream = torch.randn(2, 7)
    out.backward(upstream)
    tiled = x.grad.clone()
    x.grad = None
    ref = x.pow(2).sum(-1)
    ref.backward(upstream)
    assert_close_rel(out, ref, name="output")
    _assert_grads(tiled, x.grad, "x")


@pytest.mark.parametrize("reduction", [None, "mean"])
def test_upstream_gradient_scaling(reduction: str | None) -> None:
    """(out * c).backward() scales every gradient (input and parameters) by c."""
    torch.manual_seed(6)
    mlp = TinyMLP()
    x = torch.randn(2, 10, HIDDEN, requires_grad=True)

    def loss(c: float) -> None:
        x.grad = None
        mlp.zero_grad(set_to_none=True)
        out = sequence_tiled_compute(mlp.forward, 10, 3, {"x": x}, {}, "x", output_reduction=reduction)
        (out * c).sum().backward()

    loss(1.0)
    base = [x.grad.clone(), *(p.grad.clone() for p in mlp.parameters())]
    loss(3.7)
    scaled = [x.grad, *(p.grad for p in mlp.parameters())]
    for i, (s, b) in enumerate(zip(scaled, base)):
        assert_close_rel(s, 3.7 * b, name=f"grad {i}")
        assert grad_ratio(s, b) == pytest.approx(3.7, rel=1e-5)


def test_params_accumulate_once_per_backward() -> None:
    torch.manual_seed(7)
    mlp = TinyMLP()
    params = list(mlp.parameters())
    counts = _count_accumulations(params)
    x = torch.randn(2, 16, HIDDEN, requires_grad=True)
    out = sequence_tiled_compute(mlp.forward, 16, 8, {"x": x}, {}, "x", compute_params=params,
                                 output_reduction="sum")
    assert counts == [0] * len(params), "no parameter gradient may be produced in forward"
    out.backward()
    assert counts == [1] * len(params)


def test_dropout_replayed_in_backward() -> None:
    """Recomputation replays the forward's random stream, so gradients match the forward's dropout mask."""
    torch.manual_seed(8)
    x = (torch.rand(2, 12, HIDDEN) + 0.5).requires_grad_()
    out = sequence_tiled_compute(lambda x: F.dropout(x, 0.5, training=True), 12, 4, {"x": x}, {}, "x",
                                 output_reduction=None)
    before = torch.get_rng_state()
    out.backward(torch.ones_like(out))
    assert torch.equal(torch.get_rng_state(), before), "backward must not disturb the global RNG"
    assert torch.equal(x.grad, (out != 0).float() * 2.0)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_inside_activation_checkpoint(use_reentrant: bool) -> None:
    """A tiled MLP inside torch.utils.checkpoint (as under HF gradient checkpointing) keeps exact grads."""
    torch.manual_seed(10)
    mlp = TinyMLP()
    x = torch.randn(2, 9, HIDDEN, requires_grad=True)
    counts = _count_accumulations(list(mlp.parameters()))
    with tile_mlps(mlp, 4):
        out = torch.utils.checkpoint.checkpoint(lambda h: mlp(h) * h, x, use_reentrant=use_reentrant)
        out.sum().backward()
    assert counts == [1] * len(counts)
    tiled_x, tiled_p = x.grad.clone(), _param_grads(mlp)
    x.grad = None
    mlp.zero_grad(set_to_none=True)
    (mlp(x) * x).sum().backward()
    _assert_grads(tiled_x, x.grad, "x")
    for name, p in mlp.named_parameters():
        _assert_grads(tiled_p[name], p.grad, name)


def test_no_grad_inference() -> None:
    mlp = TinyMLP()
    x = torch.randn(1, 9, HIDDEN)
    with torch.no_grad():
        out = sequence_tiled_compute(mlp.forward, 9, 4, {"x": x}, {}, "x", output_reduction=None)
    assert not out.requires_grad
    assert_close_rel(out, mlp(x).detach(), name="output")


def test_argument_validation() -> None:
    x = torch.randn(1, 4, 2)
    with pytest.raises(ValueError):
        sequence_tiled_compute(lambda x: x, 4, 2, {"x": x}, {}, "x", output_reduction="max")
    with pytest.raises(KeyError):
        sequence_tiled_compute(lambda x: x, 4, 2, {"x": x}, {}, "y")
    with pytest.raises(ValueError):
        sequence_tiled_compute(lambda x: x, 5, 2, {"x": x}, {}, "x")
    with pytest.raises(ValueError):
        sequence_tiled_compute(lambda x: x, 4, 0, {"x": x}, {}, "x")


# --------------------------------------------------------------------------------------------------
# agree_on_shards
# --------------------------------------------------------------------------------------------------
def test_agree_on_shards_without_distributed() -> None:
    assert not dist.is_initialized()
    assert agree_on_shards(5) == 5


def _agree_worker(rank: int, world: int) -> tuple[int, int]:
    return agree_on_shards([3, 7][rank]), agree_on_shards(rank + 1, group=dist.new_group([0, 1]))


def test_agree_on_shards_distributed() -> None:
    assert run_distributed(_agree_worker, 2) == [(7, 2), (7, 2)]


# --------------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------------
class TinyLM(nn.Module):
    """in-proj -> residual TinyMLP -> tiled LM-head loss (mean over valid tokens)."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.inp = nn.Linear(HIDDEN, HIDDEN)
        self.mlp = TinyMLP()
        self.head = nn.Linear(HIDDEN, vocab, bias=False)
        self.tiled = False

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.mlp(h)
        if self.tiled:
            loss_sum, n = tiled_causal_lm_loss_sum(h, self.head, labels, shards=3)
        else:
            loss_sum = F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten(), reduction="sum")
            n = (labels != -100).sum()
        return loss_sum / n


def _ddp_data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(2, 10, HIDDEN, generator=g)
    labels = torch.randint(0, 11, (2, 10), generator=g)
    labels[0, :2] = -100
    return x, labels


def _ddp_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyLM()
    model.tiled = True
    handle = tile_mlps(model, 4)
    assert handle.names == ["mlp"]
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    for step in range(3):
        x, labels = _ddp_data(step, rank)
        opt.zero_grad()
        ddp(x, labels).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ddp_matches_untiled_single_process() -> None:
    results = run_distributed(_ddp_worker, 2)

    torch.manual_seed(0)
    ref = TinyLM()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(3):
        opt.zero_grad()
        # DDP averages gradients over ranks: the same as the mean of the per-rank losses.
        loss = sum(ref(*_ddp_data(step, r)) for r in range(2)) / 2
        loss.backward()
        opt.step()

    expected = ref.state_dict()
    for rank, state in enumerate(results):
        assert state.keys() == expected.keys()
        for key in expected:
            assert_close_rel(state[key], expected[key], name=f"rank {rank} {key}")


# --------------------------------------------------------------------------------------------------
# tiled MLPs on a real HF model
# --------------------------------------------------------------------------------------------------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def _llama_step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), _param_grads(model)


@pytest.mark.parametrize("batch,seq", [(1, 11), (2, 4)])
def test_tile_mlps_llama_parity_and_remove(batch: int, seq: int) -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))
    keys = list(model.state_dict().keys())
    ref_logits, ref_loss, ref_grads = _llama_step(model, ids)

    handle = tile_mlps(model, 3)
    assert handle.names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert list(model.state_dict().keys()) == keys
    mlp = model.model.layers[0].mlp
    counts = _count_accumulations(list(mlp.parameters()))
    logits, loss, grads = _llama_step(model, ids)
    assert counts == [1] * len(counts)
    assert_close_rel(logits, ref_logits, name="logits")
    assert_close_rel(loss, ref_loss, name="loss")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        _assert_grads(grads[name], ref_grads[name], name)

    handle.remove()
    for layer in model.model.layers:
        assert "forward" not in vars(layer.mlp)
    logits_after, loss_after, grads_after = _llama_step(model, ids)
    assert torch.equal(logits_after, ref_logits)
    assert torch.equal(loss_after, ref_loss)
    assert all(torch.equal(grads_after[n], ref_grads[n]) for n in ref_grads)


def test_tile_mlps_auto_nested_and_errors() -> None:
    model = TinyLM()
    previous = lambda x: TinyMLP.forward(model.mlp, x) * 2  # noqa: E731 - a forward someone else installed
    model.mlp.forward = previous
    x = torch.randn(1, 20, HIDDEN)  # auto: ceil(20 / 8) = 3 tiles
    ref = model.mlp(x)
    with tile_mlps(model, "auto") as handle:
        assert handle.names == ["mlp"]
        assert_close_rel(model.mlp(x), ref, name="auto")
        with pytest.raises(RuntimeError):
            tile_mlps(model, 2)
    assert vars(model.mlp)["forward"] is previous
    with pytest.raises(ValueError):
        tile_mlps(nn.Linear(2, 2), 2)
    with pytest.raises(ValueError):
        tile_mlps(model, 0)


def test_tiled_mlp_module() -> None:
    torch.manual_seed(9)
    mlp = TinyMLP()
    wrapped = TiledMLP(mlp, 4)
    assert wrapped.mlp is mlp
    x = torch.randn(2, 9, HIDDEN, requires_grad=True)
    upstream = torch.randn(2, 9, HIDDEN)
    out = wrapped(x)
    out.backward(upstream)
    tiled_x, tiled_p = x.grad.clone(), _param_grads(mlp)
    x.grad = None
    mlp.zero_grad(set_to_none=True)
    ref = mlp(x)
    ref.backward(upstream)
    _assert_matches_untiled(out, ref, tiled_x, x, tiled_p, mlp)


class GatedMLP(TinyMLP):
    """TinyMLP with ``act_fn``: the HF gated-MLP attribute layout, so tiling may skip recomputing ``down_proj``."""

    def __init__(self, scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.act_fn = nn.SiLU()
        self.scale = scale
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x))) * self.scale


@pytest.mark.parametrize("batch,seq,shards", SHAPES)
@pytest.mark.parametrize("frozen_down", [False, True])
def test_gated_mlp_skips_down_proj_recompute(batch: int, seq: int, shards: int, frozen_down: bool) -> None:
    """A gated MLP is exact (outputs, every gradient, upstream scaling, one accumulation per parameter)
    while backward recomputes only gate/up: down_proj runs in forward tiles and the one-token check only.
    A frozen down_proj takes the generic path (full recomputation) and stays exact too."""
    torch.manual_seed(11)
    mlp = GatedMLP()
    mlp.down_proj.requires_grad_(not frozen_down)
    x = torch.randn(batch, seq, HIDDEN, requires_grad=True)
    upstream = torch.randn(batch, seq, HIDDEN) * 3.0
    calls = []
    mlp.down_proj.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    counts = _count_accumulations([p for p in mlp.parameters() if p.requires_grad])
    with tile_mlps(mlp, shards):
        out = mlp(x)
        n_forward = len(calls)
        out.backward(upstream)
    n_tiles = len(tile_bounds(seq, shards))
    assert n_forward == n_tiles + 2  # the tiles, and the one-token check (module forward, then the split)
    assert len(calls) - n_forward == (n_tiles if frozen_down else 0)
    assert counts == [1] * len(counts)
    tiled_x, tiled_p = x.grad.clone(), {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}
    x.grad = None
    mlp.zero_grad(set_to_none=True)
    ref = mlp(x)
    ref.backward(upstream)
    assert_close_rel(out, ref, name="output")
    _assert_grads(tiled_x, x.grad, "x")
    for name, p in mlp.named_parameters():
        if p.requires_grad:
            _assert_grads(tiled_p[name], p.grad, name)


@pytest.mark.parametrize("variant", ["other-forward", "dropout"])
def test_gated_lookalike_keeps_full_recompute(variant: str) -> None:
    """Modules that only look like a gated MLP fail the one-token check: full recomputation, exact result
    (dropout: the same mask in the tiled forward, its recomputation and the untiled reference)."""
    torch.manual_seed(12)
    mlp = GatedMLP(scale=2.0) if variant == "other-forward" else GatedMLP(dropout=0.3)
    x = torch.randn(2, 10, HIDDEN, requires_grad=True)
    upstream = torch.randn(2, 10, HIDDEN)
    calls = []
    mlp.down_proj.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    torch.manual_seed(5)
    with tile_mlps(mlp, 3):
        out = mlp(x)
        n_forward = len(calls)
        out.backward(upstream)
    assert len(calls) - n_forward == 3  # every tile recomputed whole
    tiled_x, tiled_p = x.grad.clone(), _param_grads(mlp)
    x.grad = None
    mlp.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    if variant == "dropout":
        # The untiled model draws one mask for the whole sequence, the tiles one per tile, so the
        # reference is the generic tiled computation without the structure check: equal bit for bit
        # only if the check left the random stream untouched.
        ref = sequence_tiled_compute(mlp, 10, 3, {"x": x}, {}, "x", output_reduction=None)
        ref.backward(upstream)
        assert torch.equal(out, ref)
        assert torch.equal(tiled_x, x.grad)
        assert all(torch.equal(tiled_p[n], p.grad) for n, p in mlp.named_parameters())
        return
    ref = mlp(x)
    ref.backward(upstream)
    _assert_matches_untiled(out, ref, tiled_x, x, tiled_p, mlp)


# --------------------------------------------------------------------------------------------------
# tiled LM loss
# --------------------------------------------------------------------------------------------------
def _loss_case(batch: int, seq: int, hidden: int = 16, vocab: int = 37, ignore_frac: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g).requires_grad_()
    head = nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.3)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < ignore_frac] = -100
    return h, head, labels


@pytest.mark.parametrize("batch,seq,shards", [(1, 13, 4), (2, 10, 3), (2, 3, 8)])
@pytest.mark.parametrize("softcap", [False, True])
def test_tiled_loss_parity(batch: int, seq: int, shards: int, softcap: bool) -> None:
    h, head, labels = _loss_case(batch, seq)
    logits_fn = (lambda z: 5.0 * torch.tanh(z / 5.0)) if softcap else None
    counts = _count_accumulations([head.weight])
    loss_sum, n_valid = tiled_causal_lm_loss_sum(h, head, labels, shards, logits_fn=logits_fn)
    assert n_valid.dtype == torch.long and not n_valid.requires_grad
    assert n_valid.item() == int((labels != -100).sum())
    assert loss_sum.dtype == torch.float32
    (loss_sum / n_valid).backward()
    assert counts == [1]
    tiled_h, tiled_w = h.grad.clone(), head.weight.grad.clone()

    h.grad = head.weight.grad = None
    logits = head(h)
    if logits_fn is not None:
        logits = logits_fn(logits)
    ref = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    (ref / n_valid).backward()
    assert_close_rel(loss_sum, ref, name="loss")
    _assert_grads(tiled_h, h.grad, "hidden_states")
    _assert_grads(tiled_w, head.weight.grad, "lm_head.weight")


@pytest.mark.parametrize("case", ["bias", "frozen-hidden", "frozen-head", "no-grad"])
def test_tiled_loss_grads_taken_in_forward(case: str) -> None:
    """Each tile's logits are computed once (gradients are taken in forward, backward only scales them by
    the upstream gradient); a head bias, inputs without grad and no-grad evaluation stay exact."""
    h, _, labels = _loss_case(2, 11)
    torch.manual_seed(3)
    head = nn.Linear(16, 37, bias=case == "bias")
    if case == "frozen-hidden":
        h.requires_grad_(False)
    if case == "frozen-head":
        head.requires_grad_(False)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    if case == "no-grad":
        with torch.no_grad():
            loss_sum, n_valid = tiled_causal_lm_loss_sum(h, head, labels, 3)
        assert not loss_sum.requires_grad
    else:
        loss_sum, n_valid = tiled_causal_lm_loss_sum(h, head, labels, 3)
        (loss_sum * 0.37).backward()
    assert len(calls) == 3
    got = {"h": h.grad, **{n: p.grad for n, p in head.named_parameters()}}
    h.grad = None
    head.zero_grad(set_to_none=True)
    ref = F.cross_entropy(head(h).flatten(0, 1), labels.flatten(), reduction="sum")
    assert_close_rel(loss_sum, ref, name="loss")
    if case == "no-grad":
        return
    (ref * 0.37).backward()
    want = {"h": h.grad, **{n: p.grad for n, p in head.named_parameters()}}
    for name, g in want.items():
        if g is None:
            assert got[name] is None, name
        else:
            _assert_grads(got[name], g, name)


def test_tiled_loss_hands_its_gradients_over_once() -> None:
    """Backward scales the gradients taken in forward in place and gives autograd those buffers (the
    parameter's .grad is the stored buffer itself: no second LM-head- or hidden-sized copy at the peak);
    a second backward through the same loss is refused, not silently given already-scaled gradients."""
    h, head, labels = _loss_case(2, 11)
    loss_sum, n_valid = tiled_causal_lm_loss_sum(h, head, labels, 3)
    node = loss_sum.grad_fn  # the autograd Function's ctx
    ptrs = (node.grads[0].data_ptr(), node.grads[1][0].data_ptr())  # no reference kept: autograd may take them
    loss = loss_sum * 0.37
    loss.backward(retain_graph=True)
    assert (h.grad.data_ptr(), head.weight.grad.data_ptr()) == ptrs
    assert node.grads is None
    with pytest.raises(RuntimeError, match="second backward through the same loss"):
        loss.backward()
    got_h, got_w = h.grad, head.weight.grad
    h.grad = head.weight.grad = None
    ref = F.cross_entropy(head(h).flatten(0, 1), labels.flatten(), reduction="sum") * 0.37
    ref.backward()
    _assert_grads(got_w, head.weight.grad, "lm_head.weight")
    _assert_grads(got_h, h.grad, "hidden_states")


def test_tiled_loss_float16_recomputes_in_backward() -> None:
    """float16 gradients must see the loss scale (the upstream gradient) while they are formed: the tiled
    loss then recomputes each tile in backward rather than differentiating it unscaled in forward."""
    h, head, labels = _loss_case(1, 9)
    h16 = h.detach().half().requires_grad_()
    head16 = nn.Linear(16, 37, bias=False).half()
    with torch.no_grad():
        head16.weight.copy_(head.weight.half())
    calls = []
    head16.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    scale = 1024.0
    loss_sum, _ = tiled_causal_lm_loss_sum(h16, head16, labels, 3)
    assert calls == [False] * 3  # forward tiles without grad
    (loss_sum * scale).backward()
    assert calls[3:] == [True] * 3  # recomputed with grad, under the upstream gradient
    ref = F.cross_entropy(head16(h16).float().flatten(0, 1), labels.flatten(), reduction="sum")
    assert loss_sum.item() == pytest.approx(ref.item(), rel=1e-3)
    g_h, g_w = h16.grad.clone(), head16.weight.grad.clone()
    h16.grad = head16.weight.grad = None
    (ref * scale).backward()
    assert_close_rel(g_h.float(), h16.grad.float(), rtol=1e-2, name="hidden_states")
    assert_close_rel(g_w.float(), head16.weight.grad.float(), rtol=1e-2, name="lm_head.weight")


def test_tiled_loss_all_ignored() -> None:
    h, head, labels = _loss_case(2, 7, ignore_frac=1.1)
    assert (labels == -100).all()
    loss_sum, n_valid = tiled_causal_lm_loss_sum(h, head, labels, 3)
    assert loss_sum.item() == 0.0 and n_valid.item() == 0
    loss_sum.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))


def test_tiled_loss_one_tile_all_ignored() -> None:
    h, head, labels = _loss_case(1, 9)
    labels[:, :3] = -100  # the whole first tile
    loss_sum, _ = tiled_causal_lm_loss_sum(h, head, labels, 3)
    ref = F.cross_entropy(head(h).flatten(0, 1), labels.flatten(), reduction="sum")
    assert math.isfinite(loss_sum.item())
    assert_close_rel(loss_sum, ref, name="loss")
