"""All-to-all volume per layer under Ulysses SP, measured with the torch profiler, vs the minimum.

For ``sp`` in ``--sp`` and three head layouts of an 8-head Llama (MHA 8/8, GQA 8/2, MQA 8/1), one
forward + backward of the model with ``apply_ulysses`` runs under
``torch.profiler.profile(record_shapes=True)``. Every ``_c10d_functional::all_to_all_single`` op (and,
with ``--overlap-chunks``, every asynchronous ``c10d::alltoall_base_``) is classified as *forward*
(inside a ``ulysses/all_to_all`` range) or *backward* (run by the autograd engine, the inverse
exchange); its send buffer is ``[sp, b, s/sp, heads, d]``.

Counting convention (all per layer, per rank, one direction = what this rank sends):

* **buffer** = elements of the ``all_to_all_single`` send buffer. It *includes* the ``1/sp`` chunk
  that stays on this rank (the buffer holds one chunk per destination, itself included);
* **leaves rank** = ``(sp - 1) / sp`` of the buffer: the bytes that actually cross the network.

Minimum (buffer convention, elements; s = full sequence, d = head dim, Hq query heads, Hkv KV heads)::

    forward  = (s/sp)·d·(Hq + 2·Hkv_eff)    (Q, K, V: heads → ranks)
             + (s/sp)·Hq·d                  (attention output: back to sequence shards)
    backward = the same (the gradient of each exchange is the inverse exchange)
    Hkv_eff  = max(Hkv, sp)

``Hkv_eff`` is what the destinations need: with ``Hkv >= sp`` every rank receives ``Hkv/sp`` distinct KV
heads; with ``sp > Hkv`` (GQA/MQA) each rank still needs one whole KV head, and ``sp/Hkv`` ranks need
the same one, so each source must send it ``sp/Hkv`` times (all-to-all has no multicast). For MHA
this is ``4·(s/sp)·H·d`` (docs/communication.md). ``measured / minimum = 1.00`` means no exchange carries anything
the destination does not need (no padding, no duplicated traffic, no extra exchanges).

Hybrid models (``--hybrid``, on by default): a Qwen3-Next-shaped model (gated delta-net), a
Bamba-shaped one (Mamba2) and a Jamba-shaped one (Mamba1), each with one mixer layer and one
attention layer; forward exchanges inside a ``ulysses/mixer`` range are the mixer's, the others the
attention's. Their minimum (buffer convention, per layer and direction)::

    gated delta-net = (s/sp)·(2·Hk_eff·dk + Hv·dv + 2·Hv)   (q, k, v, beta and decay inputs: heads → ranks)
                    + (s/sp)·Hv·dv                          (output: back to sequence shards)
    Mamba2          = (s/sp)·(H·P + 2·G_eff·N + H)          (x, B, C, dt: heads → ranks)
                    + (s/sp)·H·P                            (scan output: back)
    Mamba1          = (s/sp)·I                              (x: channels → ranks, for the convolution)
                    + (s/sp)·I                              (conv output back: x_proj reads every channel)
                    + (s/sp)·(I + 2·sp·N)                   (dt; B, C to every rank)
                    + (s/sp)·I                              (scan output back)
    Hk_eff = max(Hk, sp), G_eff = max(G, sp)                (key heads / B-C groups replicated as for GQA)

The gate (``z``) never travels: the gated norm is per token and runs after the exchange back.

The second table times, on random tensors in the same run, the fused exchange
``heads_from_sequence([q, k, v])`` (one all-to-all, what the library does) against three separate
``heads_from_sequence([q])``, ``([k])``, ``([v])`` calls, forward only, median over ``--repeats``,
slowest rank; the tensors are laid out as HF's projections give them (``[b, s/sp, H, d]`` memory
viewed as ``[b, H, s/sp, d]``), with K/V already replicated to ``Hkv_eff`` heads as the attention does.

    python benchmarks/bench_comm.py                 # sp 2 4, ~1 min on 2 cores
    python benchmarks/bench_comm.py --seq 4096 --exchange-seq 16384 --repeats 30
    python benchmarks/bench_comm.py --overlap-chunks 2   # volume of the overlapped path (2 head groups)
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import _common
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from lightning_ulysses import apply_ulysses
from lightning_ulysses.parallel.comm import LAUNCH_LABEL, PROFILE_LABEL, heads_from_sequence
from lightning_ulysses.lightning.data import shard_batch
from lightning_ulysses.models.mixers.common import MIXER_LABEL

LAYOUTS = {"MHA": 8, "GQA": 2, "MQA": 1}  # KV heads of an 8-head model
# the functional op of the default path, the c10d op of the overlapped (asynchronous) path
A2A_OPS = {"_c10d_functional::all_to_all_single": 0, "c10d::alltoall_base_": 1}  # -> index of the send buffer
ENGINE = "autograd::engine::evaluate_function"
COLLECTIVE_PREFIX = "c10d::"


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


def _profile_step(model, batch) -> dict:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(**batch).loss.backward()
    sends = {"forward": [], "backward": []}
    other = Counter()
    for event in prof.events():
        if event.name in A2A_OPS:
            names = list(_ancestors(event))
            if any(n in A2A_OPS for n in names):
                continue  # the functional op runs the c10d one inside: count each exchange once
            send = list(event.input_shapes[A2A_OPS[event.name]])
            if any(n.startswith(ENGINE) for n in names):
                sends["backward"].append(send)
            elif PROFILE_LABEL in names or LAUNCH_LABEL in names:
                sends["forward"].append(send)
            else:
                sends.setdefault("unclassified", []).append(send)
        elif event.name.startswith(COLLECTIVE_PREFIX) and "alltoall" not in event.name:
            other[event.name[len(COLLECTIVE_PREFIX):].rstrip("_")] += 1
    return {"sends": sends, "other": dict(other)}


def _time_exchange(sp: int, rank: int, seq: int, heads: int, kv_eff: int, d: int, repeats: int) -> dict:
    s_local = seq // sp
    torch.manual_seed(rank)
    mk = lambda h: torch.randn(1, s_local, h, d).transpose(1, 2)  # noqa: E731  HF projection layout
    q, k, v = mk(heads), mk(kv_eff), mk(kv_eff)
    group = dist.group.WORLD
    times = {"fused": [], "separate": []}
    with torch.no_grad():
        for i in range(repeats + 2):
            for name in times:
                dist.barrier()
                t0 = time.perf_counter()
                if name == "fused":
                    heads_from_sequence([q, k, v], group)
                else:
                    heads_from_sequence([q], group)
                    heads_from_sequence([k], group)
                    heads_from_sequence([v], group)
                if i >= 2:  # two warm-up rounds
                    times[name].append(time.perf_counter() - t0)
    return {name: _common.median(_common.max_over_ranks(t)) for name, t in times.items()}


def _hybrid(kind: str, d: int, vocab: int):
    """One mixer layer + one attention layer (8 attention heads, 2 KV heads, head_dim ``d``), float32.

    ``gdn``: Qwen3-Next gated delta-net, 8 value heads reading 4 key heads, dk = dv = d.
    ``mamba2``: Bamba Mamba2, 8 heads of P = 2d (expand 2), 1 B/C group of state N = d (as Bamba-9B).
    ``mamba1``: Jamba Mamba1, I = 16d channels (expand 2), state N = d, dt rank d.
    """
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=8 * d, intermediate_size=16 * d, num_attention_heads=8,
                  num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=1 << 20,
                  attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(0)
    if kind == "gdn":
        return T.Qwen3NextForCausalLM(T.Qwen3NextConfig(
            **common, head_dim=d, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=8,
            linear_num_key_heads=4, linear_key_head_dim=d, linear_value_head_dim=d, num_experts=0)).float()
    if kind == "mamba1":
        return T.JambaForCausalLM(T.JambaConfig(
            **common, attn_layer_offset=1, attn_layer_period=2, num_experts=1, mamba_d_state=d, mamba_expand=2,
            mamba_dt_rank=d)).float()
    return T.BambaForCausalLM(T.BambaConfig(
        **common, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=2 * d, mamba_n_groups=1, mamba_d_state=d,
        mamba_expand=2, mamba_chunk_size=64)).float()


def _hybrid_minimum(kind: str, sp: int, s: int, d: int) -> int:
    """Mixer elements per rank per direction (buffer convention), see the module docstring."""
    if kind == "gdn":  # Hv = 8, Hk = 4, dk = dv = d
        return (s // sp) * (2 * max(4, sp) * d + 8 * d + 2 * 8) + (s // sp) * 8 * d
    if kind == "mamba1":  # I = 16d, N = d
        return (s // sp) * (4 * 16 * d + 2 * sp * d)
    return (s // sp) * (8 * 2 * d + 2 * max(1, sp) * d + 8) + (s // sp) * 8 * 2 * d  # H = 8, P = 2d, G = 1, N = d


def _profile_hybrid(rank: int, world: int, args: dict) -> dict:
    out = {}
    for kind in ("gdn", "mamba2", "mamba1"):
        model = _hybrid(kind, args["head_dim"], args["vocab"])
        handle = apply_ulysses(model, dist.group.WORLD)
        batch = shard_batch(_common.full_batch(args["seq"], args["vocab"]), rank, world)
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(**batch).loss.backward()
        handle.remove()
        sends = {"mixer": [], "attention": [], "backward": []}
        for event in prof.events():
            if event.name not in A2A_OPS:
                continue
            names = list(_ancestors(event))
            if any(n in A2A_OPS for n in names):
                continue
            numel = torch.Size(event.input_shapes[A2A_OPS[event.name]]).numel()
            if any(n.startswith(ENGINE) for n in names):
                sends["backward"].append(numel)
            else:
                sends["mixer" if MIXER_LABEL in names else "attention"].append(numel)
        out[kind] = sends
    return out


def _worker(rank: int, world: int, args: dict) -> dict:
    out = {}
    for name, kv in LAYOUTS.items():
        model = _common.llama(hidden=8 * args["head_dim"], layers=args["layers"], heads=8, kv_heads=kv,
                              vocab=args["vocab"], intermediate=2 * 8 * args["head_dim"])
        model.train()
        handle = apply_ulysses(model, dist.group.WORLD, overlap_chunks=args["overlap_chunks"])
        batch = shard_batch(_common.full_batch(args["seq"], args["vocab"]), rank, world)
        model(**batch).loss.backward()  # warm-up outside the profiler
        model.zero_grad(set_to_none=True)
        prof = _profile_step(model, batch)
        handle.remove()
        kv_eff = max(kv, world)
        timing = _time_exchange(world, rank, args["exchange_seq"], 8, kv_eff, args["head_dim"], args["repeats"])
        out[name] = {"kv": kv, **prof, "timing": timing}
    if args["hybrid"]:
        out["hybrid"] = _profile_hybrid(rank, world, args)
    return out


def _hybrid_rows(results: dict, sps: list[int], s: int, d: int, hq: int, esize: int) -> list[list]:
    rows = []
    for sp in sps:
        for kind, label in (("gdn", "Qwen3-Next-shaped"), ("mamba2", "Bamba-shaped"), ("mamba1", "Jamba-shaped")):
            sends = results[sp][0]["hybrid"][kind]
            same = all(pr["hybrid"][kind] == sends for pr in results[sp])
            attn_min = (s // sp) * d * (hq + 2 * max(2, sp)) + (s // sp) * hq * d
            mixer = {"gdn": "gated delta-net", "mamba2": "Mamba2", "mamba1": "Mamba1"}[kind]
            for layer, minimum in ((f"{mixer} mixer",
                                    _hybrid_minimum(kind, sp, s, d)), ("attention 8/2", attn_min)):
                got = sends["mixer" if "mixer" in layer else "attention"]
                rows.append([label, layer, sp, len(got), f"{sum(got) * esize / 1024:.0f}",
                             f"{minimum * esize / 1024:.0f}",
                             f"{sum(got) / minimum:.2f}" + ("" if same else " (ranks differ!)")])
            fwd = sum(sends["mixer"]) + sum(sends["attention"])
            if sum(sends["backward"]) != fwd:
                rows.append([label, "backward total != forward total!", sp, len(sends["backward"]),
                             f"{sum(sends['backward']) * esize / 1024:.0f}", f"{fwd * esize / 1024:.0f}", ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq", type=int, default=2048, help="sequence length of the profiled model step")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32, help="hidden = 8 * head_dim")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--exchange-seq", type=int, default=8192, help="sequence length of the fused/separate timing")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--overlap-chunks", type=int, default=1,
                        help="profile apply_ulysses(overlap_chunks=N): N head groups, 2N exchanges per layer and direction")
    parser.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=True,
                        help="also count the exchanges of gated delta-net and Mamba2 mixer layers (hybrid models)")
    args = parser.parse_args()
    t_start = time.perf_counter()

    d, s, hq, esize = args.head_dim, args.seq, 8, 4  # float32
    print(f"# bench_comm: {_common.machine()}")
    print(f"model: Llama 8 heads x head_dim {d} (hidden {8 * d}), {args.layers} layers, float32, sdpa; "
          f"one forward+backward at seq {s}, batch 1; 1 torch thread per process; overlap_chunks {args.overlap_chunks}")
    results = {sp: _common.launch(_worker, sp, vars(args), threads=1) for sp in args.sp}

    rows, other_rows, timing_rows = [], [], []
    for sp in args.sp:
        per_rank = results[sp]
        for name, kv in LAYOUTS.items():
            r0 = per_rank[0][name]
            kv_eff = max(kv, sp)
            per_dir_min = (s // sp) * d * (hq + 2 * kv_eff) + (s // sp) * hq * d
            for direction in ("forward", "backward"):
                # every rank sends the same shapes; check it instead of assuming it
                shapes = [pr[name]["sends"][direction] for pr in per_rank]
                same = all(sh == shapes[0] for sh in shapes)
                numel = sum(torch.Size(sh).numel() for sh in shapes[0])
                per_layer = numel / args.layers
                n_ex = len(shapes[0]) / args.layers
                rows.append([
                    f"{name} {hq}/{kv}", sp, kv_eff, direction, f"{n_ex:g}", f"{per_layer * esize / 1024:.0f}",
                    f"{per_dir_min * esize / 1024:.0f}", f"{per_layer / per_dir_min:.2f}",
                    f"{per_layer * esize * (sp - 1) / sp / 1024:.0f}",
                    f"{per_layer / (4 * (s // sp) * hq * d):.2f}" + ("" if same else " (ranks differ!)"),
                ])
            unclassified = r0["sends"].get("unclassified", [])
            other_rows.append([f"{name} {hq}/{kv}", sp, ", ".join(f"{n} x{c}" for c, n in sorted(
                ((c, n) for n, c in r0["other"].items()), reverse=True)) or "none", len(unclassified)])
            t = r0["timing"]
            timing_rows.append([f"{name} {hq}/{kv}", sp, kv_eff, f"{t['fused'] * 1e3:.2f}", f"{t['separate'] * 1e3:.2f}",
                                f"{t['separate'] / t['fused']:.2f}"])

    print()
    print(f"All-to-all send volume per layer per rank (float32, seq {s}, head_dim {d}); minimum = "
          "(s/sp)·d·(Hq + 2·Hkv_eff) + (s/sp)·Hq·d elements per direction, Hkv_eff = max(Hkv, sp); "
          "'buffer' counts the all_to_all_single send buffer incl. the 1/sp chunk that stays local, "
          "'leaves rank' = (sp-1)/sp of it.")
    print()
    print(_common.table(["heads q/kv", "sp", "Hkv_eff", "direction", "exchanges/layer", "buffer KiB",
                         "minimum KiB", "measured / minimum", "leaves rank KiB", "buffer / MHA formula 4(s/sp)Hd"],
                        rows))
    if args.hybrid:
        print()
        print(f"Hybrid models, one mixer layer + one attention layer (8/2 heads), send volume per layer per rank "
              f"(float32, seq {s}, buffer convention; forward, the backward mirrors it): gated delta-net Hv 8 / Hk 4, "
              f"dk = dv = {d}; Mamba2 H 8 x P {2 * d}, G 1, N {d}; Mamba1 I {16 * d}, N {d}. Minimum: see the module "
              "docstring (Mamba1: of its four-exchange scheme).")
        print()
        print(_common.table(["model", "layer", "sp", "exchanges", "buffer KiB", "minimum KiB", "measured / minimum"],
                            _hybrid_rows(results, args.sp, s, d, hq, esize)))
    print()
    print("Other collectives per training step (rank 0, not per layer), and all-to-alls that were neither "
          "in a forward ulysses/all_to_all range nor in autograd backward:")
    print()
    print(_common.table(["heads q/kv", "sp", "other collectives / step", "unclassified all-to-alls"], other_rows))
    print()
    print(f"Fused Q/K/V exchange (1 all-to-all) vs 3 separate exchanges, forward only, seq {args.exchange_seq}, "
          f"median of {args.repeats}, slowest rank:")
    print()
    print(_common.table(["heads q/kv", "sp", "Hkv_eff", "fused ms", "separate ms", "separate / fused"], timing_rows))
    print()
    print("On CPU/gloo an all-to-all is a local memcpy-like transfer; on GPUs/NCCL the per-call latency that "
          "fusing saves is larger relative to small messages.")
    print(f"total runtime {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
