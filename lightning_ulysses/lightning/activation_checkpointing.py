"""Activation checkpointing of HF decoder layers, optionally with the checkpoints offloaded to CPU.

Non-reentrant ``torch.utils.checkpoint`` runs *inside* each decoder layer's ``forward`` (patched
per instance), so FSDP2's unshard/reshard hooks stay outside the checkpointed region — the layout
FSDP2 supports — and state-dict keys are unchanged (no wrapper module).

With ``offload=True`` the layer input, which is all a checkpointed layer keeps alive between its
forward and its recomputation (the ALST technique), is moved to host memory after the forward and
back to the device right before the recomputation. The move swaps the tensor's storage in place
(``tensor.data``) because the checkpoint's recompute closure holds that very tensor object; its
autograd metadata (device, shape) is unchanged, so gradients flow exactly as without offload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_MISSING = object()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: modules whose class is in the model's ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(
            f"{type(model).__name__} declares no `_no_split_modules`; cannot find its decoder layers to "
            "checkpoint or shard. Apply activation checkpointing / fully_shard yourself in configure_model."
        )
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"no module of {sorted(names)} found in {type(model).__name__}.")
    return layers


def _to_host(t: Tensor) -> Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    host.copy_(t, non_blocking=t.is_cuda)
    return host


@dataclass
class CheckpointHandle:
    """Undo for :func:`checkpoint_decoder_layers`."""

    layers: list[tuple[nn.Module, Any]] = field(default_factory=list)

    def remove(self) -> None:
        for layer, saved in self.layers:
            if saved is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = saved
        self.layers = []


def _checkpointed(forward: Callable, offload: bool) -> Callable:
    def run(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(hidden_states, *args, **kwargs)
        device = hidden_states.device

        def body(h: Tensor, *a: Any, **kw: Any) -> Any:
            if h.device != device:  # recomputation after offload: bring the input back first
                h.data = h.data.to(device, non_blocking=True)
            return forward(h, *a, **kw)

        out = checkpoint(body, hidden_states, *args, use_reentrant=False, **kwargs)
        if offload and hidden_states.requires_grad:
            hidden_states.data = _to_host(hidden_states.data)
        return out

    return run


def _hf_name(model: nn.Module, what: str) -> str:
    """transformers' name for its checkpointing switch: ``activation_checkpointing_*`` where the class has
    it (newer releases; ``gradient_checkpointing_*`` are deprecated aliases that warn with a FutureWarning
    on every call), else ``gradient_checkpointing_*`` (the minimum supported transformers)."""
    new = {"enable": "activation_checkpointing_enable", "disable": "activation_checkpointing_disable",
           "enabled": "is_activation_checkpointing"}[what]
    return new if hasattr(type(model), new) else new.replace("activation", "gradient")


def hf_checkpointing_enabled(model: nn.Module) -> bool:
    """Whether transformers' own activation (gradient) checkpointing is on, without a deprecated call."""
    # hasattr on the class: the property is read only through the name the release does not deprecate
    return bool(getattr(model, _hf_name(model, "enabled"), False))


def checkpoint_decoder_layers(model: nn.Module, offload: bool = False) -> CheckpointHandle:
    """Checkpoint every decoder layer of ``model`` (non-reentrant); ``remove()`` undoes it.

    Args:
        model: a transformers ``PreTrainedModel`` (its HF gradient checkpointing must be off).
        offload: keep each layer's input ``[batch, seq, hidden]`` in host memory between forward
            and backward.
    """
    if hf_checkpointing_enabled(model):
        raise ValueError(
            "the model already has HF activation checkpointing enabled; disable it "
            f"(model.{_hf_name(model, 'disable')}()) or do not ask the strategy for activation checkpointing."
        )
    handle = CheckpointHandle()
    for layer in decoder_layers(model):
        handle.layers.append((layer, layer.__dict__.get("forward", _MISSING)))
        layer.forward = _checkpointed(layer.forward, offload)
    return handle
