"""anchor_lib: a thin, tested PyTorch library for the ANCHOR Book.

ANCHOR (arXiv 2510.27599) joins PGD adversarial training with supervised contrastive learning
that mines hard positives. Modules, one idea each: ``data``, ``models``, ``attacks``,
``losses``, ``train``, ``graphs``, ``evaluate``, ``embeddings``, ``plots``, ``widgets``,
``checkpoint``, ``reproduce``, ``bench``, ``cli``. Submodules are imported on use, so
``import anchor_lib`` is cheap.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("attacks", "bench", "checkpoint", "checks", "cli", "data", "distributed",
               "embeddings", "evaluate", "graphs", "losses", "models", "plots", "provenance",
               "reproduce", "results", "train", "widgets")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
