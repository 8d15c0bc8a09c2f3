"""Check 5 of the evaluation protocol, run on the committed tutorial checkpoints.

``evaluate.check_zero_gradients`` (the fifth sanity check, added after the committed runs were
evaluated) counts the input coordinates whose attack gradient is exactly zero. The committed
runs' ``metrics.json`` files hold the other four checks only. This script runs the fifth on
every tutorial checkpoint of ``data/checkpoints/manifest.json`` (their fp16 weights, in fp32),
on the first ``n`` test images, and on two controls built from them whose gradients are known
to vanish: the PGD-AT model with its green channel rounded to the 8-bit grid (partial masking,
a third of the coordinates) and the standard model with its logits times 10,000 (a saturated
softmax: the cross-entropy's gradient vanishes, the margin's does not).

It also measures what the partial masking hides, on the first ``n_attacked`` images: PGD-20,
CW-inf and AutoAttack, and the other four sanity checks, on the green-rounded model as it is
and through BPDA (the same function, its rounding's gradient taken as the identity), and the
worst case per image over each model's attacks.

    python benchmarks/zero_gradients.py [OUT.json]

Default output: ``data/results/cpu-checks/zero_gradients.json``. About 6 minutes on a 2-core
CPU, most of it AutoAttack on a robust model, twice (the file's ``cpu_seconds``); reads the data
from ``ANCHOR_DATA_DIR`` like the library.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from anchor_lib import checkpoint, data, evaluate, provenance, results

OUT = Path(__file__).resolve().parent.parent / "data" / "results" / "cpu-checks" / \
    "zero_gradients.json"


class RoundedGreen(nn.Module):
    """The green channel snapped to the 8-bit grid before ``model``: the same predictions on
    8-bit images, and a zero input gradient on that channel (chapter 6's partial masking).
    ``bpda=True``: the same function, with the rounding's gradient taken as the identity."""

    def __init__(self, model: nn.Module, bpda: bool = False) -> None:
        super().__init__()
        self.model, self.bpda = model, bpda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        green = torch.round(x[:, 1:2] * 255) / 255
        if self.bpda:
            green = x[:, 1:2] + (green - x[:, 1:2]).detach()
        return self.model(torch.cat([x[:, :1], green, x[:, 2:]], dim=1))


class ScaledLogits(nn.Module):
    """``model``'s logits times ``scale``: the same predictions, a saturated softmax."""

    def __init__(self, model: nn.Module, scale: float = 1e4) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.scale


def hidden(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """PGD-20, CW-inf and AutoAttack on the green-rounded ``model`` as it is and through BPDA,
    with the per-image worst case of each, and the sanity checks on the model as it is."""
    out = {}
    for name, m in (("as it is", RoundedGreen(model)), ("through BPDA", RoundedGreen(model, True))):
        start = time.perf_counter()
        suite = evaluate.evaluate_suite(m.eval(), x, y, attacks=("clean", "pgd20", "cw",
                                                                 "autoattack"), per_image=True)
        worst = torch.stack([torch.as_tensor(suite[a]["correct"]) for a in suite]).all(0)
        out[name] = {a: suite[a]["value"] for a in suite}
        out[name]["worst_case"] = float(worst.double().mean())
        out[name]["cpu_seconds"] = round(time.perf_counter() - start, 1)
        if name == "as it is":
            checks = evaluate.sanity_checks(m, x, y, pgd20=suite["pgd20"]["value"],
                                            autoattack=suite["autoattack"]["value"])
            out["sanity_as_it_is"] = {k: {"passed": c["passed"], "detail": c["detail"]}
                                      for k, c in checks.items()}
    return out


def measure(n: int = 1000, n_attacked: int = 100) -> dict:
    """The check on every tutorial checkpoint and the two controls, on the first ``n`` test
    images (float32 in [0, 1], CPU), and what the green rounding hides on the first
    ``n_attacked``."""
    manifest = json.loads((results.default_root().parent / "checkpoints" /
                           "manifest.json").read_text())
    cifar = data.load_cifar10()
    x, y = data.to_float(cifar.x_test[:n]), cifar.y_test[:n]
    models, rows = {}, {}
    for entry in manifest["checkpoints"]:
        model, _, entry = results.load_tutorial_checkpoint(entry["method"])
        models[entry["method"]] = model.float().eval()
        rows[entry["method"]] = {"checkpoint": entry["file"], "sha256": entry["sha256"]}
    controls = {"pgd_at, green channel rounded (control)": ("pgd_at", RoundedGreen),
                "standard, logits x 10,000 (control)": ("standard", ScaledLogits)}
    for name, (method, wrapper) in controls.items():
        if method in models:
            models[name] = wrapper(models[method]).eval()
            rows[name] = {"checkpoint": rows[method]["checkpoint"], "control": True}
    for name, model in models.items():
        start = time.perf_counter()
        rows[name].update(evaluate.check_zero_gradients(model, x, y, evaluate.EVAL_EPS))
        rows[name]["cpu_seconds"] = round(time.perf_counter() - start, 1)
    masked = hidden(models["pgd_at"], x[:n_attacked], y[:n_attacked]) if "pgd_at" in models \
        else None
    return {
        "what": "sanity check 5 (evaluate.check_zero_gradients: the share of input coordinates "
                "whose attack gradient, of the cross-entropy and of the margin, is exactly zero, "
                "at each image and at one random start in its eps-ball) on the committed "
                "tutorial checkpoints, whose runs were evaluated before the check existed, and "
                "on two controls whose gradients vanish by construction",
        "command": "python benchmarks/zero_gradients.py",
        "data": f"{cifar.label}, the first {n} test images",
        "n": n, "eps": evaluate.EVAL_EPS, "seed": 0,
        "max_share": evaluate.MAX_ZERO_GRADIENT_SHARE,
        "weights": "the checkpoints' float16 weights, run in float32 (IEEE)",
        **provenance.describe("cpu"),
        "note": "cpu_seconds are this CPU's, for scale only",
        "results": rows,
        "partial_masking": masked and {
            "what": "the pgd_at checkpoint with its green channel rounded inside the model: "
                    "accuracies (eps 8/255, the protocol's attacks, seeds as evaluate_suite's) "
                    "as it is and through BPDA, the worst case per image over each one's "
                    "attacks, and the sanity checks (1,000 Square queries) on it as it is",
            "n": n_attacked, **masked},
    }


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    result = measure()
    checkpoint.write_json(path, result)
    for name, row in result["results"].items():
        print(f"{'PASS' if row['passed'] else 'FAIL'}  {name}: {row['detail']}")
    print(f"wrote {path}")
