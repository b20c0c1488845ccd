"""The MoE load-balancing loss over the whole sequence under SP.

transformers' MoE causal LMs add ``coef * load_balancing_loss_func(router_logits, ...)`` to the LM
loss. Its router statistics (the fraction of tokens sent to each expert and the mean router
probability) are means over **all** tokens of the batch; on one SP rank they would cover the local
chunk only, so the auxiliary loss and the router-gate gradients would differ per rank (README,
"Supported models"). Here the router logits of every layer are gathered along the sequence with
:func:`~lightning_ulysses.parallel.comm.gather_sequence_grad` (small: ``[b, s, experts]``), and the model
file's own function is called on them exactly as the model's ``forward`` calls it. The gather's
backward sums over the SP group, the same gradient scale as the SP LM loss.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Callable

from torch import Tensor, nn

from ..parallel.comm import gather_sequence_grad
from .context import ForwardContext
from .source import source_of

_CALL = re.compile(r"load_balancing_loss_func\(")


class AuxLossPlan:
    """How to recompute one model's load-balancing loss on the gathered router logits.

    Attributes:
        fn: the model file's ``load_balancing_loss_func``.
        args: the call's arguments as written in the model's ``forward`` (resolved per call).
        coef_attr: the model attribute holding the coefficient (``router_aux_loss_coef``).
    """

    def __init__(self, fn: Callable[..., Tensor], args: list[tuple[str | None, ast.expr]], coef_attr: str) -> None:
        self.fn = fn
        self.args = args
        self.coef_attr = coef_attr

    @classmethod
    def from_model(cls, model: nn.Module, fn: Callable[..., Tensor]) -> "AuxLossPlan | None":
        """Parse the model's own call of ``fn``; ``None`` when an argument is not one we can supply."""
        src = source_of(type(model).forward)
        match = _CALL.search(src)
        if match is None or not hasattr(model, "router_aux_loss_coef"):
            return None
        start = match.start()
        depth, end = 0, None
        for i in range(match.end() - 1, len(src)):
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            if depth == 0:
                end = i + 1
                break
        try:
            call = ast.parse(src[start:end].strip(), mode="eval").body
        except SyntaxError:
            return None
        args: list[tuple[str | None, ast.expr]] = [(None, a) for a in call.args]
        args += [(k.arg, k.value) for k in call.keywords]
        plan = cls(fn, args, "router_aux_loss_coef")
        try:
            for _, node in args:
                plan._resolve(node, model, None, None)
        except _Unresolvable:
            return None
        return plan

    def _resolve(self, node: ast.expr, model: nn.Module, router: Any, mask: Tensor | None) -> Any:
        text = ast.unparse(node)
        if "router_logits" in text:
            return router
        if text == "attention_mask":
            return mask
        if isinstance(node, ast.Constant):
            return node.value
        if text.startswith("self."):
            obj: Any = model
            for part in text.split(".")[1:]:
                if not part.isidentifier() or not hasattr(obj, part):
                    raise _Unresolvable(text)
                obj = getattr(obj, part)
            return obj
        raise _Unresolvable(text)

    def global_aux_loss(self, model: nn.Module, router_logits: tuple[Tensor, ...], ctx: ForwardContext,
                        batch: int) -> Tensor:
        """The load-balancing loss of the whole sequence, identical on every rank of ``ctx.group``.

        Args:
            router_logits: per MoE layer ``[batch * seq/sp, experts]`` for this rank's chunk.
            ctx: the forward's SP context (its gathered padding mask is the model's full mask).
            batch: the batch size.
        """
        gathered = []
        for layer in router_logits:
            if layer.dim() != 2 or layer.shape[0] != batch * ctx.local_len:
                raise ValueError(
                    f"router logits of shape {tuple(layer.shape)} are not [batch * seq/sp, experts]; the MoE "
                    "auxiliary loss cannot be made global under SP."
                )
            full = gather_sequence_grad(layer.reshape(batch, ctx.local_len, -1), ctx.group, dim=1)
            gathered.append(full.reshape(batch * ctx.local_len * ctx.sp_size, -1))
        valid = ctx.metadata.valid
        mask = None if valid is None else valid.long()
        args, kwargs = [], {}
        for name, node in self.args:
            value = self._resolve(node, model, tuple(gathered), mask)
            if name is None:
                args.append(value)
            else:
                kwargs[name] = value
        return self.fn(*args, **kwargs)


class _Unresolvable(Exception):
    pass


def wants_router_logits(model: nn.Module, call: dict[str, Any]) -> bool:
    """Whether this forward returns router logits (and so adds the auxiliary loss)."""
    flag = call.get("output_router_logits")
    if flag is None:
        flag = getattr(model.config, "output_router_logits", False)
    return bool(flag)


def zero_coefficient(model: nn.Module, attr: str) -> Callable[[], float]:
    """Make the model add ``0 * aux`` itself (its local value) for one forward; returns the undo,
    which gives back the coefficient."""
    had = attr in model.__dict__
    coef = getattr(model, attr)
    setattr(model, attr, 0.0)

    def undo() -> float:
        if had:
            setattr(model, attr, coef)
        else:
            delattr(model, attr)
        return coef

    return undo


def add_to_loss(out: Any, aux: Tensor, coef: float) -> None:
    """Put the global auxiliary loss into the model output and its ``coef`` share into the loss."""
    out["aux_loss"] = aux
    if getattr(out, "loss", None) is not None:
        out["loss"] = out.loss + coef * aux.to(out.loss.device)

