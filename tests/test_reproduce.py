"""``anchor_lib.reproduce`` end to end at the smoke profile on synthetic data, trimmed to seconds:
the DESIGN §6 artifacts exist and verify, finished runs are skipped, and an interrupted
reproduction leaves no metrics.json that looks finished and completes when run again.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import time

import numpy as np
import pytest

from anchor_lib import checkpoint, data, embeddings, evaluate, provenance, results
from anchor_lib import reproduce as rep
from anchor_lib.train import TrainConfig

#: Every run: width-4 ResNet, 4 steps of 64 images, one epoch, 2-step attacks, on the CPU.
TINY = dict(data="synthetic", width=4, proj_dim=16, epochs=1, batch_size=64, train_subset=256,
            val_size=64, attack_steps=2, val_attack_steps=2, progress=False, device="cpu")
ATTACKS = ("clean", "pgd20")
METRICS_KEYS = ("method", "data", "hardware", "torch", "commit", "seed", "epochs", "train_seconds",
                "config", "accuracy", "sanity")


@pytest.fixture(autouse=True)
def _trimmed(monkeypatch):
    monkeypatch.setitem(rep.EVAL_SETTINGS, "smoke",
                        {"n": 48, "autoattack_n": 16, "sanity": False, "embed_n": 40})
    # Provenance without asking git (other work may hold the repository's index lock).
    monkeypatch.setattr(provenance, "git_commit", lambda: "0" * 40)


def _reproduce(out, methods=("anchor",), **kw):
    log: list[str] = []
    statuses = rep.reproduce("smoke", methods, out, attacks=ATTACKS, log=log.append, **TINY, **kw)
    # One status line per run; the runs with knobs first say where each knob's value came from.
    assert [line for line in log if " = " not in line] == [f"{s['run']}: {s['status']}"
                                                           for s in statuses]
    assert len(statuses) == len(methods)
    knob_lines = [line for line in log if " = " in line]
    assert len(knob_lines) == sum(m in rep.CHOSEN_KNOBS for m in methods)
    return statuses


def check_artifacts(run_dir, method: str) -> dict:
    """metrics.json, history.csv and embeddings.npz exist, verify and hold what DESIGN §6 says."""
    for name in ("metrics.json", "history.csv", "embeddings.npz", "checkpoint.pt", "best.pt"):
        checkpoint.verify(run_dir / name)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    missing = [k for k in METRICS_KEYS if k not in metrics]
    assert not missing, f"metrics.json lacks {missing}"
    assert metrics["method"] == method and metrics["data"] == "synthetic"
    assert metrics["seed"] == 0 and metrics["epochs"] == 1 and metrics["commit"] == "0" * 40
    assert metrics["train_seconds"] > 0
    assert metrics["train_step"] == "eager" and metrics["train_step_fallback"] is None  # CPU
    assert metrics["eval_batch_size"] == 500  # evaluate.CPU_BATCH_SIZE
    assert metrics["train_data"] == metrics["data"] == "synthetic"
    assert metrics["train_data_fingerprint"] == metrics["data_fingerprint"] \
        == data.synthetic(n_train=4000, n_test=1000).fingerprint  # what dataset_for loads
    # Who trained the selected weights: one process, one stretch of epochs, this commit.
    assert metrics["train_processes"] == 1
    assert [(s["first_epoch"], s["last_epoch"], s["commit"], s["processes"])
            for s in metrics["train_segments"]] == [(1, 1, "0" * 40, 1)]
    assert set(metrics["config"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert list(metrics["accuracy"]) == list(ATTACKS)
    for entry in metrics["accuracy"].values():
        assert set(entry) == {"value", "n", "seconds", "search"} and entry["search"] == "fp32"
        assert 0.0 <= entry["value"] <= 1.0 and entry["n"] == 48
    assert metrics["eval_search"] == "fp32" and metrics["eval_precision"] == evaluate.EVAL_PRECISION
    assert metrics["accuracy"]["pgd20"]["value"] <= metrics["accuracy"]["clean"]["value"]
    assert isinstance(metrics["sanity"], dict)
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1] and float(rows[0]["loss"]) > 0
    emb = embeddings.load_embeddings(run_dir / "embeddings.npz")
    assert emb["clean"].shape[0] == emb["adv"].shape[0] == emb["labels"].shape[0] == 40
    assert emb["meta"]["method"] == method
    # One mask per attack, whose mean is the accuracy metrics.json states.
    masks = results.load_per_image(run_dir / "per_image.npz")
    assert masks["meta"]["method"] == method and masks["meta"]["commit"] == "0" * 40
    for name, entry in metrics["accuracy"].items():
        assert masks[name].dtype == np.bool_ and masks[name].shape == (entry["n"],)
        assert masks[name].mean() == pytest.approx(entry["value"])
    assert not (masks["pgd20"] & ~masks["clean"]).any()  # robust implies clean-correct
    # And the selected epoch's validation masks, whose means are its validation accuracies.
    for key in results.VALIDATION_KEYS:
        assert masks[key].dtype == np.bool_ and masks[key].shape == (metrics["config"]["val_size"],)
        assert masks[key].mean() == pytest.approx(metrics["validation"][key], abs=1e-12)
    return metrics


def test_reproduce_writes_verified_artifacts_and_skips_finished_runs(tmp_path):
    start = time.perf_counter()
    statuses = _reproduce(tmp_path)
    elapsed = time.perf_counter() - start
    assert statuses[0]["run"] == "smoke-anchor" and statuses[0]["status"].startswith("done")
    first = check_artifacts(tmp_path / "smoke-anchor", "anchor")
    # The times are spans of this call, nested as the run's stages are.
    assert 0 < first["eval_seconds"] <= first["run_seconds"] <= elapsed + 0.01
    assert first["config"]["method"] == "anchor" and first["config"]["width"] == 4

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "smoke-anchor").iterdir()}
    again = _reproduce(tmp_path)
    assert again == [{"run": "smoke-anchor", "status": "skipped (finished)"}]
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "smoke-anchor").iterdir()}
    assert after == before, "a finished run is left untouched"


@pytest.mark.fault
def test_interrupted_reproduce_leaves_no_finished_metrics_then_completes(tmp_path, monkeypatch):
    run_dir = tmp_path / "smoke-pgd_at"
    calls = []
    real_suite = evaluate.evaluate_suite

    def crash(model, x, y, attacks, **kwargs):  # the clean accuracy is measured, then it dies
        calls.append(real_suite(model, x, y, attacks=("clean",), **kwargs))
        raise RuntimeError("simulated crash during the evaluation")

    with monkeypatch.context() as m:
        m.setattr(evaluate, "evaluate_suite", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _reproduce(tmp_path, methods=("pgd_at",))
    assert calls
    assert (run_dir / "best.pt").exists(), "training finished before the crash"
    assert not (run_dir / "metrics.json").exists(), "an interrupted run must not look finished"
    trained = checkpoint.load(run_dir / "checkpoint.pt")

    statuses = _reproduce(tmp_path, methods=("pgd_at",))
    assert statuses[0]["status"].startswith("done")
    check_artifacts(run_dir, "pgd_at")
    resumed = checkpoint.load(run_dir / "checkpoint.pt")
    assert resumed["history"] == trained["history"], "training was resumed, not redone"
    assert _reproduce(tmp_path, methods=("pgd_at",))[0]["status"] == "skipped (finished)"


@pytest.mark.fault
@pytest.mark.parametrize("damage", ["cut short", "not an object"])
def test_damaged_metrics_json_is_redone_not_trusted(tmp_path, damage):
    run_dir = tmp_path / "smoke-standard"
    _reproduce(tmp_path, methods=("standard",))
    metrics = run_dir / "metrics.json"
    if damage == "cut short":  # e.g. a copy cut short
        metrics.write_text(metrics.read_text()[:40])
    else:  # valid JSON whose hash matches, but no run's metrics
        checkpoint.write_json(metrics, [json.loads(metrics.read_text())])
    statuses = _reproduce(tmp_path, methods=("standard",))
    assert statuses[0]["status"].startswith("done")
    check_artifacts(run_dir, "standard")


@pytest.mark.bad_input
def test_a_finished_run_with_another_config_is_an_error_not_a_skip(tmp_path):
    _reproduce(tmp_path, methods=("standard",))
    before = (tmp_path / "smoke-standard" / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match=r"different config \(epochs\)"):
        rep.reproduce("smoke", ("standard",), tmp_path, attacks=ATTACKS, log=lambda _: None,
                      **{**TINY, "epochs": 2})
    assert (tmp_path / "smoke-standard" / "metrics.json").read_bytes() == before
    metrics = json.loads(before)
    assert metrics["eval_precision"].startswith("fp32")


@pytest.mark.fault
def test_a_finished_run_on_other_data_is_an_error_not_a_skip(tmp_path):
    """A run's folder is named by profile and method alone: skipping a run finished on another
    dataset would put its numbers under this call's data's name. Other images under the same
    label (another JPEG decoder on a GPU machine, say) are named in its status instead: an
    error there would stop a whole GPU slot at its first finished run."""
    _reproduce(tmp_path, methods=("standard",))
    before = (tmp_path / "smoke-standard" / "metrics.json").read_bytes()
    other = data.synthetic(n_train=4000, n_test=1000, seed=1)  # same label, other images
    relabelled = data.CIFAR10(other.x_train, other.y_train, other.x_test, other.y_test,
                              "CIFAR-10", "elsewhere")
    with pytest.raises(ValueError, match=r"is a finished run trained on synthetic, but this "
                                         r"call's data is CIFAR-10; point ANCHOR_DATA_DIR"):
        rep.reproduce("smoke", ("standard",), tmp_path, attacks=ATTACKS, log=lambda _: None,
                      dataset=relabelled, **TINY)
    status = rep.reproduce("smoke", ("standard",), tmp_path, attacks=ATTACKS, log=lambda _: None,
                           dataset=other, **TINY)[0]["status"]
    assert re.fullmatch(r"skipped \(finished\); trained on other images labelled synthetic "
                        r"\(fingerprint [0-9a-f]{12}, this call's [0-9a-f]{12}: another copy, or "
                        r"another JPEG decoder\)", status), status
    assert (tmp_path / "smoke-standard" / "metrics.json").read_bytes() == before
    # A run finished before fingerprints were recorded is judged by its data's label alone.
    metrics = json.loads(before)
    del metrics["train_data_fingerprint"]
    checkpoint.write_json(tmp_path / "smoke-standard" / "metrics.json", metrics)
    assert rep.reproduce("smoke", ("standard",), tmp_path, attacks=ATTACKS, log=lambda _: None,
                         dataset=other, **TINY)[0]["status"] == "skipped (finished)"


def test_a_finished_run_evaluated_with_less_says_so(tmp_path, monkeypatch):
    """A run finished with fewer attacks (a GPU slot's --attacks) or without the sanity checks
    is skipped, untouched, but its status names what a call that asks for more would lack, so
    that it never passes as a complete one."""
    _reproduce(tmp_path, methods=("standard",))
    before = (tmp_path / "smoke-standard" / "metrics.json").read_bytes()
    status = rep.reproduce("smoke", ("standard",), tmp_path, attacks=("clean", "fgsm", "pgd20"),
                           log=lambda _: None, **TINY)[0]["status"]
    assert status.startswith("skipped (finished) but evaluated without fgsm (evaluate its best.pt")
    monkeypatch.setitem(rep.EVAL_SETTINGS["smoke"], "sanity", True)
    status = rep.reproduce("smoke", ("standard",), tmp_path, attacks=ATTACKS, log=lambda _: None,
                           **TINY)[0]["status"]
    assert "evaluated without the sanity checks" in status
    assert (tmp_path / "smoke-standard" / "metrics.json").read_bytes() == before
    # Asking for no more than was measured is a plain skip.
    monkeypatch.setitem(rep.EVAL_SETTINGS["smoke"], "sanity", False)
    assert rep.reproduce("smoke", ("standard",), tmp_path, attacks=("clean",),
                         log=lambda _: None, **TINY)[0]["status"] == "skipped (finished)"


def test_a_finished_run_with_another_autoattack_configuration_says_so():
    """The runs evaluated before commit 6edb67a ran Square on torchattacks' rescaled schedule
    and recorded no autoattack_config: a call asking for AutoAttack names that in their status."""
    from anchor_lib import attacks

    measured = {"accuracy": {a: {"value": 0.5} for a in ("clean", "pgd20", "autoattack")}}
    lacks = rep._missing_evaluation(measured, ("clean", "pgd20", "autoattack"), sanity=False)
    assert lacks.startswith(" but evaluated without today's AutoAttack configuration")
    current = {**measured, "autoattack_config": attacks.autoattack_config()}
    assert rep._missing_evaluation(current, ("clean", "pgd20", "autoattack"), sanity=False) == ""
    older = {**current, "autoattack_config": {**current["autoattack_config"],
                                              "square_rescale_schedule": True}}
    assert "AutoAttack configuration" in rep._missing_evaluation(older, None, sanity=False)
    # Without AutoAttack asked for, its configuration does not matter.
    assert rep._missing_evaluation(measured, ("clean", "pgd20"), sanity=False) == ""


def test_a_finished_run_checked_before_the_later_checks_says_so():
    """The runs checked before evaluate.check_zero_gradients, check_gradient_signs and
    check_deterministic existed hold the other four checks: a call asking for the sanity checks
    names the ones they lack."""
    four = {"accuracy": {"clean": {"value": 0.5}},
            "sanity": dict.fromkeys(("more_steps", "eps_sweep", "black_box_weaker",
                                     "autoattack_gap"), {"passed": True})}
    assert rep._missing_evaluation(four, ("clean",), sanity=True) == (
        " but evaluated without the zero-gradient check (evaluate.check_zero_gradients), "
        "the gradient-sign check (evaluate.check_gradient_signs), the determinism check "
        "(evaluate.check_deterministic) (evaluate its best.pt with `python -m anchor_lib "
        "evaluate`, or move its folder away to run it again)")
    five = {**four, "sanity": {**four["sanity"], "zero_gradients": {"passed": True},
                               "gradient_signs": {"passed": True}}}
    assert rep._missing_evaluation(five, ("clean",), sanity=True) == (
        " but evaluated without the determinism check (evaluate.check_deterministic) "
        "(evaluate its best.pt with `python -m anchor_lib evaluate`, or move its folder away "
        "to run it again)")
    seven = {**five, "sanity": {**five["sanity"], "deterministic": {"passed": True}}}
    assert rep._missing_evaluation(seven, ("clean",), sanity=True) == ""
    assert rep._missing_evaluation(four, ("clean",), sanity=False) == ""


@pytest.mark.bad_input
@pytest.mark.parametrize("call, match", [
    (dict(profile="huge"), "profile must be one of"),
    (dict(methods=("anchor", "magic")), "unknown method"),
    (dict(width=0), "width must be an int >= 1"),
    (dict(lr=-1.0), "lr must be a finite number >= 0"),
    (dict(search="bf16"), "search must be one of fp32, tf32, got 'bf16'"),
])
def test_reproduce_rejects_bad_arguments(tmp_path, call, match):
    kw = {**TINY, **{k: v for k, v in call.items() if k not in ("profile", "methods")}}
    with pytest.raises(ValueError, match=match):
        rep.reproduce(call.get("profile", "smoke"), call.get("methods", ("anchor",)), tmp_path,
                      attacks=ATTACKS, log=lambda _: None, **kw)
    assert not any(tmp_path.iterdir()), "nothing is written for a rejected call"


def test_export_tutorial_checkpoints_writes_fp16_files_the_book_can_load(tmp_path):
    from anchor_lib import results

    _reproduce(tmp_path, methods=("standard", "anchor"))
    dest = tmp_path / "checkpoints"
    log: list[str] = []
    manifest_path = rep.export_tutorial_checkpoints(tmp_path, dest, ("standard", "anchor"), "smoke",
                                                    check_n=48, robust_check_n=48, log=log.append)
    checkpoint.verify(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    assert [e["method"] for e in manifest["checkpoints"]] == ["standard", "anchor"]
    assert manifest["profile"] == "smoke" and "--profile smoke --export" in manifest["note"]
    assert len(log) == 2
    for entry in manifest["checkpoints"]:
        path = dest / entry["file"]
        assert entry["sha256"] == checkpoint.sha256_file(path)
        assert entry["bytes"] == path.stat().st_size <= rep.TUTORIAL_MAX_BYTES
        state = checkpoint.load(path)
        floats = [v for v in state["model"].values() if v.is_floating_point()]
        assert floats and all(v.dtype.is_floating_point and v.element_size() == 2 for v in floats)
        metrics = json.loads((tmp_path / f"smoke-{entry['method']}" / "metrics.json").read_text())
        assert entry["accuracy"]["clean"] == metrics["accuracy"]["clean"]["value"]
        assert entry["clean_check"]["n"] == 48
        # fp16 rounding of the weights moves accuracy on 48 images by at most a few images.
        check = entry["clean_check"]
        assert abs(check["fp16_weights"] - check["fp32_weights"]) <= 3 / 48
        # The chapters attack the rounded weights: PGD-20 is measured with both (same starts).
        robust = entry["pgd20_check"]
        assert robust["n"] == 48 and robust["fp32_weights"] <= check["fp32_weights"]
        assert abs(robust["fp16_weights"] - robust["fp32_weights"]) <= 3 / 48
        model, state, found = results.load_tutorial_checkpoint(entry["method"], dest)
        assert found["file"] == entry["file"] and not model.training
        assert next(model.parameters()).dtype.is_floating_point

    # A second export of one method keeps the other's entry.
    rep.export_tutorial_checkpoints(tmp_path, dest, ("anchor",), "smoke", check_n=8, log=log.append)
    manifest = json.loads(manifest_path.read_text())
    assert [e["method"] for e in manifest["checkpoints"]] == ["standard", "anchor"]
    assert manifest["checkpoints"][1]["clean_check"]["n"] == 8
    assert manifest["checkpoints"][1]["pgd20_check"]["n"] == 8


@pytest.mark.bad_input
def test_export_refuses_unfinished_runs_and_oversized_checkpoints(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a finished run"):
        rep.export_tutorial_checkpoints(tmp_path, tmp_path / "c", ("anchor",), "smoke", check_n=8)
    _reproduce(tmp_path)
    monkeypatch.setattr(rep, "TUTORIAL_MAX_BYTES", 1000)
    with pytest.raises(ValueError, match=r"bytes, over the 1,000-byte limit"):
        rep.export_tutorial_checkpoints(tmp_path, tmp_path / "c", ("anchor",), "smoke", check_n=8)
    assert not list((tmp_path / "c").glob("*.pt")), "an oversized file is not left behind"


def test_tutorial_profile_is_full_protocol_at_width_16_but_not_a_reading_profile(monkeypatch):
    from anchor_lib import train

    cfg = TrainConfig.from_profile("tutorial", method="anchor")
    full = TrainConfig.from_profile("full", method="anchor")
    assert cfg.width == 16 and cfg.profile == "tutorial"
    differ = {f.name for f in dataclasses.fields(TrainConfig)
              if getattr(cfg, f.name) != getattr(full, f.name)}
    assert differ == {"width", "epochs", "profile"}
    monkeypatch.setenv("ANCHOR_PROFILE", "tutorial")
    with pytest.raises(ValueError, match="ANCHOR_PROFILE must be one of smoke, demo, full"):
        train.default_profile()


@pytest.mark.bad_input
def test_a_tf32_search_without_pgd20_is_refused_before_anything_trains(tmp_path):
    for call in (rep.reproduce, rep.ablation):
        with pytest.raises(ValueError, match="search 'tf32' needs pgd20 among the attacks"):
            call("smoke", out=tmp_path, attacks=("clean", "cw"), search="tf32",
                 log=lambda _: None, **TINY)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("search, gpu", [("fp32", False), ("tf32", False), ("tf32", True)])
def test_sanity_checks_compare_with_the_suites_own_pgd20(tmp_path, monkeypatch, search, gpu):
    """The AutoAttack-gap and black-box checks use the PGD-20 the report states for the same
    images (one draw of random starts), and metrics.json records AutoAttack's configuration and
    where the attacks searched."""
    from anchor_lib import attacks

    monkeypatch.setitem(rep.EVAL_SETTINGS, "smoke",
                        {"n": 48, "autoattack_n": 16, "sanity": True, "embed_n": 40})
    monkeypatch.setattr(attacks, "AUTOATTACK_ITERATIONS", 3)  # the call path, not the budget
    monkeypatch.setattr(attacks, "AUTOATTACK_SQUARE_QUERIES", 20)
    # gpu: as on a GPU with TF32 (here the flags change no arithmetic, so the check passes).
    monkeypatch.setattr(evaluate, "tf32_available", lambda device: gpu)
    rep.reproduce("smoke", ("pgd_at",), tmp_path, attacks=("clean", "pgd20", "autoattack"),
                  log=lambda *_: None, search=search, **TINY)
    run = tmp_path / "smoke-pgd_at"
    metrics = json.loads((run / "metrics.json").read_text())
    masks = results.load_per_image(run / "per_image.npz")
    first16 = float(masks["pgd20"][:16].mean())
    assert metrics["sanity"]["autoattack_gap"]["pgd20"] == pytest.approx(first16)
    assert metrics["sanity"]["black_box_weaker"]["pgd20"] == pytest.approx(first16)
    assert {check["n"] for check in metrics["sanity"].values()} == {16}  # AutoAttack's images
    assert metrics["autoattack_config"]["square_rescale_schedule"] is False
    used = "tf32" if search == "tf32" and gpu else "fp32"  # no TF32 hardware: plain fp32
    assert metrics["eval_search"] == search
    assert metrics["accuracy"]["autoattack"]["search"] == used
    assert metrics["eval_precision"] == evaluate.describe_precision(metrics["accuracy"])
    assert ("search of AutoAttack in TF32" in metrics["eval_precision"]) == (used == "tf32")
    assert ("tf32_check" in metrics["accuracy"]["pgd20"]) == (used == "tf32")


def test_evaluate_checkpoint_defaults_are_the_documented_ones(tmp_path, monkeypatch):
    """A bare evaluate_checkpoint(path): every attack, AutoAttack on the first 1,000, no sanity
    checks, no per-image masks in the result, an fp32 search, the test split of the data its
    config names, and the device's default batch."""
    import torch

    from anchor_lib.train import build_model

    cfg = TrainConfig(method="pgd_at", **{k: v for k, v in TINY.items() if k != "device"})
    model = build_model(cfg, 10)
    path = tmp_path / "best.pt"
    checkpoint.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "epoch": 0,
                     "history": [{"seconds": 1.25}, {"seconds": 2.5}]}, path)
    ds = data.synthetic(n_train=64, n_test=20, size=16, seed=0)
    monkeypatch.setattr(rep, "dataset_for", lambda c: ds if c.data == "synthetic" else None)
    seen = {}

    def fake_suite(model, x, y, *, attacks, autoattack_n, batch_size, per_image, search):
        seen.update(n=len(y), attacks=attacks, autoattack_n=autoattack_n, batch_size=batch_size,
                    search=search)
        return {a: {"value": 0.5, "n": len(y), "correct": np.ones(len(y), bool)} for a in attacks}

    monkeypatch.setattr(evaluate, "evaluate_suite", fake_suite)
    monkeypatch.setattr(evaluate, "sanity_checks",
                        lambda *a, **k: pytest.fail("the sanity checks ran by default"))
    start = time.perf_counter()
    metrics = rep.evaluate_checkpoint(path)
    assert 0 <= metrics["eval_seconds"] <= time.perf_counter() - start + 0.01
    assert metrics["train_seconds"] == 3.75  # the epochs' times the checkpoint carries
    assert seen == {"n": 20, "attacks": evaluate.ATTACKS, "autoattack_n": 1000,
                    "batch_size": evaluate.default_batch_size(torch.device("cpu")),
                    "search": "fp32"}
    assert metrics["sanity"] == {} and metrics["eval_search"] == "fp32"
    assert all("correct" not in e for e in metrics["accuracy"].values())
    assert metrics["data"] == ds.label and metrics["selected_epoch"] == 1
    # evaluate_model, for a model already loaded, has the same defaults.
    from anchor_lib.train import load_model

    seen.clear()
    again = rep.evaluate_model(*load_model(path))
    assert seen["autoattack_n"] == 1000 and seen["search"] == "fp32" and again["sanity"] == {}
    assert all("correct" not in e for e in again["accuracy"].values())


@pytest.mark.bad_input(cases=4)
def test_a_misspelt_or_repeated_attack_is_refused_before_anything_trains(tmp_path):
    for call in (rep.reproduce, rep.ablation):
        for attacks, message in ((("clean", "pgd21"), "unknown attack name"),
                                 (("pgd20", "pgd20"), "listed twice")):
            with pytest.raises(ValueError, match=message):
                call("smoke", out=tmp_path, attacks=attacks, log=lambda _: None, **TINY)
    assert not any(tmp_path.iterdir())


def test_reproduce_reports_the_selected_epoch_not_the_last(tmp_path, monkeypatch):
    """Everything a run reports is its selected epoch's (best.pt), not its last: the validation
    record, the test report and its per-image masks (image by image, in the test images' order),
    the embeddings and the exported checkpoint. Epoch 1 is made the best, so the two differ."""
    import torch

    from anchor_lib import train as train_module
    from anchor_lib.train import load_model

    real, calls = train_module.validate, []

    def first_epoch_is_best(model, cfg, x, y):  # epoch 1 scores 1.0: no later epoch beats it
        acc, masks = real(model, cfg, x, y)
        calls.append(1)
        if len(calls) == 1:
            acc["val_pgd"], masks["val_pgd"] = 1.0, torch.ones(len(y), dtype=torch.bool)
        return acc, masks

    monkeypatch.setattr(train_module, "validate", first_epoch_is_best)
    rep.reproduce("smoke", ("pgd_at",), tmp_path, attacks=ATTACKS, log=lambda _: None,
                  **{**TINY, "epochs": 2})
    run = tmp_path / "smoke-pgd_at"
    best, last = checkpoint.load(run / "best.pt"), checkpoint.load(run / "checkpoint.pt")
    assert (best["epoch"], last["epoch"]) == (0, 1)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selected_epoch"] == 1 and metrics["validation"] == best["val"]
    model, _ = load_model(run / "best.pt")
    ds = data.synthetic(n_train=4000, n_test=1000)  # what TINY's data="synthetic" loads
    x, y = data.to_float(ds.x_test[:48]), ds.y_test[:48]
    right = evaluate.correct(model, x, y).numpy()
    masks = results.load_per_image(run / "per_image.npz")
    assert (masks["clean"] == right).all()
    assert metrics["accuracy"]["clean"]["value"] == right.mean()
    emb = np.load(run / "embeddings.npz")
    with torch.no_grad():
        h = torch.nn.functional.normalize(model.features(x[:40]), dim=1).numpy()
    assert np.allclose(emb["clean"].astype(np.float32), h, atol=2e-3)  # stored as float16
    dest = rep.export_tutorial_checkpoints(tmp_path, tmp_path / "c", ("pgd_at",), "smoke",
                                           check_n=8, robust_check_n=8, log=lambda _: None)
    entry = json.loads(dest.read_text())["checkpoints"][0]
    exported = checkpoint.load(tmp_path / "c" / entry["file"])
    assert entry["selected_epoch"] == 1 and exported["epoch"] == 0
    assert all(torch.equal(exported["model"][k], v.half() if v.is_floating_point() else v)
               for k, v in best["model"].items())
