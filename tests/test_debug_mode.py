"""debug_skip_attention: only the last attention layer runs the backend, every projection still gets a
gradient (so DDP trains on), it warns loudly, and it is off by default everywhere."""

from __future__ import annotations

import inspect
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_ulysses import UlyssesFSDPStrategy, UlyssesStrategy, apply_ulysses, shard_batch
from lightning_ulysses.parallel.mesh import build_mesh
from tests.distributed import run_distributed
from tests.lightning_setup import LM, Samples, loader, trainer_kwargs
from tests.models import tiny_model, tokens


def _backend_calls(rank, world, debug, overlap_chunks):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls: list[int] = []

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return sdpa(module, *args, **kwargs)

    AttentionInterface.register("sdpa", counting)  # this forked worker's registry only
    dims = build_mesh("cpu", world)
    model = tiny_model("llama", heads=4, kv_heads=2, layers=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = apply_ulysses(model, dims.sp_group, overlap_chunks=overlap_chunks, debug_skip_attention=debug)
    ids = tokens(2, 16)
    out = model(**shard_batch({"input_ids": ids, "labels": ids}, dims.sp_rank, world))
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    handle.remove()
    loud = [str(w.message) for w in caught if "DEBUG MODE" in str(w.message)]
    return calls, no_grad, loud, out.logits.detach(), handle.debug_skip_attention


@pytest.mark.parametrize("overlap_chunks", [1, 2])
def test_only_the_last_attention_layer_attends(overlap_chunks):
    debug = run_distributed(_backend_calls, 2, True, overlap_chunks)
    normal = run_distributed(_backend_calls, 2, False, overlap_chunks)
    for (calls, no_grad, loud, logits, flag), (n_calls, n_no_grad, n_loud, n_logits, n_flag) in zip(debug, normal):
        assert calls == [2] * overlap_chunks  # layers 0 and 1 skipped; layer 2 in each head group
        assert sorted(n_calls) == sorted([0, 1, 2] * overlap_chunks)  # without it every layer attends
        assert no_grad == [] and n_no_grad == []  # every projection stays in the graph: DDP finds no unused one
        assert len(loud) == 1 and "WRONG" in loud[0] and "layer 2" in loud[0] and n_loud == []
        assert flag and not n_flag
        assert logits.shape == n_logits.shape and not torch.allclose(logits, n_logits)


def _fit(rank, world):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(strategy=UlyssesStrategy(sp=2, debug_skip_attention=True), max_steps=2,
                             **trainer_kwargs())
        trainer.fit(LM(), train_dataloaders=loader(Samples(8, 16)))
    return trainer.global_step, any("DEBUG MODE" in str(w.message) for w in caught)


def test_strategy_trains_in_debug_mode_and_warns():
    assert run_distributed(_fit, 4) == [(2, True)] * 4


def test_debug_mode_is_off_by_default():
    for fn in (apply_ulysses, UlyssesStrategy, UlyssesFSDPStrategy):
        assert inspect.signature(fn).parameters["debug_skip_attention"].default is False


def test_a_skipped_layer_keeps_what_attention_keeps_for_backward():
    """The stand-in holds the memory a linear-memory kernel holds between forward and backward (q, k,
    v, output, softmax statistics: here the same tensors as sdpa with GQA), so a limit measured with
    skipped layers is the limit with real ones; gradients keep their shapes."""
    import torch.nn.functional as F

    from lightning_ulysses.parallel.attention import _debug_skipped_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 64, 8, generator=g, requires_grad=True) for h in (4, 2, 2))

    def saved_by(fn):
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return sorted(saved, key=str), out

    skipped, out = saved_by(lambda: _debug_skipped_attention(q, k, v, 2))
    real, ref = saved_by(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    assert skipped == real
    assert out.shape == ref.transpose(1, 2).shape == (2, 64, 4, 8)
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))
    assert torch.equal(v.grad, torch.full_like(v, 2.0))  # each KV head serves two query heads
