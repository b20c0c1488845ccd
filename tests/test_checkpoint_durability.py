"""Nothing lost on a crash: checkpoint writes of the Ulysses strategies are atomic, carry a completion
marker, are checked before they load (a torn ``last`` falls back to the newest complete one), and load
without running code."""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lightning_ulysses import UlyssesFSDPStrategy, UlyssesStrategy
from lightning_ulysses.convert_checkpoint import consolidate_checkpoint, main as convert_main
from lightning_ulysses.lightning import checkpoint_io
from lightning_ulysses.lightning.checkpoint_io import (
    IncompleteCheckpointError,
    UnsafeCheckpointError,
    check_checkpoint,
    sidecar_path,
    staging_path,
)
from lightning_ulysses.lightning.strategies import UlyssesFabricStrategy, UlyssesFSDPFabricStrategy
from tests.distributed import run_distributed
from tests.lightning_setup import LM, Samples, loader, trainer_kwargs

PG_TIMEOUT = timedelta(seconds=20)  # a rank left waiting for a killed peer fails in time


def _strategy(kind):
    cls = UlyssesStrategy if kind == "ddp" else UlyssesFSDPStrategy
    return cls(sp=2, timeout=PG_TIMEOUT)


def _trainer(kind, ckpt_dir, steps=2):
    every_step = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, save_last=True)
    return pl.Trainer(strategy=_strategy(kind), max_steps=steps, callbacks=[every_step],
                      **trainer_kwargs(devices=2, enable_checkpointing=True))


def _state(lm, kind):
    if kind == "ddp":
        return {k: v.detach().clone() for k, v in lm.state_dict().items()}
    return get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _die():
    os._exit(17)  # a killed process: no exception handler, no cleanup


def _install_crash(kind, where, rank):
    """Kill this rank inside the given write of the next checkpoint save."""
    if kind == "ddp" and where == "shard" and rank == 0:  # the single file, half written
        from lightning.fabric.plugins.io import torch_io

        def torn_save(checkpoint, path):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
            _die()

        torch_io._atomic_save = torn_save
    elif kind == "fsdp" and where == "shard" and rank == 1:  # rank 1's DCP shard, half written
        from torch.distributed.checkpoint.filesystem import FileSystemWriter

        def torn_write(self, plan, planner):
            Path(self.path, "__1_0.distcp").write_bytes(b"half a shard")
            _die()

        FileSystemWriter.write_data = torn_write
    elif where == "marker" and rank == 0:  # every file written, the completion marker not
        checkpoint_io._write_json_durably = lambda path, data: _die()


def _crash_during_save(rank, world, kind, where, ckpt_dir):
    """Train 2 steps (a complete checkpoint per step and last.ckpt), change the weights, then die while
    rewriting last.ckpt in place."""
    lm = LM()
    trainer = _trainer(kind, ckpt_dir)
    trainer.fit(lm, train_dataloaders=loader(Samples(4, 16)))
    before = _state(lm, kind)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(1.0)
    after = _state(lm, kind)
    if rank == 0:
        torch.save({"before": before, "after": after}, f"{ckpt_dir}.states.pt")
    _install_crash(kind, where, rank)
    trainer.save_checkpoint(os.path.join(ckpt_dir, "last.ckpt"))
    return "survived"


def _resume_each(rank, world, kind, ckpt_dirs):
    """fit(ckpt_path="last") from each directory: the step, the weights and the warnings it gave."""
    out = []
    for ckpt_dir in ckpt_dirs:
        lm = LM()
        trainer = _trainer(kind, ckpt_dir)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer.fit(lm, train_dataloaders=loader(Samples(4, 16)), ckpt_path="last")
            except Exception as err:  # noqa: BLE001 - the refusal is the result
                out.append((type(err).__name__, str(err), None))
                continue
        out.append((trainer.global_step, _state(lm, kind), [str(w.message) for w in caught]))
    return out


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def crashed(request, tmp_path_factory):
    """Per strategy: one directory per crash (inside the file/shard write, inside the marker write),
    plus a copy of the first whose last.ckpt is then torn by hand."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    dirs = {}
    for where in ("shard", "marker"):
        dirs[where] = str(root / where)
        with pytest.raises(Exception):  # noqa: B017 - a killed rank fails the run one way or another
            run_distributed(_crash_during_save, 2, kind, where, dirs[where], init_pg=False, timeout=120)
    dirs["torn"] = str(root / "torn")
    shutil.copytree(dirs["shard"], dirs["torn"], ignore=shutil.ignore_patterns(".*ulysses-tmp"))
    shutil.copy(dirs["shard"] + ".states.pt", dirs["torn"] + ".states.pt")
    last = Path(dirs["torn"], "last.ckpt")
    if kind == "ddp":
        with open(last, "r+b") as f:  # truncated by a copy that did not finish
            f.truncate(last.stat().st_size // 2)
    else:  # a shard of a later save written beside the old .metadata
        (last / "__2_0.distcp").write_bytes(b"a newer shard")
    resumed = run_distributed(_resume_each, 2, kind, [dirs["shard"], dirs["marker"], dirs["torn"]], init_pg=False,
                              timeout=120)
    return kind, dirs, resumed[0]


def _states(ckpt_dir):
    return torch.load(f"{ckpt_dir}.states.pt", weights_only=True)


def _assert_same(state, expected):
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


def test_crash_inside_the_shard_write_keeps_the_previous_checkpoint(crashed):
    kind, dirs, resumed = crashed
    last = Path(dirs["shard"], "last.ckpt")
    assert staging_path(last).exists(), "the save did not die while writing"
    assert check_checkpoint(last)["global_step"] == 2  # untouched, still complete
    step, state, caught = resumed[0]
    assert step == 2
    _assert_same(state, _states(dirs["shard"])["before"])  # the exact weights of the complete checkpoint
    assert not any("completion marker" in m or "torn" in m for m in caught)


def test_crash_inside_the_marker_write_never_loads_silently(crashed):
    kind, dirs, resumed = crashed
    last = Path(dirs["marker"], "last.ckpt")
    step, state, caught = resumed[1]
    assert step == 2
    if kind == "fsdp":  # the sealed folder never replaced last.ckpt: the previous one is intact
        assert not (staging_path(last) / checkpoint_io.MARKER_NAME).exists() and staging_path(last).is_dir()
        _assert_same(state, _states(dirs["marker"])["before"])
    else:  # the complete new file was renamed in, its marker not yet written: it loads, with a warning
        assert not sidecar_path(last).exists()
        _assert_same(state, _states(dirs["marker"])["after"])
        assert any("no lightning-ulysses completion marker" in m and str(last) in m for m in caught), caught


def test_torn_last_falls_back_to_newest_complete_with_a_warning(crashed):
    kind, dirs, resumed = crashed
    step, state, caught = resumed[2]
    assert step == 2
    _assert_same(state, _states(dirs["torn"])["before"])
    newest = os.path.join(dirs["torn"], "epoch=0-step=2.ckpt")
    assert any("torn" in m and "Falling back" in m and newest in m for m in caught), caught


def test_torn_checkpoint_is_refused_naming_the_file(crashed, tmp_path):
    """Loaded by path (not "last"), a torn checkpoint is refused before any weight loads."""
    kind, dirs, _ = crashed
    torn = Path(dirs["torn"], "last.ckpt")
    strategies = ([UlyssesStrategy(sp=1), UlyssesFabricStrategy(sp=1)] if kind == "ddp"
                  else [UlyssesFSDPStrategy(sp=1), UlyssesFSDPFabricStrategy(sp=1)])
    named = "last.ckpt" if kind == "ddp" else "__2_0.distcp"
    for strategy in strategies:
        with pytest.raises(IncompleteCheckpointError, match=f"{torn}.*{named}" if kind == "fsdp" else str(torn)):
            strategy.load_checkpoint(torn)
    if kind == "fsdp":  # DCP's .metadata.tmp of an interrupted write beside the old .metadata
        folder = tmp_path / "tmp-metadata"
        shutil.copytree(Path(dirs["shard"], "last.ckpt"), folder)
        (folder / ".metadata.tmp").write_bytes(b"x")
        with pytest.raises(IncompleteCheckpointError, match=r"\.metadata\.tmp"):
            strategies[0].load_checkpoint(folder)
        with pytest.raises(IncompleteCheckpointError, match=r"\.metadata\.tmp"):
            consolidate_checkpoint(folder)
        os.remove(folder / checkpoint_io.MARKER_NAME)  # without a marker (an older version's folder): still torn
        with pytest.raises(IncompleteCheckpointError, match=r"\.metadata\.tmp"):
            strategies[0].load_checkpoint(folder)


@pytest.mark.parametrize("crashed", ["fsdp"], indirect=True)  # convert_checkpoint reads DCP folders
def test_convert_checks_the_marker_prints_and_refuses_to_overwrite(crashed, tmp_path, capsys):
    kind, dirs, _ = crashed
    folder, out = Path(dirs["shard"], "epoch=0-step=2.ckpt"), tmp_path / "out.ckpt"
    convert_main([str(folder), str(out)])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "global step 2" in printed
    assert check_checkpoint(out)["global_step"] == 2
    written = out.read_bytes()
    with pytest.raises(SystemExit):
        convert_main([str(folder), str(out)])
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == written
    convert_main([str(folder), str(out), "--overwrite"])
    with pytest.raises(SystemExit):
        convert_main([str(Path(dirs["torn"], "last.ckpt")), str(tmp_path / "torn.ckpt")])
    assert "__2_0.distcp" in capsys.readouterr().err and not (tmp_path / "torn.ckpt").exists()
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    assert "trust like code" in capsys.readouterr().out.replace("\n", " ")


# -- loading runs no code ---------------------------------------------------------------------------

def _pwn(target):
    Path(target).write_text("code ran")
    return {}


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return _pwn, (self.target,)


def _seal(path, write, step=1):
    checkpoint_io.write_atomically(path, write, global_step=step)  # a valid marker: the attacker can write one


def test_crafted_payload_is_refused_by_every_load_path(crashed, tmp_path):
    kind, dirs, _ = crashed
    target = tmp_path / "pwned"
    payload = {"state_dict": {}, "global_step": 1, "hyper_parameters": {"x": Payload(str(target))}}
    loads, allowed = [], torch.serialization.get_safe_globals()
    if kind == "ddp":
        file = tmp_path / "evil.ckpt"
        _seal(file, lambda p: torch.save(payload, p))
        loads += [lambda: UlyssesStrategy(sp=1).load_checkpoint(file),
                  lambda: UlyssesFabricStrategy(sp=1).load_checkpoint(file, {"model": torch.nn.Linear(1, 1)}),
                  lambda: checkpoint_io.load_trusted(file)]
    else:
        folder = tmp_path / "evil"
        good = Path(dirs["shard"], "epoch=0-step=2.ckpt")

        def evil_folder(p):
            shutil.copytree(good, p, ignore=shutil.ignore_patterns(checkpoint_io.MARKER_NAME))
            torch.save(payload, p / "meta.pt")

        _seal(folder, evil_folder)
        loads += [lambda: UlyssesFSDPStrategy(sp=1).load_checkpoint(folder),
                  lambda: UlyssesFSDPFabricStrategy(sp=1).load_checkpoint(folder, {"model": torch.nn.Linear(1, 1)}),
                  lambda: consolidate_checkpoint(folder, tmp_path / "out.ckpt")]
    for load in loads:
        with pytest.raises(UnsafeCheckpointError, match="_pwn.*run as code"):
            load()
        assert not target.exists(), "loading the checkpoint ran its code"
    assert not (tmp_path / "out.ckpt").exists()
    assert set(torch.serialization.get_safe_globals()) == set(allowed)  # the allow-list ended with each load


def test_hf_config_in_hyperparameters_loads_weights_only(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    file, allowed = tmp_path / "hp.ckpt", torch.serialization.get_safe_globals()
    _seal(file, lambda p: torch.save({"hyper_parameters": {"config": config}, "global_step": 1}, p))
    loaded = UlyssesStrategy(sp=1).load_checkpoint(file)
    assert loaded["hyper_parameters"]["config"].to_dict() == config.to_dict()
    assert set(torch.serialization.get_safe_globals()) == set(allowed)


# -- the writer itself ---------------------------------------------------------------------------------

def _folder(meta):
    def write(p):
        p.mkdir()
        torch.save(meta, p / "meta.pt")
        (p / ".metadata").write_bytes(b"dcp metadata")
        (p / "__0_0.distcp").write_bytes(b"shard")
    return write


def test_a_file_and_a_folder_replace_each_other_leaving_nothing_behind(tmp_path):
    dest = tmp_path / "last.ckpt"
    _seal(dest, lambda p: torch.save({"step": 1}, p), step=1)
    _seal(dest, _folder({"step": 2}), step=2)  # save_distributed_checkpoint switched on
    assert check_checkpoint(dest)["global_step"] == 2 and not sidecar_path(dest).exists()
    _seal(dest, lambda p: torch.save({"step": 3}, p), step=3)
    assert check_checkpoint(dest)["global_step"] == 3 and checkpoint_io.load_trusted(dest) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", sidecar_path(dest).name]


@pytest.mark.skipif(sys.platform != "linux", reason="the one-step exchange is Linux's renameat2")
def test_a_folder_replaces_the_old_one_in_one_step(tmp_path, monkeypatch):
    # the old checkpoint is never moved out of the way first: there is no moment without a checkpoint
    dest = tmp_path / "last.ckpt"
    _seal(dest, _folder({"step": 1}), step=1)
    renamed = []
    real_rename, real_remove = os.rename, checkpoint_io._remove
    monkeypatch.setattr(os, "rename", lambda a, b: (renamed.append((a, b)), real_rename(a, b)))

    def remove(path):
        if path == checkpoint_io.staging_path(dest) and path.exists():
            raise KeyboardInterrupt  # killed right after the exchange, the old copy not yet dropped
        real_remove(path)

    monkeypatch.setattr(checkpoint_io, "_remove", remove)
    with pytest.raises(KeyboardInterrupt):
        _seal(dest, _folder({"step": 2}), step=2)
    assert renamed == [] and check_checkpoint(dest)["global_step"] == 2
    assert check_checkpoint(checkpoint_io.staging_path(dest))["global_step"] == 1  # the old one, swapped out


def test_without_an_exchange_the_old_folder_is_moved_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_io, "_exchange", lambda a, b: False)
    dest = tmp_path / "last.ckpt"
    _seal(dest, _folder({"step": 1}), step=1)
    _seal(dest, _folder({"step": 2}), step=2)
    assert check_checkpoint(dest)["global_step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_damaged_marker_is_refused(tmp_path):
    dest = tmp_path / "a.ckpt"
    _seal(dest, _folder({}), step=4)
    marker = dest / checkpoint_io.MARKER_NAME
    marker.write_text(marker.read_text().replace('"__0_0.distcp": 5', '"__0_0.distcp": 6'))
    with pytest.raises(IncompleteCheckpointError, match="damaged"):
        check_checkpoint(dest)
    marker.write_text("{")
    with pytest.raises(IncompleteCheckpointError, match="unreadable"):
        check_checkpoint(dest)


def test_remote_paths_are_left_to_lightning(tmp_path):
    seen = []
    checkpoint_io.write_atomically("memory://bucket/last.ckpt", seen.append)
    assert seen == ["memory://bucket/last.ckpt"]
    assert checkpoint_io.resolve_for_load("s3://bucket/last.ckpt", fall_back=True) == "s3://bucket/last.ckpt"
