"""Does a faster evaluation precision give the protocol's answer? PGD-20 on one trained model, three ways.

DESIGN §4 evaluates in IEEE fp32 "unless a bf16 result is shown to agree within 0.2 points on the
same model". This script shows it, or shows that it does not hold, for one checkpoint: the same
seeded PGD-20 (eps 8/255, step 2/255, uniform random start, cross-entropy) on the same test images,
with the attack's forward and backward passes run

- ``fp32``: IEEE fp32, TF32 off (the protocol, :func:`anchor_lib.evaluate.full_precision`);
- ``tf32``: fp32 tensors, cuDNN and matmul in TF32 (PyTorch's default for convolutions), as
  the evaluation's TF32 search runs it (``evaluate.correct(..., search="tf32")``: images that
  only TF32 judged broken are attacked again in fp32; measured before that was added at commit
  30df15d);
- ``bf16``: bf16 autocast on a channels_last copy (the trainer's arithmetic).

Every variant judges its adversarial images with the fp32 model, so only the attack's arithmetic
differs. Reported per variant: robust accuracy, seconds (after a warm-up batch, device
synchronised), and against ``fp32``: the difference in points, how many images changed their
verdict, and whether it is within the 0.2-point rule.

``--autoattack K`` also runs AutoAttack on the first K test images twice, searched in fp32 and in
TF32 (as ``evaluate_suite(..., search="tf32")`` runs it, from the same seed), and compares them
image by image with ``evaluate.check_search_precision``: what the per-model PGD-20 check only
extrapolates to AutoAttack, measured. It costs about 250 s in fp32 on 1,000 images of a robust
model on an H100.

Usage (device machine): ``python benchmarks/eval_precision.py OUT.json CHECKPOINT [N]
[--autoattack K]``; N test images, default all 10,000. On a CPU the three variants run the same
fp32 arithmetic (autocast and TF32 are CUDA-only), which is what the tests check the plumbing with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from anchor_lib import checkpoint, data, evaluate, provenance
from anchor_lib.train import config_from_dict, dataset_for, load_model

#: DESIGN §4: a reduced-precision result counts only within this many points of fp32.
MAX_POINTS = evaluate.PRECISION_RULE_POINTS


def _attack(variant: str):
    """PGD-20 of the protocol; bf16 autocast for ``"bf16"`` (TF32 is ``correct``'s search)."""
    return partial(evaluate.standard_attacks()["pgd20"], amp=variant == "bf16")


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
            seed: int = 0) -> dict[str, Any]:
    """PGD-20 robust accuracy and seconds of each variant, and each one's agreement with fp32.

    Args:
        model: the trained model, on ``x``'s device (its mode and layout are restored).
        x: float ``(N, 3, 32, 32)`` test images in [0, 1]; y: int64 labels ``(N,)``.
        batch_size: images per attack call (the protocol's: 1,000 on a GPU).
        seed: the same random starts for every variant.
    """
    dev = x.device
    variants: dict[str, dict[str, Any]] = {}
    masks: dict[str, torch.Tensor] = {}
    for variant in ("fp32", "tf32", "bf16"):
        net = model
        if variant == "bf16" and dev.type == "cuda":
            net = model.to(memory_format=torch.channels_last)
        attack = _attack(variant)
        # TF32 as the evaluation uses it: the search in TF32, the verdicts in fp32, and the images
        # only TF32 judged broken attacked again in fp32.
        search = "tf32" if variant == "tf32" else "fp32"
        with evaluate.seeded(seed + 1, dev):  # a warm-up batch: cuDNN's and the allocator's set-up
            evaluate.correct(net, x[:batch_size], y[:batch_size], attack, batch_size,
                             search=search)
        evaluate.sync(dev)
        t0 = time.perf_counter()
        with evaluate.seeded(seed, dev):
            masks[variant] = evaluate.correct(net, x, y, attack, batch_size, search=search)
        evaluate.sync(dev)
        seconds = time.perf_counter() - t0
        model.to(memory_format=torch.contiguous_format)
        acc = masks[variant].float().mean().item()
        variants[variant] = {"accuracy": round(acc, 5), "seconds": round(seconds, 3)}
    for variant in ("tf32", "bf16"):
        points = 100 * (variants[variant]["accuracy"] - variants["fp32"]["accuracy"])
        variants[variant]["vs_fp32"] = {
            "points": round(points, 3),
            "images_changed": int((masks[variant] != masks["fp32"]).sum().item()),
            "within_rule": abs(points) <= MAX_POINTS + 1e-9,
            "speedup": round(variants["fp32"]["seconds"] / max(variants[variant]["seconds"], 1e-9), 2),
        }
    return variants


def autoattack_both_ways(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                         batch_size: int, seed: int = 0) -> dict[str, Any]:
    """AutoAttack's robust accuracy and seconds searched in fp32 and in TF32 on the same images
    from the same seed (verdicts in fp32), and the two compared image by image."""
    attack = evaluate.standard_attacks()["autoattack"]
    out: dict[str, Any] = {"n": len(y)}
    masks = {}
    for search in ("fp32", "tf32"):
        evaluate.sync(x.device)
        t0 = time.perf_counter()
        with evaluate.seeded(seed, x.device):
            masks[search] = evaluate.correct(model, x, y, attack, batch_size, search=search)
        evaluate.sync(x.device)
        out[search] = {"accuracy": round(masks[search].float().mean().item(), 5),
                       "seconds": round(time.perf_counter() - t0, 3)}
    check = evaluate.check_search_precision(masks["fp32"], masks["tf32"])
    out["tf32"]["vs_fp32"] = {**{k: check[k] for k in ("points", "images_changed",
                                                       "missed_by_tf32", "missed_by_fp32")},
                              "within_rule": check["passed"],
                              "speedup": round(out["fp32"]["seconds"]
                                               / max(out["tf32"]["seconds"], 1e-9), 2)}
    return out


def main(out: str, ckpt: str, n: str | None = None,
         autoattack_n: int | None = None) -> dict[str, Any]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, state = load_model(ckpt, dev)
    cfg = state.get("config") or {}
    dataset = dataset_for(config_from_dict(cfg))  # the images the model was trained for
    count = len(dataset.y_test) if n is None else int(n)
    if not 1 <= count <= len(dataset.y_test):
        raise ValueError(f"N must be between 1 and {len(dataset.y_test)} test images, got {count}")
    if autoattack_n is not None and not 1 <= autoattack_n <= count:
        raise ValueError(f"--autoattack must be between 1 and N = {count}, got {autoattack_n}")
    x = data.to_float(dataset.x_test[:count]).to(dev)
    y = dataset.y_test[:count].to(dev)
    batch = evaluate.default_batch_size(dev)
    report = {
        "what": "PGD-20 (eps 8/255, step 2/255, random start, CE) on one trained model, its passes "
                "in IEEE fp32 (the protocol), TF32 and bf16 autocast (channels_last); every "
                "verdict by the fp32 model",
        "rule": f"DESIGN §4: a reduced-precision result counts within {MAX_POINTS} points of fp32",
        **provenance.describe(dev),
        "data": dataset.label, "n": count, "batch_size": batch,
        "model": {"checkpoint": str(ckpt), "method": cfg.get("method"), "profile": cfg.get("profile"),
                  "width": cfg.get("width"), "selected_epoch": int(state.get("epoch", -1)) + 1},
        "when": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/eval_precision.py " + " ".join(sys.argv[1:]),
    }
    report["variants"] = measure(model, x, y, batch_size=batch)
    if autoattack_n:
        report["autoattack"] = autoattack_both_ways(model, x[:autoattack_n], y[:autoattack_n],
                                                    batch_size=batch)
    checkpoint.write_json(Path(out), report)
    print(json.dumps({k: report[k] for k in ("variants", "autoattack") if k in report}, indent=1))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("checkpoint")
    parser.add_argument("n", nargs="?", help="test images (default all)")
    parser.add_argument("--autoattack", type=int, metavar="K",
                        help="also AutoAttack on the first K images, fp32 against TF32 search")
    args = parser.parse_args()
    main(args.out, args.checkpoint, args.n, args.autoattack)
