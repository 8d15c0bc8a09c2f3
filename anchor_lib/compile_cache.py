"""Carrying ``torch.compile``'s work from one GPU machine to the next.

A full-profile run compiles the model's passes (inductor) before its first step: 35 to 55 s on the
H100 machine, in every process on every fresh machine (the first epoch of the ablation
runs of 2026-11-27 took 43 to 63 s, the later ones 6.5 s). GPU time here comes in slots of about
fifteen minutes on a machine that starts bare, so that is paid at every slot. PyTorch can
serialise what a process compiled (``torch.compiler.save_cache_artifacts``: the generated kernels
and graphs) and load it into another before it compiles (``load_cache_artifacts``). The entries are
keyed by the traced code, the PyTorch and Triton versions and the GPU, so a file from other code or
another machine only misses; it never changes what runs.

``ANCHOR_COMPILE_CACHE=DIR`` turns this on. The first compile of a process loads every file in
DIR; each compiled training run adds what its process compiled as one more file, named by its
content's hash, after its first epoch and at its end. One file per save, rather than one file
rewritten: a process saves only the entries it compiled or used, so a rewrite would drop what the
other processes of a job (one per group of methods) had saved. The oldest files go once DIR holds
more than :data:`MAX_BYTES`. ``scripts/gpu_job.sh`` sets DIR and brings it back. A cache is an
optimisation only: a file that cannot be read, loaded or written is reported and skipped, never an
error.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from . import checkpoint

#: The environment variable naming the cache folder.
ENV = "ANCHOR_COMPILE_CACHE"

#: The folder's largest total size, since it travels to and from the GPU machines (files of at
#: most 16 MB come back, and the whole working tree that travels is limited to 64 MB).
MAX_BYTES = 15 * 2**20

_loaded: set[Path] = set()  # files already loaded into this process


def folder() -> Path | None:
    """The cache folder ``$ANCHOR_COMPILE_CACHE`` names, or None when it is unset or empty."""
    value = os.environ.get(ENV, "").strip()
    return Path(value) if value else None


def _files(where: Path) -> list[Path]:
    """The cache files in ``where``, oldest first."""
    return sorted(where.glob("*.bin"), key=lambda p: (p.stat().st_mtime, p.name))


def _warn(message: str) -> None:
    warnings.warn(f"{ENV}: {message}", RuntimeWarning, stacklevel=3)


def load() -> int:
    """Load every cache file not loaded into this process yet; returns how many loaded.

    Nothing happens when the variable is unset or the folder holds no file (the first slot)."""
    where = folder()
    if where is None or not where.is_dir():
        return 0
    count = 0
    for file in _files(where):
        if file in _loaded:
            continue
        _loaded.add(file)  # one try per file and process, loaded or not
        try:
            info = torch.compiler.load_cache_artifacts(file.read_bytes())
        except Exception as err:  # noqa: BLE001 - any failure of an optimisation is only reported
            _warn(f"could not load {file} ({type(err).__name__}: {err}); skipped")
            continue
        if info is None:  # PyTorch's answer to bytes it cannot read
            _warn(f"{file} holds no cache PyTorch can read; skipped")
            continue
        count += 1
    return count


def save() -> Path | None:
    """Add what this process compiled (and used from loaded files) to the folder as one file;
    its path, or None when the variable is unset or there is nothing to save (a CPU run's
    ``aot_eager`` generates no kernels). Then the oldest files go while the folder holds more
    than :data:`MAX_BYTES`."""
    where = folder()
    if where is None:
        return None
    try:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None or not artifacts[0]:
            return None
        blob = artifacts[0]
        file = where / f"{hashlib.sha256(blob).hexdigest()[:16]}.bin"
        if file.is_file():
            file.touch()  # the same entries again: now the newest, the last to go
        else:
            checkpoint.atomic_write_bytes(file, blob, sidecar=False)
        _loaded.add(file)  # this process holds its entries already
        files = _files(where)
        while len(files) > 1 and sum(p.stat().st_size for p in files) > MAX_BYTES:
            oldest = files.pop(0)
            if oldest != file:
                oldest.unlink()
    except Exception as err:  # noqa: BLE001 - see load()
        _warn(f"could not save the compile cache ({type(err).__name__}: {err}); skipped")
        return None
    return file
