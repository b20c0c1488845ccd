"""Activation checkpointing of decoder layers, with and without CPU offload of the layer inputs."""

import pytest
import torch

from lightning_ulysses.lightning.activation_checkpointing import checkpoint_decoder_layers
from tests.distributed import assert_close_rel
from tests.models import tiny_model, tokens


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointed_layers_recompute_and_stay_exact(offload):
    ref, model = tiny_model("llama", 4, 2), tiny_model("llama", 4, 2)
    ids = tokens(2, 16)
    ref(input_ids=ids, labels=ids).loss.backward()
    calls = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
    handle = checkpoint_decoder_layers(model, offload=offload)
    out = model(input_ids=ids, labels=ids)
    assert len(calls) == 2
    out.loss.backward()
    assert len(calls) == 4, "backward did not recompute the checkpointed layers"
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert_close_rel(p.grad, q.grad, name=n)
    with torch.no_grad():  # no checkpointing (nor offload) without grad
        model(input_ids=ids)
    assert len(calls) == 6
    handle.remove()
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_refuses_double_checkpointing():
    model = tiny_model()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="already has HF (activation|gradient) checkpointing"):
        checkpoint_decoder_layers(model)
