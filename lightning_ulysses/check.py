"""``python -m lightning_ulysses.check``: is my model supported under Ulysses SP?

Takes a model's ``config.json``, a local model directory (its ``config.json``; no weights are read)
or a transformers model type (``llama``: its default config, made tiny); never the network.

* Without ``--run`` it runs the structural analysis ``apply_ulysses`` runs
  (:func:`~lightning_ulysses.models.analysis.analyse_model`) on the model built on the meta device
  and prints ``supported`` or ``refused: <reason>``.
* With ``--run`` it also builds a tiny random-weight version of the config
  (:func:`~lightning_ulysses.support.configs.build_tiny`: few layers, small hidden size, the same
  query/KV head ratio, RoPE, window and MoE settings), runs it under SP on ``--sp`` fork-started
  CPU processes (gloo) against the untouched model on the same batch, exactly as the support matrix
  does (:mod:`lightning_ulysses.support.parity`), and prints the verdict with the worst relative
  errors of logits, loss and gradients. A vision-language model gets a tiny vision tower too and
  an image batch across the chunk border besides the text batch (:mod:`lightning_ulysses.support.images`).

Exit status: 0 supported / exact, 1 refused, 2 anything else (an error, an untestable model, a
mismatch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2
# Keys of a checkpoint's config.json that would make a tiny random build load code or quantise.
_DROP = ("auto_map", "quantization_config", "_name_or_path")


class CheckError(RuntimeError):
    """The target cannot be checked (no such config, an unknown model type, no LM class)."""


@dataclass
class Target:
    """What to check: ``model_type``, the transformers class ``cls`` and its ``head`` (``"causal"``,
    ``"masked"`` or ``"image-text-to-text"``); ``config`` is the full-size config dict read from a
    file, or ``None`` for the model type's default config."""

    model_type: str
    cls: str
    head: str
    config: dict[str, Any] | None
    source: str


def _lm_classes() -> dict[str, dict[str, str]]:
    from transformers.models.auto import modeling_auto as auto

    return {"causal": dict(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
            "masked": dict(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
            "image-text-to-text": dict(auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)}


def resolve(spec: str) -> Target:
    """The :class:`Target` a command-line argument names: a ``config.json`` path, a directory
    holding one, or a model type of the installed transformers."""
    from transformers import CONFIG_MAPPING

    path = Path(spec)
    config: dict[str, Any] | None = None
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise CheckError(f"{spec} is a directory without a config.json")
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckError(f"{path} is not a readable JSON config: {e}") from e
        if not isinstance(config, dict) or "model_type" not in config:
            raise CheckError(f"{path} has no model_type")
        model_type = config["model_type"]
        config = {k: v for k, v in config.items() if k not in _DROP}
    elif os.sep in spec or spec.endswith(".json"):
        raise CheckError(f"no such file or directory: {spec}")
    else:
        model_type = spec
    if model_type not in CONFIG_MAPPING:
        raise CheckError(f"model type {model_type!r} is not in the installed transformers (this check loads no remote "
                         "code and uses no network)")
    classes = _lm_classes()
    named = [a for a in (config or {}).get("architectures") or [] if isinstance(a, str)]
    for head, mapping in classes.items():
        for arch in named:  # the checkpoint's own class, when it is an LM class this check runs
            if arch in mapping.values():
                return Target(model_type, arch, head, config, spec)
    for head, mapping in classes.items():
        if model_type in mapping:
            return Target(model_type, mapping[model_type], head, config, spec)
    raise CheckError(f"model type {model_type!r} has no causal LM, masked LM or image-text-to-text class in the "
                     "installed transformers")


def analyse(target: Target, sp: int) -> tuple[str | None, tuple[int, int]]:
    """``(refusal reason or None, (ulysses, ring))``: whether the analysis accepts the model at ``sp``,
    split as the strategies split it (``ring=None``: the largest Ulysses degree the heads allow, the
    rest of ``sp`` a ring). The model is built on the meta device at full size (a config file) or from
    the tiny default config (a model type), so its real head counts decide the split."""
    import torch
    import transformers
    from transformers import AutoConfig

    from .models.analysis import UnsupportedModelError, analyse_model
    from .models.apply import check_ring_plan
    from .models.preflight import choose_model_split
    from .support.configs import build_tiny

    if target.config is None:
        model = build_tiny(target.model_type, target.cls, dtype=torch.float32)
    else:
        config = type(AutoConfig.for_model(target.model_type)).from_dict(target.config)
        cls = getattr(transformers, target.cls)
        config._attn_implementation = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
        with torch.device("meta"):
            model = cls(config)
    split = (sp, 1)
    try:
        split = choose_model_split([model], sp, sp)
        plan = analyse_model(model, split[0])  # the heads are shared by the Ulysses ranks only
        if split[1] > 1:
            check_ring_plan(model, plan, overlap_chunks=1)
    except (UnsupportedModelError, ValueError) as e:
        return str(e), split
    return None, split


def _tiny_split(target: Target, sp: int) -> tuple[int, int]:
    """``(ulysses, ring)`` of the tiny random build ``--run`` compares, chosen as the strategies
    choose (:func:`~lightning_ulysses.models.preflight.choose_model_split`)."""
    import torch

    from .models.preflight import choose_model_split
    from .support.configs import build_tiny
    from .support.images import image_config_kwargs

    extra = image_config_kwargs(target.model_type, target.config) if target.head == "image-text-to-text" else {}
    tiny = build_tiny(target.model_type, target.cls, dtype=torch.float32, base=target.config, **extra)
    return choose_model_split([tiny], sp, sp)


def _split_text(split: tuple[int, int]) -> str:
    return f" as ulysses {split[0]} x ring {split[1]}" if split[1] > 1 else ""


def _parity_worker(rank: int, world: int, target: Target, ulysses: int) -> Any:
    import warnings

    import torch.distributed as dist

    from .parallel.mesh import build_mesh
    from .support.images import classify_composite
    from .support.parity import classify

    warnings.filterwarnings("ignore")  # deprecation noise of tiny configs; the verdict is what counts
    groups = None
    if ulysses < world:  # the split the analysis chose: its ring and Ulysses groups
        dims = build_mesh("cpu", world).split(ulysses)
        groups = {"ring_group": dims.ring_group, "ulysses_group": dims.ulysses_group}
    if target.head == "image-text-to-text":  # a text batch and an image batch across the chunk border
        return classify_composite(target.model_type, target.cls, dist.group.WORLD, base=target.config, groups=groups)
    return classify(target.model_type, target.head, target.cls, dist.group.WORLD, base=target.config, groups=groups)


def run_parity(target: Target, sp: int, timeout: float = 300.0, ulysses: int | None = None) -> Any:
    """The support matrix's verdict (:class:`~lightning_ulysses.support.parity.Verdict`) for a tiny
    random build of ``target`` at ``sp`` (``sp`` CPU processes, gloo), split as ``ulysses x
    (sp / ulysses)`` ring (default: pure Ulysses)."""
    import datetime

    from .support.runner import run_distributed

    return run_distributed(_parity_worker, sp, target, ulysses or sp, timeout=timeout,
                           pg_timeout=datetime.timedelta(seconds=60))[0]


def worst_errors(details: dict[str, float]) -> dict[str, float]:
    """The worst relative error per quantity (``logits``, ``loss``, ``grads``, ...) over the batches."""
    out: dict[str, float] = {}
    for key, value in details.items():
        what = key.rsplit("/", 1)[-1]
        out[what] = max(out.get(what, 0.0), value)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_ulysses.check",
        description="Is a model supported under Ulysses sequence parallelism? Analyses the model the way "
                    "apply_ulysses does and prints 'supported' or 'refused: <reason>'; with --run it also runs a "
                    "tiny random-weight version of the config under SP on CPU processes against the untouched model "
                    "and prints 'exact' with the worst relative errors (or what differs). No network, no weights "
                    "are read. Exit status: 0 supported/exact, 1 refused, 2 error or mismatch.")
    parser.add_argument("model", help="a config.json path, a local model directory, or a transformers model type "
                                      "(e.g. llama: its default config, made tiny)")
    parser.add_argument("--run", action="store_true",
                        help="also compare a tiny random build under SP with the untouched model (float64 where "
                             "possible, 1e-5 relative)")
    parser.add_argument("--sp", type=int, default=2, help="SP degree: the analysis's and --run's process count "
                                                          "(default 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.sp < 1:
        print("error: --sp must be at least 1", file=sys.stderr)
        return EXIT_ERROR
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        target = resolve(args.model)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        refusal, split = analyse(target, args.sp)
    except Exception as e:  # noqa: BLE001 - the config cannot even be built: say so, not a traceback
        print(f"error: {target.cls} could not be built from {args.model}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    name = f"{target.cls} ({target.model_type})"
    if refusal is not None:
        print(f"refused: {refusal}")
        return EXIT_REFUSED
    if not args.run:
        print(f"supported: {name} at sp={args.sp}{_split_text(split)} (structural analysis; --run compares a tiny "
              "random build)")
        return EXIT_OK
    try:
        # the tiny build keeps the head ratio, not the counts: it is split as the strategies would split it
        split = _tiny_split(target, args.sp)
    except ValueError as e:
        print(f"error: the tiny random build cannot run at sp={args.sp}: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        verdict = run_parity(target, args.sp, ulysses=split[0])
    except RuntimeError as e:
        print(f"error: the SP run failed: {e}", file=sys.stderr)
        return EXIT_ERROR
    errors = ", ".join(f"{k} {v:.1e}" for k, v in worst_errors(verdict.details).items())
    line = f"{verdict.verdict}: {name} at sp={args.sp}{_split_text(split)}, tiny random build in {verdict.dtype}"
    if verdict.reason:
        line += f" ({verdict.reason})" if verdict.verdict == "exact" else f": {verdict.reason}"
    print(line)
    if errors:
        print(f"max relative errors: {errors}")
    return {"exact": EXIT_OK, "refused": EXIT_REFUSED}.get(verdict.verdict, EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
