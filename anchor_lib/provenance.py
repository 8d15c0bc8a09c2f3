"""Where a number was measured: hardware, library versions, git commit (recorded with every result)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parent.parent


def hardware(device: torch.device | str | None = None) -> str:
    """A human-readable name of the device that ran the computation."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores)"


def git_commit() -> str:
    """``$ANCHOR_COMMIT`` if set, else the repository's HEAD sha (with ``-dirty`` when the tree
    has changes), else ``unknown``.

    The variable comes first because a copy of the tree shipped to a GPU machine can carry a
    stale ``.git`` (seen on the first H100 run: it named the previous commit).
    """
    if os.environ.get("ANCHOR_COMMIT"):
        return os.environ["ANCHOR_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=_REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe(device: torch.device | str | None = None) -> dict[str, str]:
    """``{"hardware", "torch", "commit"}`` for a results artifact."""
    # str(): torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses.
    return {"hardware": hardware(device), "torch": str(torch.__version__), "commit": git_commit()}
