"""Checks that can be made before the first forward, so a misconfiguration fails early, naming the fix.

* :func:`check_sp_fits` / :func:`choose_model_split` — ``sp`` against the model's heads (attention and
  SP mixers) *and* the world size, and the ``ring × ulysses`` split that serves it: the strategies run
  it in the launching process when the model already exists, so the error comes once, before any
  worker starts;
* :func:`check_backend_available` — flash attention needs its package and a CUDA device (otherwise
  transformers' import error would surface inside the first attention call);
* :func:`check_backend_trains` — flex attention has no backward on some devices (CPU in torch 2.13);
  without this the run fails at the first ``backward``, after a whole forward.
"""

from __future__ import annotations

import importlib.util
import warnings
from functools import lru_cache

import torch
from torch import nn

from ..parallel.attention import HeadLayout
from ..parallel.mesh import choose_split
from .mixers import mixers_valid_sp

FLASH_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"),
                  "flash_attention_3": ("flash_attn_interface", "flash-attn-3 (built from flash-attention's hopper/)")}
FLEX = "flex_attention"


def model_sp_choices(model: nn.Module) -> list[int] | None:
    """Every ``sp`` the model's attention heads and SP mixers allow together; ``None`` when its config
    does not say its heads (then :func:`~.analysis.analyse_model` decides on every rank)."""
    config = getattr(model, "config", None)
    num_heads = getattr(config, "num_attention_heads", None)
    if not isinstance(num_heads, int):
        return None
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    valid = HeadLayout.valid_sp(num_heads, num_kv)
    mixers = mixers_valid_sp(model)
    return valid if mixers is None else sorted(set(valid) & set(mixers))


def check_sp_fits(model: nn.Module, sp: int, world: int) -> None:
    """Raise a ``ValueError`` when ``sp`` cannot shard ``model``, listing the ``sp`` that can and that
    also divide ``world`` (the only ones the mesh accepts)."""
    valid = model_sp_choices(model)
    if valid is None or sp in valid:
        return
    config = model.config
    heads = f"num_attention_heads={config.num_attention_heads}"
    kv = getattr(config, "num_key_value_heads", None)
    if kv is not None:
        heads += f", num_key_value_heads={kv}"
    fits = [d for d in valid if world % d == 0]
    if fits == [1] and valid != [1]:
        advice = (f"No sp > 1 divides both; valid sp for the model are {valid}: use a number of processes "
                  f"(devices x num_nodes) that one of them divides.")
    else:
        advice = f"Choose sp from {fits} (these shard the model and divide the world size {world})."
    raise ValueError(
        f"sp={sp} cannot shard {type(model).__name__} ({heads}): Ulysses gives every SP rank an equal share of "
        f"the attention heads (and of every SP token mixer's heads), and each rank's query heads must share whole "
        f"KV heads; a model with SP token mixers runs no ring (which would lift the limit). {advice}"
    )


def choose_model_split(models: list[nn.Module], sp: int, world: int, ring: int | None = None,
                       procs_per_node: int | None = None) -> tuple[int, int]:
    """``(ulysses, ring)`` for ``sp`` that every model in ``models`` allows
    (:func:`~lightning_ulysses.parallel.mesh.choose_split`): the Ulysses degree must suit every
    model's heads; models with SP token mixers run no ring. Models whose config does not say their
    heads leave the choice to ``ring`` (``None``: pure Ulysses; the handle's analysis then decides).

    Raises:
        ValueError: no split serves, naming the model, its heads and the valid splits (or the ``sp``
            that divide ``world``, when even those fail).
    """
    choices: set[int] | None = None
    ring_allowed = True
    for model in models:
        valid = model_sp_choices(model)
        if valid is None:
            continue
        choices = set(valid) if choices is None else choices & set(valid)
        if mixers_valid_sp(model) is not None:
            ring_allowed = False
    if choices is None:
        return (sp, 1) if ring is None else (sp // ring if sp % ring == 0 else sp, ring)
    try:
        return choose_split(sp, sorted(choices), ring, procs_per_node, ring_allowed)
    except ValueError:
        if not ring_allowed:
            check_sp_fits(models[0], sp, world)  # the heads-vs-sp error, listing the sp that fit the world
        raise


def check_backend_available(backend: str) -> None:
    """Flash attention needs its package and a CUDA device; say so before the first forward."""
    if backend not in FLASH_PACKAGES:
        return
    module, package = FLASH_PACKAGES[backend]
    if importlib.util.find_spec(module) is None:
        raise ValueError(
            f"attn_implementation={backend!r} needs the {package} package, which is not installed. Install it "
            "(pip install 'lightning-ulysses[flash]' for flash_attention_2, on a CUDA machine), or load the model "
            "with attn_implementation='sdpa' (or 'flex_attention')."
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"attn_implementation={backend!r} runs on CUDA devices only, and none is available here. Load the "
            "model with attn_implementation='sdpa' (or 'eager') to run on CPU."
        )


@lru_cache(maxsize=None)
def flex_backward_error(device_type: str) -> str | None:
    """Why flex attention cannot train on ``device_type`` (torch's own message), or ``None`` when it can.

    Probed once per device type with a tiny uncompiled call, so a torch that gains a CPU backward is
    not refused by an outdated rule.
    """
    try:
        from torch.nn.attention.flex_attention import flex_attention

        q = torch.randn(1, 1, 16, 8, device=device_type, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
            flex_attention(q, q, q).sum().backward()
    except Exception as exc:  # noqa: BLE001 - whatever stops it is the reason
        return f"{type(exc).__name__}: {exc}"
    return None


def check_backend_trains(backend: str, device_type: str) -> None:
    """Refuse training with flex attention on a device where it has no backward."""
    if backend != FLEX:
        return
    why = flex_backward_error(device_type)
    if why is not None:
        raise ValueError(
            f"attn_implementation='flex_attention' cannot train on {device_type} with torch {torch.__version__} "
            f"({why}). Train with attn_implementation='sdpa' (or 'eager') there, or on a CUDA device."
        )
