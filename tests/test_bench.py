"""The speed benchmark stays runnable on CPU, and the fast path gives the reference's answers."""

from __future__ import annotations

import json

from anchor_lib import data
from anchor_lib.bench import run_benchmark, same_answers
from anchor_lib.train import TrainConfig


def test_tiny_benchmark_writes_design_json(tmp_path):
    path = run_benchmark(tmp_path / "bench.json", tiny=True, device="cpu",
                         settings={"n_images": 256, "batch_size": 32, "width": 4, "windows": 2,
                                   "window_steps": 1, "warmup_steps": 1, "eval_n": 32,
                                   "autoattack_n": 0})
    report = json.loads(path.read_text())
    assert report["configuration"].startswith("tiny")
    for key in ("device", "torch", "commit", "batch_size", "results", "peak_memory_gb"):
        assert key in report
    results = report["results"]
    for name in ("reference_pgd_at", "standard", "pgd_at", "anchor"):
        assert results[name]["epoch_seconds"] > 0 and results[name]["images_per_second"] > 0
    assert results["eval_pgd20_10k"]["seconds"] > 0 and "autoattack_1k" not in results
    # Standard training does no attack, so it must be faster than PGD-AT in the same run.
    assert results["standard"]["epoch_seconds"] < results["pgd_at"]["epoch_seconds"]


def test_fast_path_matches_reference_accuracy():
    """Same init and schedule: the fast pipeline learns as well as the plain reference loop.

    On this tiny task the two differ by more than sampling noise in *both* directions from seed
    to seed (the reference crafts its attack with BatchNorm in train mode), so the check is
    one-sided: the speed-ups must not cost accuracy.
    """
    dataset = data.synthetic(n_train=1024, n_test=256, size=16, noise=0.1, seed=1)
    cfg = TrainConfig(method="pgd_at", width=4, proj_dim=16, batch_size=64, lr=0.1,
                      attack_steps=2, eps=16 / 255, alpha=8 / 255, progress=False, device="cpu")
    result = same_answers(dataset, cfg, steps=64)
    for path in ("reference", "fast"):
        assert result[path]["clean"] > 0.5, result  # both actually learned something
    assert result["difference"]["clean"] >= -0.1, result
    assert result["difference"]["pgd10"] >= -0.1, result


def test_benchmark_says_why_it_skipped_the_answer_check(tmp_path, monkeypatch):
    """Without a CIFAR copy the same-answers stage is skipped with a reason, not silently."""
    monkeypatch.setenv("ANCHOR_DATA_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("ANCHOR_OFFLINE", "1")
    path = run_benchmark(tmp_path / "bench.json", tiny=True, device="cpu",
                         settings={"n_images": 128, "batch_size": 32, "width": 4, "windows": 1,
                                   "window_steps": 1, "warmup_steps": 0, "eval_n": 16,
                                   "autoattack_n": 0, "answers_steps": 2},
                         methods=("standard",))
    report = json.loads(path.read_text())
    assert "no CIFAR-10 copy could be loaded" in report["same_answers"]["skipped"]
    assert report["precision"]["reference"] == "fp32"
