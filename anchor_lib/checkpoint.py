"""Checkpoints and artifacts that survive kill -9 and refuse to load when damaged.

Every file is written atomically (temporary file in the same folder, flush + fsync, rename) and
gets a ``<name>.sha256`` sidecar; :func:`load` verifies the hash before unpickling and then uses
``torch.load(weights_only=True)``, so a checkpoint can never run code.

Replacing a file and its sidecar takes three renames: the sidecar first lists the new hash *and*
the old one(s), then the file is renamed into place, then the sidecar keeps the new hash only. A
kill -9 at any moment therefore leaves either the old or the new file, each matching a hash in the
sidecar: a resumed run finds the last complete checkpoint, never a "corrupted" one.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint or artifact is missing, truncated, corrupted or of the wrong kind."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _create_temporary(path: Path) -> tuple[int, str]:
    """Create and open (write-only) a new temporary file beside ``path``; return (fd, its path).

    What ``tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")`` does, but
    with the mode a plain ``open()`` gives (0o666 less the umask) instead of mkstemp's 0o600: the
    file is renamed into place and becomes the artifact, which others (a shared results folder,
    a web server) must be able to read. The name keeps mkstemp's form (8 characters of
    ``[a-z0-9_]``) so that :func:`remove_stale_temporaries` recognises it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    for _ in range(tempfile.TMP_MAX):
        # secrets, not random: the global random state is part of a run's checkpointed RNG state.
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as err:
            # Name the file being written, not the temporary one the caller never asked for.
            raise type(err)(err.errno, err.strerror, str(path)) from err
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(path.parent))


def atomic_write_bytes(path: str | Path, data: bytes, *, sidecar: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically, plus ``path.sha256`` when ``sidecar``.

    Missing folders are created. The file gets the permissions ``open()`` would give it (0o666
    less the umask). A write that fails (``path`` is a folder, the folder takes no new files, the
    disk is full) raises ``OSError`` and leaves the file and its sidecar as they were, and no
    temporary file.
    """
    path = Path(path)
    if path.is_dir():  # else os.replace's error would come last and name the temporary file
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if sidecar:
            side = path.with_name(path.name + ".sha256")
            digest = hashlib.sha256(data).hexdigest()
            side_before = side.read_bytes() if side.is_file() else None
            # While the file is being replaced the sidecar accepts the old content and the new:
            # a crash between the renames leaves a complete file that still verifies.
            old = [h for h in _sidecar_hashes(side) if h != digest] if path.exists() else []
            lines = "".join(f"{h}  {path.name}\n" for h in [digest, *old])
            atomic_write_bytes(side, lines.encode(), sidecar=False)
            try:
                os.replace(tmp, path)
            except OSError:
                # The file was not replaced: neither may its sidecar be (no stray new one).
                if side_before is None:
                    side.unlink(missing_ok=True)
                else:
                    atomic_write_bytes(side, side_before, sidecar=False)
                raise
            if old:
                atomic_write_bytes(side, f"{digest}  {path.name}\n".encode(), sidecar=False)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_writable(path: str | Path, *, what: str = "output", kind: str = "a file",
                   example: str | None = None, folder: bool = False,
                   keep_folders: bool = True) -> None:
    """Raise ``ValueError`` naming ``what`` and ``path`` unless :func:`atomic_write_bytes` can
    write ``path`` (with ``folder``: write files into the folder ``path``).

    For work that writes its result only at the end (an evaluation, a benchmark, a training run's
    first epoch), whose own error would come late and name a temporary file. So this does up
    front what the write does: make the missing folders, then create (and remove) a temporary file
    in the folder. Trying beats checking permission bits, which root ignores and which do not see
    a read-only or virtual file system (``/proc``).

    Args:
        path: the file to be written, or with ``folder`` the folder to be written into.
        what: how messages name ``path`` (``"--out"``, ``"bench output"``).
        kind: what ``path`` should name (``"a JSON file"``), for the message when it is a
            folder.
        example: a file name to suggest inside a folder given for a file (``"metrics.json"``).
        keep_folders: keep the folders made for the check (False: remove them again, if still
            empty, so that a command refused later leaves nothing behind).
    """
    path = Path(path)
    target = path if folder else path.parent
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; expected a folder (new or existing)")
    if not folder and path.is_dir():
        raise ValueError(f"{what} {path} is a folder; expected the path of {kind}"
                         + (f" (e.g. {path / example})" if example else ""))
    # The nearest part of the folder's path that exists must be a folder.
    missing = []  # the folders to make, deepest first
    for p in (target, *target.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{what} {path} cannot be written: expected {p} to be a folder, "
                                 f"got a file")
            break
        missing.append(p)
    the_folder = f"the folder {target}" if folder else f"its folder {target}"
    try:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a folder root may not create (/sys), say
            raise ValueError(f"{what} {path} cannot be written: expected {the_folder} to exist "
                             f"or be creatable, got {type(err).__name__}: {err.strerror} "
                             f"({err.filename})") from err
        try:
            fd, probe = tempfile.mkstemp(dir=target, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as err:
            raise ValueError(f"{what} {path} cannot be written: expected {the_folder} to take new "
                             f"files, got {type(err).__name__}: {err.strerror}") from err
        os.close(fd)
        os.unlink(probe)
    finally:
        if not keep_folders:
            for p in missing:
                try:
                    p.rmdir()
                except FileNotFoundError:  # never made: mkdir failed part way
                    continue
                except OSError:  # something else put a file there meanwhile: not ours to remove
                    break


# What _create_temporary in atomic_write_bytes creates (and tempfile.mkstemp, for older files).
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed mid-way left in ``folder``; return them.

    Only for a folder a single process writes (a run's ``out_dir``): another process's write in
    progress would lose its temporary file.
    """
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if _TEMPORARY.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write pretty JSON with a sha256 sidecar (results artifacts)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path, *, verify_hash: bool = True) -> dict[str, Any]:
    """Verify ``path`` against its sidecar (unless ``verify_hash`` is False) and parse it as the
    JSON object every results artifact is; anything else raises :class:`CheckpointError`."""
    path = Path(path)
    _check_readable(path, verify_hash)
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} should hold a JSON object, not a {type(obj).__name__}")
    return obj


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text artifact (e.g. history.csv) with a sha256 sidecar."""
    return atomic_write_bytes(path, text.encode())


def save(obj: dict[str, Any], path: str | Path) -> Path:
    """Atomically ``torch.save`` a dict of tensors / plain data to ``path`` (with sidecar)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _sidecar_hashes(side: Path) -> list[str]:
    """The hashes a sidecar lists (first word of each line, ``sha256sum`` format)."""
    try:
        text = side.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.split()[0] for line in text.splitlines() if line.split()]


def _not_a_file(path: Path) -> CheckpointError:
    """The error for a ``path`` (a checkpoint or another artifact) that is no file: a folder is
    said to be one, rather than "does not exist"."""
    if path.is_dir():
        return CheckpointError(f"{path} is a folder; expected a file")
    return CheckpointError(f"checkpoint {path} does not exist")


def _folder_given_for_checkpoint(path: Path) -> CheckpointError:
    """The error for a folder passed as a checkpoint (a run's ``--out``, say): the checkpoint in
    it that was probably meant, or what was expected and what the folder holds."""
    for name in ("best.pt", "checkpoint.pt"):  # a run's folder: its best, else its latest
        if (path / name).is_file():
            return CheckpointError(f"{path} is a folder, not a checkpoint file; did you mean "
                                   f"{path / name}?")
    found = sorted(p.name for p in path.glob("*.pt"))
    return CheckpointError(f"{path} is a folder, not a checkpoint file: expected the path of a .pt "
                           f"file such as a run's best.pt or checkpoint.pt, and the folder holds "
                           + (f"no best.pt or checkpoint.pt but {', '.join(found)}" if found
                              else "no .pt file"))


def verify(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` exists and matches its sha256 sidecar."""
    path = Path(path)
    if not path.is_file():
        raise _not_a_file(path)
    side = path.with_name(path.name + ".sha256")
    if not side.is_file():
        raise CheckpointError(f"{path} has no {side.name} beside it; cannot verify it (re-create "
                              "it, or write the hash with anchor_lib.checkpoint.write_sidecar)")
    hashes = _sidecar_hashes(side)
    expected = hashes[0] if hashes else ""
    actual = sha256_file(path)
    if actual not in hashes:
        raise CheckpointError(f"{path} is corrupted or truncated: sha256 {actual[:12]}... does not "
                              f"match {side.name} ({expected[:12]}...)")


def _check_readable(path: Path, verify_hash: bool) -> None:
    """:func:`verify` ``path``, or when ``verify_hash`` is False only that it exists."""
    if verify_hash:
        verify(path)
    elif not path.is_file():
        raise _not_a_file(path)


def write_sidecar(path: str | Path) -> Path:
    """Write ``path.sha256`` for an existing file (e.g. one copied in from elsewhere)."""
    path = Path(path)
    return atomic_write_bytes(path.with_name(path.name + ".sha256"),
                              f"{sha256_file(path)}  {path.name}\n".encode(), sidecar=False)


# How the files torch.save writes begin: a zip archive (the default since PyTorch 1.6), or a
# pickle (protocol 2 or later; _use_new_zipfile_serialization=False).
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


def _check_torch_format(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` begins as a file of ``torch.save`` does.

    A file of another kind that verifies against its sidecar (a run's ``history.csv``, passed by
    mistake) would otherwise reach the unpickler, whose error says nothing useful ("IndexError:
    pop from empty list" for CSV text).
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC):
        return
    came = f"it starts with {head!r}" if head else "it is empty"
    raise CheckpointError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint "
                          f"(expected a file of torch.save, a zip archive starting with "
                          f"{_ZIP_MAGIC!r}; {came}); pass a run's best.pt or checkpoint.pt")


def load(path: str | Path, *, map_location: str | torch.device = "cpu",
         verify_hash: bool = True) -> dict[str, Any]:
    """Verify and load a checkpoint written by :func:`save` (``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        raise _folder_given_for_checkpoint(path)
    _check_readable(path, verify_hash)
    _check_torch_format(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for damaged pickles/zips
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from err
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path} is not an anchor_lib checkpoint (no 'model' entry)")
    if not isinstance(obj["model"], dict):
        raise CheckpointError(f"{path} is not an anchor_lib checkpoint: expected its 'model' entry "
                              f"to be a state_dict (a dict of tensors), got a "
                              f"{type(obj['model']).__name__}")
    return obj


# --- random number generator state, in weights_only-loadable form ------------------------------


def rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and Python RNG states as tensors / tuples (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    # Both setters take CPU byte tensors, wherever the checkpoint was loaded to.
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
