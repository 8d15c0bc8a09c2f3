"""Carrying ``torch.compile``'s work from one GPU machine to the next.

A full-profile run compiles the model's passes (inductor) before its first step: 35 to 55 s on the
H100 machine's 16 cores, in every process on every fresh machine (the first epoch of the ablation
runs of 2026-11-27 took 43 to 63 s, the later ones 6.5 s). GPU time here comes in slots of about
fifteen minutes on a machine that starts bare, so that is paid at every slot. PyTorch can
serialise what a process compiled (``torch.compiler.save_cache_artifacts``: the generated kernels
and graphs) and load it into another before it compiles (``load_cache_artifacts``). The entries are
keyed by the traced code, the PyTorch and Triton versions and the GPU, so a file from other code or
another machine only misses; it never changes what runs.

``ANCHOR_COMPILE_CACHE=FILE`` turns this on: the first compile of a process loads FILE when it
exists, and each training run that compiled rewrites it (``scripts/gpu_job.sh`` sets it and brings
the file back). A cache is an optimisation only: a file that cannot be read or loaded is reported
and ignored, never an error.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from . import checkpoint

#: The environment variable naming the cache file.
ENV = "ANCHOR_COMPILE_CACHE"

_loaded: set[Path] = set()  # files already loaded into this process


def path() -> Path | None:
    """The cache file ``$ANCHOR_COMPILE_CACHE`` names, or None when it is unset or empty."""
    value = os.environ.get(ENV, "").strip()
    return Path(value) if value else None


def load() -> bool:
    """Load the cache file into this process, once, before anything compiles; True if loaded.

    Nothing happens when the variable is unset or the file does not exist (the first slot)."""
    file = path()
    if file is None or file in _loaded or not file.is_file():
        return False
    _loaded.add(file)  # one try per process, loaded or not
    try:
        torch.compiler.load_cache_artifacts(file.read_bytes())
    except Exception as err:  # noqa: BLE001 - any failure of an optimisation is only reported
        warnings.warn(f"{ENV}: could not load {file} ({type(err).__name__}: {err}); compiling "
                      f"from scratch", RuntimeWarning, stacklevel=2)
        return False
    return True


def save() -> Path | None:
    """Write what this process compiled (and loaded) to the cache file, atomically; the path, or
    None when the variable is unset or there is nothing to save (a CPU run's ``aot_eager``
    generates no kernels)."""
    file = path()
    if file is None:
        return None
    try:
        artifacts = torch.compiler.save_cache_artifacts()
    except Exception as err:  # noqa: BLE001 - see load()
        warnings.warn(f"{ENV}: could not serialise the compile cache ({type(err).__name__}: "
                      f"{err}); {file} is left as it was", RuntimeWarning, stacklevel=2)
        return None
    if artifacts is None or not artifacts[0]:
        return None
    checkpoint.atomic_write_bytes(file, artifacts[0], sidecar=False)
    return file
