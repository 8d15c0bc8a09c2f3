"""Where a number was measured: hardware, library versions, git commit (DESIGN §4, §6)."""

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
    """The repository's HEAD sha (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=_REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("ANCHOR_COMMIT", "unknown")


def describe(device: torch.device | str | None = None) -> dict[str, str]:
    """``{"hardware", "torch", "commit"}`` for a results artifact."""
    return {"hardware": hardware(device), "torch": torch.__version__, "commit": git_commit()}
