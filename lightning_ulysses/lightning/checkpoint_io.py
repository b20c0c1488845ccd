"""Checkpoints that are whole or absent, checked before they load, and loaded without running code.

Writing (:func:`write_atomically`): the checkpoint goes to a hidden sibling (``.NAME.ulysses-tmp``), is
fsynced, and only then renamed over the destination, so a crash at any point leaves the previous
checkpoint in place. A folder (or a file and a folder) is swapped with the old one in a single atomic
exchange where the OS has one (Linux ``renameat2``); elsewhere the old one is moved aside first, and a
crash between those two renames leaves no checkpoint under the name (the load error names both). A
completion marker records the global step and every file with its size:

* a folder (DCP shards, ``.metadata``, ``meta.pt``) carries ``.ulysses_complete.json`` inside, written
  after every other file and before the rename, so the folder and its marker appear together;
* a single file gets a sidecar ``NAME.ulysses_complete.json``, written after the rename (a file cannot
  list its own size); the old sidecar is deleted before the rename, so it never vouches for the new file.

Reading (:func:`check_checkpoint`, :func:`resolve_for_load`): a checkpoint whose files do not match its
marker is refused before anything loads, naming the file; one without a marker (older versions, other
tools) loads with a warning. A torn ``last`` checkpoint may fall back to the newest complete sibling.

Unpickling (:func:`safe_unpickling`): ``torch.load(weights_only=True)`` with a scoped allow-list of the
types Lightning checkpoints hold, plus the transformers config classes a checkpoint names (HF configs
saved in ``hyper_parameters``). DCP's own ``.metadata`` is unpickled by torch, not by us: a DCP folder is
to be trusted like code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.fabric.utilities.load import _METADATA_FILENAME as LIGHTNING_META
from lightning.fabric.utilities.rank_zero import rank_zero_warn

MARKER_NAME = ".ulysses_complete.json"
SIDECAR_SUFFIX = ".ulysses_complete.json"
MARKER_FORMAT = "lightning-ulysses checkpoint"
MARKER_VERSION = 1
DCP_METADATA = ".metadata"

# What Lightning itself puts in a checkpoint beyond torch's default allow-list (tensors, dicts, lists,
# OrderedDict, dtypes): hyperparameters as AttributeDict, paths in hyperparameters.
TRUSTED_TYPES: tuple[type, ...] = (AttributeDict, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
                                   pathlib.PureWindowsPath)


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint whose files do not match its completion marker (torn, or being written)."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that names globals whose unpickling could run code."""


# -- writing --------------------------------------------------------------------------------------

def staging_path(dest: str | Path) -> Path:
    """The hidden sibling a checkpoint is written into before it is renamed to ``dest``."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.ulysses-tmp")


def _aside_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.ulysses-old")


def sidecar_path(file: str | Path) -> Path:
    """Where the completion marker of a single-file checkpoint lives."""
    file = Path(file)
    return file.with_name(file.name + SIDECAR_SUFFIX)


def _is_local(path: str | Path) -> bool:
    # fsspec URLs (s3://, gs://) have no rename-over or fsync; Lightning's own writer handles them.
    # Test the caller's value: Path() folds "s3://b/x" into "s3:/b/x".
    return isinstance(path, Path) or "://" not in str(path)


def write_atomically(dest: str | Path, write: Callable[[Path], None], *, global_step: int | None = None,
                     is_rank_zero: bool = True, barrier: Callable[[], None] | None = None) -> None:
    """Write a checkpoint so that ``dest`` holds either the previous checkpoint or the new complete one.

    ``write(staged)`` is called on every rank with the same staging path and must create there the file
    or folder the checkpoint is (DCP: every rank writes its shards; a single file: rank 0). Rank 0 then
    fsyncs it, adds the completion marker and renames it over ``dest``. With ``barrier`` (sharded
    checkpoints), every rank waits: before writing (the stale staging copy of a crashed save is gone),
    after writing (every shard is on disk) and after the rename (no rank reads ``dest`` early).
    Nothing is cleaned up when ``write`` raises: a crash leaves the same state, which the next save
    clears. Non-local (fsspec URL) destinations are written in place by ``write``, without a marker.
    """
    if not _is_local(dest):
        write(dest)
        return
    dest = Path(dest)
    sync = barrier or (lambda: None)
    staged = staging_path(dest)
    if is_rank_zero:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove(staged)
    sync()
    write(staged)
    sync()
    if is_rank_zero:
        commit(staged, dest, global_step)
    sync()


def commit(staged: Path, dest: Path, global_step: int | None) -> None:
    """Seal ``staged`` (fsync, marker) and rename it over ``dest``; one process only."""
    if not staged.exists():
        raise FileNotFoundError(f"the checkpoint writer created nothing at {staged} (meant for {dest}).")
    _remove(sidecar_path(dest))  # a marker left beside dest must not vouch for what replaces it
    if staged.is_dir():
        files = _listing(staged)
        for name in files:
            _fsync(staged / name)
        _write_json_durably(staged / MARKER_NAME, _marker(files, global_step))
        _fsync(staged)
        _swap(staged, dest)
    else:
        _fsync(staged)
        size = staged.stat().st_size
        _swap(staged, dest)
        _write_json_durably(sidecar_path(dest), _marker({dest.name: size}, global_step))


def _swap(staged: Path, dest: Path) -> None:
    if dest.exists() and (dest.is_dir() or staged.is_dir()):
        if _exchange(staged, dest):
            # one step: dest held the old checkpoint and now holds the new one, never nothing
            _fsync(dest.parent)
            _remove(staged)  # the old checkpoint, now under the staging name
            return
        # A folder cannot be renamed over another one: move the old one aside first, drop it last.
        # A crash between the two renames leaves no dest (its error names what remains).
        aside = _aside_path(dest)
        _remove(aside)
        os.rename(dest, aside)
        os.rename(staged, dest)
        _fsync(dest.parent)
        _remove(aside)
    else:
        os.replace(staged, dest)
        _fsync(dest.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False``
    where the platform or file system has no such call, for the caller to fall back.

    Written with ctypes because Python's ``os`` exposes no exchange (``os.replace`` cannot put a
    folder over a non-empty one)."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # no exchange here: fall back
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def remove_marker(path: str | Path) -> None:
    """Delete the sidecar marker of a single-file checkpoint (with the file it describes)."""
    if _is_local(path):
        _remove(sidecar_path(path))


def _marker(files: dict[str, int], global_step: int | None) -> dict[str, Any]:
    return {"format": MARKER_FORMAT, "version": MARKER_VERSION, "global_step": global_step,
            "files": files, "digest": _digest(files)}


def _digest(files: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def _listing(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` but the marker, by relative POSIX path, with its size."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MARKER_NAME:
            out[path.relative_to(folder).as_posix()] = path.stat().st_size
    return out


def _write_json_durably(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# -- checking -------------------------------------------------------------------------------------

def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The completion marker of the checkpoint at ``path`` (file or folder), or ``None`` if it has none.

    Raises :class:`IncompleteCheckpointError` if the marker is unreadable or does not match its own digest.
    """
    path = Path(path)
    where = path / MARKER_NAME if path.is_dir() else sidecar_path(path)
    if not where.is_file():
        return None
    try:
        marker = json.loads(where.read_text())
        files = marker["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise IncompleteCheckpointError(f"the completion marker {where} of {path} is unreadable ({err}).") from err
    if marker.get("format") != MARKER_FORMAT or not isinstance(files, dict) or marker.get("digest") != _digest(files):
        raise IncompleteCheckpointError(f"the completion marker {where} of {path} is damaged (its digest does not "
                                        "match its file list).")
    return marker


def check_checkpoint(path: str | Path, warn_legacy: bool = True) -> dict[str, Any] | None:
    """Check that the checkpoint at ``path`` is complete, before anything of it is loaded.

    Returns its marker. A checkpoint without one (written before markers existed, or by another tool)
    returns ``None`` after a warning, unless a folder is evidently torn (no ``.metadata`` or ``meta.pt``,
    or DCP's ``.metadata.tmp`` left behind). Raises :class:`IncompleteCheckpointError`, naming the path and
    the file, when a file listed in the marker is missing or has another size, or a file not in the marker
    is there (shards written into the folder after it was sealed).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(_missing_message(path))
    marker = read_marker(path)
    if path.is_dir():
        found = _listing(path)
        if marker is None:
            _check_legacy_folder(path, found)
        else:
            _compare(path, marker["files"], found)
    elif marker is not None:
        size = path.stat().st_size
        expected = next(iter(marker["files"].values()), None)
        if size != expected:
            raise IncompleteCheckpointError(
                f"checkpoint {path} is torn: it has {size} bytes, its completion marker {sidecar_path(path)} says "
                f"{expected} (rewritten or truncated after it was sealed)."
            )
    if marker is None and warn_legacy:
        rank_zero_warn(
            f"checkpoint {path} has no lightning-ulysses completion marker (written by a version before markers, or "
            "by another tool), so it cannot be checked for completeness; loading it anyway. Save it again to add one."
        )
    return marker


def _compare(path: Path, expected: dict[str, int], found: dict[str, int]) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    resized = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    problems = ([f"missing {n}" for n in missing] + [f"unexpected {n} (not in the marker)" for n in extra]
                + [f"{n} has {found[n]} bytes, the marker says {expected[n]}" for n in resized])
    if problems:
        raise IncompleteCheckpointError(
            f"checkpoint {path} is torn or incomplete: {'; '.join(problems)} (completion marker {path / MARKER_NAME})."
        )


def _check_legacy_folder(path: Path, found: dict[str, int]) -> None:
    if f"{DCP_METADATA}.tmp" in found:
        raise IncompleteCheckpointError(
            f"checkpoint {path} is torn: {path / (DCP_METADATA + '.tmp')} is left from an interrupted write.")
    for name in (DCP_METADATA, LIGHTNING_META):
        if name not in found:
            raise IncompleteCheckpointError(f"checkpoint {path} is incomplete: no {path / name}.")


def _missing_message(path: Path) -> str:
    leftovers = [p for p in (staging_path(path), _aside_path(path)) if p.exists()]
    hint = (f" A save was interrupted while swapping it: {', '.join(map(str, leftovers))} remain; the "
            f"'.ulysses-old' one is the previous checkpoint." if leftovers else "")
    return f"no checkpoint at {path}.{hint}"


def newest_complete(directory: str | Path, exclude: str | Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The complete checkpoint (with a matching marker) of ``directory`` with the highest global step
    (then the newest), other than ``exclude``; ``None`` if there is none. Markerless ones do not count."""
    directory = Path(directory)
    exclude = Path(exclude) if exclude is not None else None
    candidates = []
    for entry in directory.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.name.endswith(SIDECAR_SUFFIX):
            entry = entry.with_name(entry.name[: -len(SIDECAR_SUFFIX)])
        elif not (entry / MARKER_NAME).is_file():
            continue
        if entry == exclude or not entry.exists():
            continue
        try:
            marker = check_checkpoint(entry, warn_legacy=False)
        except (IncompleteCheckpointError, FileNotFoundError):
            continue
        step = marker.get("global_step") if marker else None
        candidates.append((step if isinstance(step, int) else -1, entry.stat().st_mtime, str(entry), marker))
    if not candidates:
        return None
    *_, name, marker = max(candidates)
    return Path(name), marker


def resolve_for_load(path: str | Path, fall_back: bool = False) -> str | Path:
    """The checkpoint to load for ``path``: ``path`` itself once :func:`check_checkpoint` passes.

    With ``fall_back`` (a ``last`` checkpoint), a torn ``path`` gives way to :func:`newest_complete` in
    its directory, with a warning naming both; if there is none, the error stands. A non-local (fsspec
    URL) ``path`` is returned unchecked.
    """
    if not _is_local(path):
        return path
    path = Path(path)
    try:
        check_checkpoint(path)
        return path
    except IncompleteCheckpointError as err:
        found = newest_complete(path.parent, exclude=path) if fall_back else None
        if found is None:
            if fall_back:
                raise IncompleteCheckpointError(f"{err} No complete checkpoint to fall back to in {path.parent}.") from err
            raise
        rank_zero_warn(f"{err} Falling back to the newest complete checkpoint in {path.parent}: {found[0]} "
                       f"(global step {found[1].get('global_step')}).")
        return found[0]


# -- unpickling -----------------------------------------------------------------------------------

def pickled_file(path: str | Path) -> Path:
    """The file of a checkpoint that ``torch.load`` unpickles: the file itself, or a folder's ``meta.pt``."""
    path = Path(path)
    return path / LIGHTNING_META if path.is_dir() else path


@contextlib.contextmanager
def safe_unpickling(checkpoint: str | Path) -> Iterator[None]:
    """Inside the block, ``torch.load(..., weights_only=True)`` of ``checkpoint`` accepts
    :data:`TRUSTED_TYPES` and the transformers config classes it names; nothing else that could run code.

    Checked on entry, before any tensor is read: :class:`UnsafeCheckpointError` names the other globals.
    The allow-list is ``torch.serialization.safe_globals``, so it ends with the block and adds to what
    the caller allowed (wrap the call in ``torch.serialization.safe_globals([...])`` to trust more types).
    """
    file = pickled_file(checkpoint)
    with torch.serialization.safe_globals(list(TRUSTED_TYPES)):
        unsafe = _unsafe_globals(file)
        configs = {name: cls for name in unsafe if (cls := _hf_config_class(name)) is not None}
        rest = sorted(set(unsafe) - set(configs))
        if rest:
            raise UnsafeCheckpointError(
                f"refusing to load {file}: it names {', '.join(rest)}, which unpickling would have to call, i.e. run "
                "as code. Checkpoints load with torch.load(weights_only=True); if you trust this file, allow these "
                "types with torch.serialization.safe_globals([...]) around the call."
            )
        with torch.serialization.safe_globals(list(configs.values())):
            yield


def _unsafe_globals(file: Path) -> list[str]:
    if not file.is_file():
        return []  # nothing to unpickle: the loader reports the missing file
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except (ValueError, RuntimeError) as err:  # not a torch zip archive
        raise UnsafeCheckpointError(f"{file} is not a checkpoint written by torch.save ({err}).") from err


def _hf_config_class(name: str) -> type | None:
    # Configs of installed transformers models are data (NEWOBJ + a __dict__): allowed when the
    # checkpoint names one. Only modules of the transformers package are imported to find it.
    module, _, attr = name.rpartition(".")
    if module != "transformers" and not module.startswith("transformers."):
        return None
    try:
        from transformers import PretrainedConfig

        cls = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, PretrainedConfig) else None


def load_trusted(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` under :func:`safe_unpickling`."""
    with safe_unpickling(path):
        return torch.load(pickled_file(path), weights_only=True, **kwargs)
