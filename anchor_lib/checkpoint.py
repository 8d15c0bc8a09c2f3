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

import hashlib
import io
import json
import os
import random
import re
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


def atomic_write_bytes(path: str | Path, data: bytes, *, sidecar: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically, plus ``path.sha256`` when ``sidecar``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if sidecar:
            side = path.with_name(path.name + ".sha256")
            digest = hashlib.sha256(data).hexdigest()
            # While the file is being replaced the sidecar accepts the old content and the new:
            # a crash between the renames leaves a complete file that still verifies.
            old = [h for h in _sidecar_hashes(side) if h != digest] if path.exists() else []
            lines = "".join(f"{h}  {path.name}\n" for h in [digest, *old])
            atomic_write_bytes(side, lines.encode(), sidecar=False)
            os.replace(tmp, path)
            if old:
                atomic_write_bytes(side, f"{digest}  {path.name}\n".encode(), sidecar=False)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# What tempfile.mkstemp(prefix=".<name>.", suffix=".tmp") in atomic_write_bytes creates.
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
