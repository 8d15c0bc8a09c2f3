"""The artifacts committed under data/: intact, consistent with each other, and quoted faithfully.

GPU results arrive as files copied in by hand from a device machine (scripts/gpu_job.sh); these
tests catch a file damaged or mixed up on the way (a sidecar that no longer matches, a checkpoint
exported from another run than the metrics it claims, masks that disagree with their accuracies)
and a README that quotes numbers its files no longer hold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from anchor_lib import checkpoint, results
from anchor_lib.reproduce import TUTORIAL_MAX_BYTES

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
RESULTS = DATA / "results"
CHECKPOINTS = DATA / "checkpoints"


def committed_sidecars() -> list[Path]:
    return sorted(p for p in DATA.rglob("*.sha256") if "cache" not in p.relative_to(DATA).parts)


def test_every_committed_file_matches_its_sidecar():
    sidecars = committed_sidecars()
    assert sidecars, "no sha256 sidecars under data/: nothing is verified"
    for side in sidecars:
        checkpoint.verify(side.with_name(side.name.removesuffix(".sha256")))


def test_committed_runs_load_and_their_masks_match_their_accuracies():
    runs = results.load_results(RESULTS)
    if not runs:
        pytest.skip("no runs are committed under data/results/")
    for run in runs:
        assert run.verified, f"{run.name}: metrics.json has no sha256 sidecar"
        if not run.per_image_path.is_file():
            continue  # runs written before per_image.npz existed
        masks = results.load_per_image(run.per_image_path)
        for attack, entry in run.metrics["accuracy"].items():
            mask = masks[attack]
            assert mask.shape == (entry["n"],), (run.name, attack)
            assert mask.mean() == pytest.approx(entry["value"], abs=1e-12), (run.name, attack)
        # AutoAttack runs on the first images of the same order as the other attacks.
        if {"autoattack", "clean"} <= set(masks):
            n = len(masks["autoattack"])
            assert not (masks["autoattack"] & ~masks["clean"][:n]).any(), run.name


def test_tutorial_checkpoints_are_small_and_come_from_their_runs():
    manifest_path = CHECKPOINTS / "manifest.json"
    if not manifest_path.is_file():
        pytest.skip("no tutorial checkpoints are committed")
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["checkpoints"]:
        path = CHECKPOINTS / entry["file"]
        assert path.stat().st_size <= TUTORIAL_MAX_BYTES, path
        model, state, _ = results.load_tutorial_checkpoint(entry["method"], CHECKPOINTS)
        assert all(v.dtype == torch.float16 for v in state["model"].values()
                   if v.is_floating_point()), f"{path.name} is not an fp16 state_dict"
        # The manifest's accuracies are the run's own, from the same commit.
        run = results.load_run((REPO / entry["source"]).parent).metrics
        assert run["method"] == entry["method"] and run["commit"] == entry["commit"]
        assert {k: v["value"] for k, v in run["accuracy"].items()} == entry["accuracy"]
        assert run["config"]["width"] == entry["width"] == state["config"]["width"]
        logits = model(torch.rand(4, 3, 32, 32))
        assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def test_readme_quotes_the_committed_tutorial_results():
    """The README's table of tutorial results holds the numbers of the files, rounded."""
    rows = {line.split("|")[1].strip(): line for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("| ") and line.count("%") == 5}
    runs = {r.method: r for r in results.load_results(RESULTS) if r.metrics["profile"] == "tutorial"}
    if not runs:
        assert not rows, "the README quotes tutorial results, but none are committed"
        return
    quoted = 0
    for method, run in runs.items():
        label = results.METHOD_LABELS[method]
        line = next((line for name, line in rows.items() if name.split(" (")[0] == label
                     or name.lower() == method), None)
        assert line is not None, f"the README's results table has no row for {label}"
        numbers = [float(x) for x in re.findall(r"([\d.]+) %", line)]
        expected = [round(100 * run.metrics["accuracy"][a]["value"], 1)
                    for a in ("clean", "fgsm", "pgd20", "cw", "autoattack")]
        assert numbers == pytest.approx(expected, abs=0.051), (label, numbers, expected)
        quoted += 1
    assert quoted == len(rows), "the README quotes a run that is not committed"
