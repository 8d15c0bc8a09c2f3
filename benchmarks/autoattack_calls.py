"""What each attack of the evaluation protocol costs, counted in model calls rather than seconds.

A model call is one forward pass over a batch (an attack step adds a backward pass). On a GPU a
narrow model's call costs about the same whatever the batch size (the host launching kernels is
the bottleneck), so the number of calls per batch is what an evaluation's time follows, and it
does not depend on the hardware. This script counts them with a forward hook, for two linear
classifiers on 3 x 32 x 32 inputs:

- ``unbreakable``: small weights and a margin of 1 for class 0, so no eps = 8/255 perturbation
  changes a prediction. Every attack spends its whole budget: the cost of a robust image.
- ``fragile``: large weights and almost no margin, so the first attack (APGD-CE) breaks every
  image and AutoAttack's later, costlier stages have nothing left to attack: the cost on a model
  that is not robust, such as the untrained one the speed benchmark times.

Each is evaluated as ``evaluate.evaluate_suite`` does it (attacks on the clean-correct images,
then one prediction), in one batch of ``n`` images and in batches of ``n / 2``. AutoAttack's
calls are split by sub-attack (APGD-CE, APGD-T, FAB-T, Square).

    python benchmarks/autoattack_calls.py [OUT.json]

Default output: ``data/results/cpu-checks/autoattack_calls.json``. About a minute on a CPU.
"""

from __future__ import annotations

import collections
import json
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from anchor_lib import attacks, checkpoint, evaluate, provenance

OUT = Path(__file__).resolve().parent.parent / "data" / "results" / "cpu-checks" / \
    "autoattack_calls.json"

#: The sub-attacks of standard AutoAttack, as torchattacks names their classes.
STAGES = {"APGD": "APGD-CE", "APGDT": "APGD-T", "FAB": "FAB-T", "Square": "Square"}


def linear_model(kind: str) -> nn.Module:
    """A linear classifier of float (N, 3, 32, 32) images in [0, 1] into 10 classes.

    ``unbreakable`` predicts class 0 with a margin no eps = 8/255 attack can overcome
    (|w| <= 0.05 / sqrt(3072) per pixel); ``fragile`` has weights 100x larger, centred on the
    mid-grey image, so that an eps = 8/255 step moves its logits more than its margins.
    """
    if kind not in ("unbreakable", "fragile"):
        raise ValueError(f"kind must be 'unbreakable' or 'fragile', got {kind!r}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with torch.no_grad():
        model[1].bias.zero_()
        if kind == "unbreakable":
            model[1].weight.mul_(0.05)
            model[1].bias[0] = 1.0
        else:  # centred on the mid-grey image, so that the classes are close together
            model[1].weight.mul_(5.0)
            model[1].bias.copy_(-0.5 * model[1].weight.sum(1))
    return model.eval()


@contextmanager
def counting(model: nn.Module) -> Iterator[collections.Counter]:
    """Count the model's forward calls, by the AutoAttack stage making them (``other`` outside)."""
    import torchattacks

    counts: collections.Counter = collections.Counter()
    stage = ["other"]
    hook = model.register_forward_hook(lambda *_: counts.update([stage[0]]))
    originals = {}
    for cls_name, label in STAGES.items():
        cls = getattr(torchattacks, cls_name)
        originals[cls] = cls.forward

        def forward(self, *args, _forward=cls.forward, _label=label, **kwargs):
            stage[0] = _label
            try:
                return _forward(self, *args, **kwargs)
            finally:
                stage[0] = "other"
        cls.forward = forward
    try:
        yield counts
    finally:
        hook.remove()
        for cls, forward in originals.items():
            cls.forward = forward


def count_calls(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                batch_size: int) -> dict[str, dict]:
    """Model calls (and accuracy) of every protocol attack and every attacking sanity check on
    ``(x, y)``, in batches of ``batch_size``."""
    out = {}
    for name in evaluate.ATTACKS:
        with counting(model) as counts:
            start = time.perf_counter()
            acc = evaluate.evaluate_suite(model, x, y, attacks=[name], batch_size=batch_size,
                                          autoattack_n=len(x))[name]["value"]
            seconds = time.perf_counter() - start
        out[name] = {"calls": sum(counts.values()), "accuracy": acc,
                     "cpu_seconds": round(seconds, 2)}
        if name == "autoattack":
            out[name]["by_stage"] = {label: counts[label] for label in [*STAGES.values(), "other"]}
    eps = evaluate.EVAL_EPS
    checks = {  # the sanity checks that attack (the AutoAttack gap reuses numbers measured above)
        "sanity_more_steps": lambda: evaluate.check_more_steps(model, x, y, eps,
                                                               batch_size=batch_size),
        "sanity_eps_sweep": lambda: evaluate.check_eps_sweep(model, x, y, evaluate.eps_sweep(eps),
                                                             batch_size=batch_size),
        "sanity_black_box_weaker": lambda: evaluate.check_black_box_weaker(
            model, x, y, eps, pgd_acc=out["pgd20"]["accuracy"], batch_size=batch_size),
    }
    for name, check in checks.items():
        with counting(model) as counts:
            start = time.perf_counter()
            check()
            out[name] = {"calls": sum(counts.values()),
                         "cpu_seconds": round(time.perf_counter() - start, 2)}
    return out


def measure(n: int = 8) -> dict:
    """Counts for both models, in one batch of ``n`` and in batches of ``n // 2``."""
    # Not the stream the models' weights come from (seed 0): images equal to weight rows would
    # sit far from every decision boundary.
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = {}
    for kind in ("unbreakable", "fragile"):
        model = linear_model(kind)
        with torch.no_grad():
            y = model(x).argmax(1)  # every image starts correctly classified
        results[kind] = {f"batches_of_{b}": count_calls(model, x, y, b) for b in (n, n // 2)}
    import torchattacks

    return {
        "what": "model calls (forward passes over a batch) per attack and per attacking sanity "
                "check of the DESIGN §4 protocol, counted with a forward hook; AutoAttack split "
                "by sub-attack",
        "models": {"unbreakable": "linear, margin 1 for class 0, no eps-8/255 attack flips it: "
                                  "every attack spends its whole budget",
                   "fragile": "linear, weights 100x larger, no margin: APGD-CE breaks every "
                              "image"},
        "n": n, "eps": evaluate.EVAL_EPS,
        "autoattack_budget": {"iterations": attacks.AUTOATTACK_ITERATIONS,
                              "square_queries": attacks.AUTOATTACK_SQUARE_QUERIES},
        "command": "python benchmarks/autoattack_calls.py",
        "data": "uniform random images (the counts do not depend on the images)",
        **provenance.describe("cpu"), "torchattacks": torchattacks.__version__,
        "python": platform.python_version(),
        "note": "calls do not depend on the hardware; cpu_seconds are this CPU's, for scale only",
        "results": results,
    }


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    result = measure()
    checkpoint.write_json(path, result)
    print(json.dumps({k: {b: {a: r["calls"] for a, r in v.items()} for b, v in res.items()}
                      for k, res in result["results"].items()}, indent=1))
    print(f"wrote {path}")
