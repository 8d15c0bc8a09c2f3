"""The command line's contract (DESIGN §2): exit 0 on success, 2 on a usage error, 1 on any other
error with exactly one line on stderr and no traceback (``--debug`` shows it); kill -9 then
``--resume`` gives the uninterrupted run's weights bit for bit.

Most cases call ``anchor_lib.cli.main`` in this process (fast); the corrupted-checkpoint case and
the kill -9 case run ``python -m anchor_lib`` as a real process.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anchor_lib import checkpoint, cli, data
from anchor_lib.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]

#: A tiny PGD-AT run on synthetic data: 4 steps of 64 images per epoch, width-4 ResNet.
TINY_TRAIN = ["train", "--method", "pgd_at", "--data", "synthetic", "--profile", "smoke",
              "--width", "4", "--proj-dim", "16", "--train-subset", "256", "--val-size", "64",
              "--batch-size", "64", "--attack-steps", "2", "--val-attack-steps", "2", "--seed", "0",
              "--quiet"]


def run_cli(*argv: str | Path, capsys) -> tuple[int, str, str]:
    """``cli.main(argv)`` in this process; returns (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse (usage errors)
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def run_process(*argv: str | Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """``python -m anchor_lib argv`` as a real process (offline)."""
    return subprocess.run([sys.executable, "-m", "anchor_lib", *map(str, argv)], cwd=REPO,
                          env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _env(**extra: str) -> dict[str, str]:
    # As many threads as this process uses, so that its runs and a child's agree bit for bit.
    threads = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": threads, "ANCHOR_OFFLINE": "1", **extra}


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit 1, exactly one stderr line starting ``error:``, no traceback, naming ``fragments``."""
    lines = err.splitlines()
    assert code == 1, (code, err)
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not named in: {lines[0]}"
    return lines[0]


@pytest.fixture(autouse=True)
def _no_git(monkeypatch):
    # metrics.json names the commit; asking git here could meet another process's index lock.
    from anchor_lib import provenance

    monkeypatch.setattr(provenance, "git_commit", lambda: "0" * 40)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """best.pt of a one-epoch standard run on synthetic data (width 4)."""
    out = tmp_path_factory.mktemp("tiny-run")
    train(TrainConfig(method="standard", data="synthetic", width=4, proj_dim=16, epochs=1,
                      batch_size=64, train_subset=128, val_size=64, progress=False,
                      device="cpu", out_dir=str(out)))
    return out / "best.pt"


# --------------------------------------------------------------------------------------------
# Usage errors: exit 2
# --------------------------------------------------------------------------------------------

USAGE_ERRORS = {
    "no_command": [],
    "unknown_command": ["frobnicate"],
    "train_without_method": ["train"],
    "unknown_method": ["train", "--method", "magic"],
    "epochs_zero": ["train", "--method", "pgd_at", "--epochs", "0"],
    "epochs_negative": ["train", "--method", "pgd_at", "--epochs", "-3"],
    "epochs_not_a_number": ["train", "--method", "pgd_at", "--epochs", "two"],
    "unknown_profile": ["train", "--method", "pgd_at", "--profile", "huge"],
    "unknown_data": ["train", "--method", "pgd_at", "--data", "imagenet"],
    "resume_without_out": ["train", "--method", "pgd_at", "--resume"],
    "subset_below_batch": ["train", "--method", "pgd_at", "--batch-size", "64",
                           "--train-subset", "10"],
    "lr_negative": ["train", "--method", "pgd_at", "--lr", "-1"],
    "lr_nan": ["train", "--method", "pgd_at", "--lr", "nan"],
    "val_size_negative": ["train", "--method", "pgd_at", "--val-size", "-5"],
    "two_stage_without_contrast": ["train", "--method", "pgd_at", "--epochs", "4",
                                   "--pretrain-fraction", "0.5"],
    "two_stage_one_epoch": ["train", "--method", "anchor", "--epochs", "1",
                            "--pretrain-fraction", "0.5"],
    "unknown_attack": ["evaluate", "--checkpoint", "x.pt", "--attacks", "clean,pgd100"],
    "empty_attack_list": ["evaluate", "--checkpoint", "x.pt", "--attacks", ","],
    "n_zero": ["evaluate", "--checkpoint", "x.pt", "--n", "0"],
    "eval_batch_size_zero": ["evaluate", "--checkpoint", "x.pt", "--batch-size", "0"],
    "evaluate_without_checkpoint": ["evaluate"],
    "embed_without_out": ["embed", "--checkpoint", "x.pt"],
    "embed_unknown_space": ["embed", "--checkpoint", "x.pt", "--out", "e.npz", "--space", "pixels"],
    "unknown_reproduce_method": ["reproduce", "--methods", "magic"],
    "time_budget_zero": ["reproduce", "--time-budget", "0"],
    "unknown_search_precision": ["evaluate", "--checkpoint", "x.pt", "--search-precision", "bf16"],
    "tf32_search_without_pgd20": ["evaluate", "--checkpoint", "x.pt", "--attacks", "clean,cw",
                                  "--search-precision", "tf32"],
    "tf32_ablation_without_pgd20": ["reproduce", "--ablation", "--attacks", "clean",
                                    "--search-precision", "tf32"],
    "time_budget_not_a_number": ["reproduce", "--time-budget", "ten minutes"],
    "debug_after_unknown_option": ["train", "--method", "pgd_at", "--debgu"],
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_exit_2(case, capsys):
    code, out, err = run_cli(*USAGE_ERRORS[case], capsys=capsys)
    assert code == 2, (code, err)
    assert "usage:" in err and "error:" in err and "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize("argv", [
    ["evaluate", "--checkpoint", "x.pt", "--attacks", "pgd20,pgd20,pgd20"],
    ["evaluate", "--checkpoint", "x.pt", "--attacks", "clean, autoattack,autoattack"],
    ["reproduce", "--ablation", "--attacks", "clean,cw,clean"],
])
def test_an_attack_listed_twice_is_a_usage_error(argv, capsys, monkeypatch):
    """A repeated name would be measured again (hours for AutoAttack): refused as the options
    are parsed, before any checkpoint is read."""
    monkeypatch.setattr(cli, "run", lambda args: pytest.fail("the command ran"))
    code, out, err = run_cli(*argv, capsys=capsys)
    assert code == 2 and out == "" and "Traceback" not in err, (code, err)
    name = argv[-1].split(",")[-1]
    assert f"argument --attacks: attack '{name}' listed twice in" in err, err


def test_help_lists_the_tiny_run_options(capsys):
    code, out, _ = run_cli("train", "--help", capsys=capsys)
    assert code == 0
    for option in ("--width", "--proj-dim", "--batch-size", "--train-subset", "--val-size",
                   "--attack-steps", "--val-attack-steps", "--lr", "--resume", "--debug",
                   "--no-cuda-graphs", "--pretrain-fraction"):
        assert option in out


# --------------------------------------------------------------------------------------------
# Output paths: usage errors (exit 2) before any work
# --------------------------------------------------------------------------------------------

def _no_work(monkeypatch) -> None:
    """Every command's work replaced by a failure: a command that exits 2 with these did none."""
    from anchor_lib import reproduce
    from anchor_lib import train as train_module

    def no_work(*args, **kwargs):
        raise AssertionError("the command started its work")

    for module, name in ((reproduce, "evaluate_checkpoint"), (reproduce, "reproduce"),
                         (reproduce, "ablation"), (train_module, "train"),
                         (train_module, "load_model")):
        monkeypatch.setattr(module, name, no_work)


def _output_case(case: str, tmp: Path, ck: Path) -> tuple[list, str, Path, str]:
    """(argv, option, path given, what the error says) of one unusable output."""
    a_file, folder = tmp / "history.csv", tmp / "results"
    evaluate, embed = ["evaluate", "--checkpoint", ck], ["embed", "--checkpoint", ck]
    train_ = ["train", "--method", "standard", "--profile", "smoke", "--quiet"]
    return {
        "evaluate_out_is_a_folder": (
            [*evaluate, "--out", folder], "--out", folder,
            f"is a folder; expected the path of a JSON file (e.g. {folder / 'metrics.json'})"),
        "evaluate_out_under_a_file": (
            [*evaluate, "--out", a_file / "metrics.json"], "--out", a_file / "metrics.json",
            f"cannot be written: expected {a_file} to be a folder, got a file"),
        "evaluate_per_image_is_a_folder": (
            [*evaluate, "--per-image", folder], "--per-image", folder,
            "is a folder; expected the path of an npz file"),
        "evaluate_out_is_the_checkpoint": (
            [*evaluate, "--out", ck], "--out", ck, f"is --checkpoint {ck}; expected a path of its own"),
        "evaluate_out_is_the_checkpoints_sidecar": (
            [*evaluate, "--out", tmp / "best.pt.sha256"], "--out", tmp / "best.pt.sha256",
            f"is the sha256 sidecar of --checkpoint {ck}"),
        "evaluate_per_image_is_out": (
            [*evaluate, "--out", tmp / "m.json", "--per-image", tmp / "m.json"], "--out",
            tmp / "m.json", f"is --per-image {tmp / 'm.json'}"),
        "embed_out_is_the_checkpoint": (
            [*embed, "--out", ck], "--out", ck, f"is --checkpoint {ck}; expected a path of its own"),
        "embed_out_is_the_checkpoint_by_another_path": (
            [*embed, "--out", tmp / "results" / ".." / "best.pt"], "--out",
            tmp / "results" / ".." / "best.pt", f"is --checkpoint {ck}"),
        "embed_out_is_a_hard_link_to_the_checkpoint": (
            [*embed, "--out", tmp / "link.pt"], "--out", tmp / "link.pt", f"is --checkpoint {ck}"),
        "train_out_is_a_file": (
            [*train_, "--out", a_file], "--out", a_file, "is a file; expected a folder"),
        "train_out_under_a_file": (
            [*train_, "--out", a_file / "run"], "--out", a_file / "run",
            f"cannot be written: expected {a_file} to be a folder, got a file"),
        "reproduce_out_is_a_file": (
            ["reproduce", "--profile", "smoke", "--out", a_file], "--out", a_file,
            "is a file; expected a folder"),
        "reproduce_export_under_a_file": (
            ["reproduce", "--profile", "smoke", "--methods", "standard", "--out", folder,
             "--export-checkpoints", a_file / "ck"], "--export-checkpoints", a_file / "ck",
            f"expected {a_file} to be a folder, got a file"),
    }[case]


OUTPUT_CASES = ("evaluate_out_is_a_folder", "evaluate_out_under_a_file",
                "evaluate_per_image_is_a_folder", "evaluate_out_is_the_checkpoint",
                "evaluate_out_is_the_checkpoints_sidecar", "evaluate_per_image_is_out",
                "embed_out_is_the_checkpoint", "embed_out_is_the_checkpoint_by_another_path",
                "embed_out_is_a_hard_link_to_the_checkpoint", "train_out_is_a_file",
                "train_out_under_a_file", "reproduce_out_is_a_file", "reproduce_export_under_a_file")


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_an_unusable_output_is_a_usage_error_before_any_work(case, tiny_checkpoint, tmp_path,
                                                             capsys, monkeypatch):
    """evaluate --out <a folder> used to evaluate fully, then exit 1 naming a temporary file and
    leave a stray sidecar; embed --out <its checkpoint> replaced the checkpoint with embeddings
    (exit 0); train --out <unwritable> failed after the first epoch. Now: exit 2 at once, naming
    the option and the path, nothing written."""
    ck = tmp_path / "best.pt"
    ck.write_bytes(tiny_checkpoint.read_bytes())
    checkpoint.write_sidecar(ck)
    os.link(ck, tmp_path / "link.pt")
    (tmp_path / "history.csv").write_text("epoch\n")
    (tmp_path / "results").mkdir()
    argv, flag, path, says = _output_case(case, tmp_path, ck)
    before = _snapshot(tmp_path)
    _no_work(monkeypatch)
    code, out, err = run_cli(*argv, capsys=capsys)
    assert code == 2 and out == "" and "usage:" in err and "Traceback" not in err, (code, err)
    line = err.splitlines()[-1]
    assert line.startswith(f"python -m anchor_lib: error: {argv[0]}: {flag} {path} "), line
    assert says in line, line
    assert _snapshot(tmp_path) == before  # no sidecar, temporary file or folder made
    checkpoint.verify(ck)


@pytest.mark.bad_input
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["evaluate", "embed", "train"])
def test_an_output_in_a_folder_that_takes_no_files_is_a_usage_error(command, tmp_path, capsys,
                                                                     monkeypatch):
    """The writability check creates a file rather than reading permission bits (which root,
    as the tests run here, ignores): /proc takes no new files, for root too."""
    _no_work(monkeypatch)
    out = Path("/proc/anchor-out") if command == "train" else Path("/proc/metrics.json")
    argv = (["train", "--method", "standard", "--profile", "smoke"] if command == "train"
            else [command, "--checkpoint", tmp_path / "best.pt"])
    code, _, err = run_cli(*argv, "--out", out, capsys=capsys)
    assert code == 2 and f"error: {command}: --out {out} cannot be written: expected" in err, err


@pytest.mark.fault
def test_a_refused_or_failed_command_leaves_no_folders_from_the_output_check(tmp_path, capsys):
    """The check makes an output's missing folders to try them, and removes them again: a
    command that then fails (here: no checkpoint there) leaves nothing behind."""
    out = tmp_path / "new" / "deeper"
    code, _, err = run_cli("evaluate", "--checkpoint", tmp_path / "missing.pt", "--out",
                           out / "metrics.json", "--per-image", out / "per_image.npz",
                           capsys=capsys)
    assert_one_line_error(code, err, str(tmp_path / "missing.pt"))
    code, _, err = run_cli("embed", "--checkpoint", tmp_path / "missing.pt", "--out",
                           out / "e.npz", capsys=capsys)
    assert_one_line_error(code, err, str(tmp_path / "missing.pt"))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Checkpoints whose weights do not fit their config: one short line, exit 1
# --------------------------------------------------------------------------------------------

@pytest.mark.fault(cases=3)
def test_a_checkpoint_that_does_not_fit_is_one_short_line(tiny_checkpoint, tmp_path, capsys):
    """A width mismatch printed a 14 KB "line" of size mismatches, a checkpoint without its
    config "error: 'config'"."""
    state = checkpoint.load(tiny_checkpoint)  # width 4
    cases = {
        "wider.pt": ({**state, "config": {**state["config"], "width": 8}},
                     "its weights are width 4 but its config says width 8"),
        "no_config.pt": ({"model": state["model"]}, "has no 'config' entry"),
        "half_wrapped.pt": ({**state, "model": {("module." if i % 2 else "") + k: v
                                                for i, (k, v) in enumerate(state["model"].items())}},
                            "start with 'module.'"),
    }
    for name, (content, says) in cases.items():
        path = checkpoint.save(content, tmp_path / name)
        for argv in (["evaluate", "--checkpoint", path, "--attacks", "clean", "--n", "8"],
                     ["embed", "--checkpoint", path, "--out", tmp_path / "e.npz", "--n", "8"]):
            code, _, err = run_cli(*argv, capsys=capsys)
            line = assert_one_line_error(code, err, str(path), says)
            assert len(line) < 300, line
    assert not (tmp_path / "e.npz").exists()


def test_a_data_parallel_checkpoint_evaluates_as_the_plain_one(tiny_checkpoint, tmp_path, capsys):
    """Every key prefixed 'module.' (DistributedDataParallel / DataParallel): loaded without it
    (it used to end in "error: 'linear.weight'")."""
    state = checkpoint.load(tiny_checkpoint)
    wrapped = checkpoint.save({**state, "model": {"module." + k: v for k, v in state["model"].items()}},
                              tmp_path / "ddp.pt")
    accuracy = []
    for path in (tiny_checkpoint, wrapped):
        code, out, err = run_cli("evaluate", "--checkpoint", path, "--attacks", "clean", "--n", "16",
                                 capsys=capsys)
        assert code == 0, err
        accuracy.append(json.loads(out)["accuracy"]["clean"]["value"])
    assert accuracy[0] == accuracy[1]


# --------------------------------------------------------------------------------------------
# Failures: exit 1, one line, no traceback
# --------------------------------------------------------------------------------------------

def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "bit_flip":
        path.write_bytes(raw[:100] + bytes([raw[100] ^ 0x01]) + raw[101:])
    elif how == "no_sidecar":
        path.with_name(path.name + ".sha256").unlink()
    elif how == "garbage_with_matching_hash":
        path.write_bytes(b"\x00garbage" * 64)
        checkpoint.write_sidecar(path)
    elif how == "not_a_checkpoint":
        checkpoint.save({"weights": torch.zeros(3)}, path)
    elif how == "code_in_pickle":
        torch.save({"model": {}, "config": {}, "payload": _Evil()}, path)
        checkpoint.write_sidecar(path)
    elif how == "missing":
        path.unlink()
    elif how == "a_folder":
        path.unlink()
        path.mkdir()
    else:
        raise AssertionError(how)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


CHECKPOINT_FAULTS = ("truncated", "bit_flip", "no_sidecar", "garbage_with_matching_hash",
                     "not_a_checkpoint", "code_in_pickle", "missing", "a_folder")


@pytest.mark.fault
@pytest.mark.parametrize("how", CHECKPOINT_FAULTS)
def test_damaged_checkpoint_is_one_line_naming_the_file(how, tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "best.pt"
    path.write_bytes(tiny_checkpoint.read_bytes())
    checkpoint.write_sidecar(path)
    _damage(path, how)
    code, out, err = run_cli("evaluate", "--checkpoint", path, "--attacks", "clean", "--n", "8",
                             capsys=capsys)
    assert_one_line_error(code, err, str(path))
    assert "this must never run" not in out + err


@pytest.mark.fault
def test_corrupted_checkpoint_in_a_real_process(tiny_checkpoint, tmp_path):
    """The acceptance case as a user sees it: a real process, exit 1, one line, no traceback."""
    path = tmp_path / "best.pt"
    path.write_bytes(tiny_checkpoint.read_bytes()[:5000])  # truncated copy ...
    (tmp_path / "best.pt.sha256").write_bytes(
        tiny_checkpoint.with_name("best.pt.sha256").read_bytes())  # ... with the original hash
    result = run_process("evaluate", "--checkpoint", path, "--attacks", "clean", "--n", "8")
    line = assert_one_line_error(result.returncode, result.stderr, str(path))
    assert "corrupted or truncated" in line and result.stdout == ""


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where, capsys):
    missing = tmp_path / "nothing.pt"
    argv = ["evaluate", "--checkpoint", str(missing)]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(checkpoint.CheckpointError, match="nothing.pt"):
        cli.main(argv)  # re-raised: Python prints the traceback


@pytest.mark.fault
def test_interrupted_evaluate_leaves_no_metrics_then_reruns(tiny_checkpoint, tmp_path, capsys,
                                                            monkeypatch):
    from anchor_lib import evaluate

    out = tmp_path / "metrics.json"
    argv = ("evaluate", "--checkpoint", tiny_checkpoint, "--attacks", "clean,pgd20", "--n", "16",
            "--out", out)
    calls = []
    real = evaluate._correct

    def crash(model, x, y, attack, batch_size, search):  # clean is done; PGD-20 "crashes"
        if attack is None:
            return real(model, x, y, attack, batch_size, search)
        calls.append(1)
        raise RuntimeError("simulated crash in the middle of the evaluation")

    with monkeypatch.context() as m:
        m.setattr(evaluate, "_correct", crash)
        code, _, err = run_cli(*argv, capsys=capsys)
    assert calls and assert_one_line_error(code, err, "simulated crash")
    assert not out.exists() and not out.with_name("metrics.json.sha256").exists()

    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 0, err
    checkpoint.verify(out)
    metrics = json.loads(out.read_text())
    assert list(metrics["accuracy"]) == ["clean", "pgd20"]
    assert metrics["accuracy"]["pgd20"]["n"] == 16


def test_evaluate_per_image_writes_masks_that_match_the_metrics(tiny_checkpoint, tmp_path, capsys):
    from anchor_lib import results

    run = tmp_path / "mine"
    code, out, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--attacks", "clean,fgsm",
                             "--n", "16", "--out", run / "metrics.json",
                             "--per-image", run / "per_image.npz", capsys=capsys)
    assert code == 0, err
    checkpoint.verify(run / "per_image.npz")
    metrics = json.loads((run / "metrics.json").read_text())
    masks = results.load_per_image(run / "per_image.npz")
    assert set(masks) == {"clean", "fgsm", "meta"} and masks["meta"]["method"] == metrics["method"]
    for name in ("clean", "fgsm"):
        assert "correct" not in metrics["accuracy"][name]  # the JSON stays plain
        assert masks[name].mean() == metrics["accuracy"][name]["value"]
        assert masks[name].shape == (16,)


def test_evaluate_batch_size_is_used_and_recorded(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from anchor_lib import evaluate

    seen = []
    real = evaluate._correct

    def spy(model, x, y, attack, batch_size, search):
        if attack is not None:
            seen.append(batch_size)
        return real(model, x, y, attack, batch_size, search)

    monkeypatch.setattr(evaluate, "_correct", spy)
    values = {}
    for flag in ([], ["--batch-size", "8"]):
        out = tmp_path / f"metrics{len(flag)}.json"
        code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--attacks", "clean,fgsm",
                               "--n", "16", "--out", out, *flag, capsys=capsys)
        assert code == 0, err
        metrics = json.loads(out.read_text())
        values[metrics["eval_batch_size"]] = metrics["accuracy"]["clean"]["value"]
    assert seen == [evaluate.CPU_BATCH_SIZE, 8]  # the CPU default, then the flag
    assert set(values) == {evaluate.CPU_BATCH_SIZE, 8}
    assert len(set(values.values())) == 1  # clean accuracy does not depend on the batching


def test_embed_writes_the_space_it_was_asked_for(tiny_checkpoint, tmp_path, capsys):
    from anchor_lib import embeddings

    dims = {}
    for space in ("features", "projection"):
        out = tmp_path / f"{space}.npz"
        code, _, err = run_cli("embed", "--checkpoint", tiny_checkpoint, "--out", out, "--n", "8",
                               *(["--space", space] if space == "projection" else []),
                               capsys=capsys)
        assert code == 0, err
        emb = embeddings.load_embeddings(out)
        assert emb["meta"]["space"] == space and emb["clean"].shape[0] == emb["meta"]["n"] == 8
        dims[space] = emb["meta"]["dim"]
        # A PGD-AT model's projection head is untrained: said on stderr, and only for that space.
        assert ("never trains its projection head" in err) == (space == "projection"), err
    assert dims == {"features": 8 * 4, "projection": 16}  # width 4, proj_dim 16 (TINY_TRAIN)


def test_embed_records_how_many_images_it_embedded(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """--n beyond the test set embeds the whole test set, and meta.n says how many that was."""
    from anchor_lib import embeddings, train

    small = data.synthetic(n_train=64, n_test=12, size=32, seed=0)
    monkeypatch.setattr(train, "dataset_for", lambda cfg: small)
    code, out, err = run_cli("embed", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "e.npz",
                             "--n", "50", capsys=capsys)
    assert code == 0, err
    emb = embeddings.load_embeddings(tmp_path / "e.npz")
    assert emb["clean"].shape[0] == emb["meta"]["n"] == 12 and "(12 test images)" in out


@pytest.mark.fault
def test_keyboard_interrupt_is_one_line(tiny_checkpoint, capsys, monkeypatch):
    from anchor_lib import reproduce

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "evaluate_checkpoint", interrupted)
    code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, capsys=capsys)
    assert assert_one_line_error(code, err) == "error: interrupted"


@pytest.mark.fault
def test_diverging_training_stops_naming_epoch_and_step(tmp_path, capsys):
    """An absurd learning rate really diverges; the run stops with one line naming where."""
    code, _, err = run_cli(*TINY_TRAIN, "--epochs", "2", "--lr", "1e12", "--out", tmp_path,
                           capsys=capsys)
    line = assert_one_line_error(code, err, "non-finite training loss", "Lower the learning rate")
    assert re.search(r"at epoch 1, step [1-4]\b", line), line
    assert not (tmp_path / "checkpoint.pt").exists(), "no epoch finished, so nothing was saved"


# --------------------------------------------------------------------------------------------
# Data faults at the command line (the library level is in test_data.py)
# --------------------------------------------------------------------------------------------

def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _image_folder(root: Path, classes=data.CLASSES, splits=("train", "test")) -> Path:
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            (folder / "0000.jpg").write_bytes(_jpeg(100 * s + c))
    return root


def _data_fault(root: Path, fault: str) -> tuple[Path, str]:
    """Build a damaged data folder under ``root``; return (ANCHOR_DATA_DIR, text the error names)."""
    copy = root / "cifar10-jpeg"
    if fault == "nothing_there":
        root.mkdir(exist_ok=True)
        return root, str(root)
    if fault == "folder_does_not_exist":
        return root / "no-such-folder", str(root / "no-such-folder")
    if fault == "corrupt_jpeg":
        _image_folder(copy)
        bad = copy / "train" / "cat" / "0000.jpg"
        bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
        return copy, str(bad)
    if fault == "missing_class_folder":
        _image_folder(copy, classes=data.CLASSES[:-1])
        return copy, "truck"
    if fault == "half_extracted_no_test_split":
        _image_folder(copy, splits=("train",))
        return copy, f"{copy}: missing folder test/"
    if fault == "truncated_archive":
        folder = _image_folder(root / "src")
        archive = root / "data" / "cifar10-jpeg.tar.xz"
        archive.parent.mkdir()
        with tarfile.open(archive, "w:xz") as tar:
            for split in ("train", "test"):
                tar.add(folder / split, arcname=split)
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
        return archive.parent, str(archive)
    if fault == "damaged_pickle_batch":
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (base / name).write_bytes(b"\x80\x04 truncated pickle")
        return root, str(base / "data_batch_1")
    raise AssertionError(fault)


DATA_FAULTS = ("nothing_there", "folder_does_not_exist", "corrupt_jpeg", "missing_class_folder",
               "half_extracted_no_test_split", "truncated_archive", "damaged_pickle_batch")


@pytest.mark.fault
@pytest.mark.parametrize("fault", DATA_FAULTS)
def test_data_faults_are_one_line_naming_the_file(fault, tmp_path, capsys, monkeypatch):
    data_dir, named = _data_fault(tmp_path / "data-root", fault)
    monkeypatch.setenv("ANCHOR_DATA_DIR", str(data_dir))
    monkeypatch.setenv("ANCHOR_OFFLINE", "1")
    monkeypatch.setenv("ANCHOR_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = run_cli("train", "--method", "standard", "--data", "cifar10", "--profile", "smoke",
                           "--epochs", "1", "--quiet", capsys=capsys)
    line = assert_one_line_error(code, err, named)
    if fault in ("nothing_there", "folder_does_not_exist"):
        assert "CIFAR-10 not found" in line and "ANCHOR_DATA_DIR" in line and "ANCHOR_OFFLINE" in line


# --------------------------------------------------------------------------------------------
# kill -9, then --resume: bit for bit
# --------------------------------------------------------------------------------------------

def _rows(history_csv: Path) -> list[list[str]]:
    try:
        lines = history_csv.read_text().splitlines()
    except OSError:
        return []
    return [line.split(",") for line in lines[1:]]


@pytest.mark.fault
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_kill_9_mid_epoch_then_resume_is_bit_for_bit(tmp_path, capsys):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    argv = [*TINY_TRAIN, "--epochs", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "anchor_lib", *argv, "--out", str(killed)],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _rows(killed / "history.csv"):  # written right after epoch 1's checkpoint
            assert proc.poll() is None, f"training ended early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "epoch 1 never finished"
            time.sleep(0.02)
        epoch_seconds = float(_rows(killed / "history.csv")[0][8])
        time.sleep(0.4 * epoch_seconds)  # well inside epoch 2
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    state = checkpoint.load(killed / "checkpoint.pt")  # the last complete epoch, verified
    assert state["epoch"] < 2 and len(state["history"]) == state["epoch"] + 1

    code, _, err = run_cli(*argv, "--out", killed, "--resume", capsys=capsys)
    assert code == 0, err
    code, _, err = run_cli(*argv, "--out", reference, capsys=capsys)
    assert code == 0, err

    a = checkpoint.load(killed / "checkpoint.pt")
    b = checkpoint.load(reference / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different}"
    best_a, best_b = (checkpoint.load(d / "best.pt") for d in (killed, reference))
    assert best_a["epoch"] == best_b["epoch"]
    assert all(torch.equal(best_a["model"][k], best_b["model"][k]) for k in best_a["model"])
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b["history"]]
    assert len(_rows(killed / "history.csv")) == 3
    for name in ("checkpoint.pt", "best.pt", "history.csv"):
        checkpoint.verify(killed / name)


def test_train_compile_flag_reaches_the_config(monkeypatch):
    from anchor_lib import train as train_module

    seen = []
    monkeypatch.setattr(train_module, "train", lambda cfg, resume=False: seen.append(cfg) or [])
    assert cli.main(["train", "--method", "pgd_at", "--profile", "smoke", "--compile",
                     "--quiet"]) == 0
    assert cli.main(["train", "--method", "pgd_at", "--profile", "smoke", "--no-compile",
                     "--quiet"]) == 0
    assert cli.main(["train", "--method", "pgd_at", "--profile", "smoke", "--quiet"]) == 0
    # No flag: None, which train.use_compile resolves per device and profile.
    assert [cfg.compile for cfg in seen] == [True, False, None]


def test_resume_says_when_there_is_nothing_to_resume(monkeypatch, tmp_path, capsys):
    """--resume on a folder without checkpoint.pt trains from the start (reproduce relies on
    that), and the command line says so; with a checkpoint there it says nothing."""
    from anchor_lib import train as train_module

    seen = []
    monkeypatch.setattr(train_module, "train", lambda cfg, resume=False: seen.append(resume) or [])
    argv = ("train", "--method", "pgd_at", "--profile", "smoke", "--quiet", "--resume", "--out",
            tmp_path)
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 0 and err == (f"note: {tmp_path} holds no checkpoint.pt to resume from; "
                                 "starting a new run\n")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 0 and err == "" and seen == [True, True]


def test_the_readme_names_every_option_of_every_command():
    """The README's "Command line" section is where a reader looks an option up: none missing."""
    import argparse

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("## Command line")
    section = readme[start:readme.index("\n## ", start + 1)]
    commands = next(a for a in cli.build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    missing = {name: [o for a in parser._actions for o in a.option_strings
                      if o.startswith("--") and o not in ("--help", "--debug") and o not in section]
               for name, parser in commands.items()}
    assert set(commands) == {"train", "evaluate", "embed", "reproduce", "bench"}
    assert not any(missing.values()), missing



# --------------------------------------------------------------------------------------------
# What each command hands the library (the library calls replaced by recorders: no work done)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, named", [
    (["train", "--profile", "smoke"], "--method"),
    (["evaluate"], "--checkpoint"),
    (["embed", "--out", "e.npz"], "--checkpoint"),
    (["embed", "--checkpoint", "x.pt"], "--out"),
])
def test_a_missing_required_option_is_named_before_any_work(argv, named, capsys):
    code, out, err = run_cli(*argv, capsys=capsys)
    assert code == 2 and out == ""
    assert "the following arguments are required" in err and named in err.splitlines()[-1]


def test_documented_defaults_of_the_parser():
    parse = cli.build_parser().parse_args
    ev = parse(["evaluate", "--checkpoint", "x.pt"])
    assert (ev.attacks, ev.n, ev.autoattack_n, ev.sanity, ev.batch_size, ev.out, ev.search,
            ev.per_image) == (None, None, 1000, False, None, None, "fp32", None)
    em = parse(["embed", "--checkpoint", "x.pt", "--out", "e.npz"])
    assert (em.n, em.space) == (1000, "features")
    tr = parse(["train", "--method", "anchor"])
    assert (tr.profile, tr.cuda_graphs, tr.compile, tr.resume, tr.quiet) == (None, None, None,
                                                                             False, False)
    assert parse(["train", "--method", "anchor", "--no-cuda-graphs"]).cuda_graphs is False
    rp = parse(["reproduce"])
    assert (rp.profile, rp.methods, rp.out, rp.search, rp.sanity, rp.params, rp.attacks,
            rp.export_checkpoints, rp.ablation, rp.default_knobs) == (
        "full", list(cli.METHODS), Path("data/results"), "fp32", None, None, None, None, False,
        False)
    assert parse(["reproduce", "--ablation", "--no-sanity"]).sanity is False
    assert parse(["bench"]).tiny is False and parse(["bench"]).out is None


def test_train_prints_its_last_epoch_and_leaves_the_process_group(monkeypatch, capsys):
    from anchor_lib import distributed
    from anchor_lib import train as train_module

    teardowns, histories = [], [[{"epoch": e, "val_clean": e / 10} for e in (1, 2, 3)], []]
    monkeypatch.setattr(distributed, "teardown", lambda **kw: teardowns.append(kw))
    monkeypatch.setattr(train_module, "train", lambda cfg, resume=False: histories.pop(0))
    for epochs, last in ((3, {"epoch": 3, "val_clean": 0.3}), (0, {})):
        code, out, _ = run_cli("train", "--method", "pgd_at", "--profile", "smoke", "--quiet",
                               capsys=capsys)
        assert code == 0 and json.loads(out) == {"epochs": epochs, "last": last}
    assert teardowns == [{}, {}]  # with the barrier after a finished run

    def crash(cfg, resume=False):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(train_module, "train", crash)
    code, _, err = run_cli("train", "--method", "pgd_at", "--profile", "smoke", "--quiet",
                           capsys=capsys)
    assert_one_line_error(code, err, "simulated crash")
    assert teardowns[-1] == {"wait": False}  # a crashed process must not wait for the others


def test_export_checkpoints_gets_the_exportable_methods_and_refuses_none(monkeypatch, tmp_path,
                                                                          capsys):
    from anchor_lib import reproduce

    calls = []
    monkeypatch.setattr(reproduce, "reproduce", lambda *a, **k: calls.append(("reproduce", a)))
    monkeypatch.setattr(reproduce, "ablation", lambda *a, **k: calls.append(("ablation", a)))
    monkeypatch.setattr(reproduce, "export_tutorial_checkpoints",
                        lambda *a: calls.append(("export", a)) or tmp_path / "manifest.json")
    code, out, _ = run_cli("reproduce", "--profile", "tutorial", "--methods", "trades", "anchor",
                           "standard", "--out", tmp_path, "--export-checkpoints", tmp_path / "ck",
                           capsys=capsys)
    assert code == 0 and f"wrote {tmp_path / 'manifest.json'}" in out
    assert calls == [("reproduce", ("tutorial", ("trades", "anchor", "standard"), tmp_path)),
                     ("export", (tmp_path, tmp_path / "ck", ("standard", "anchor"), "tutorial"))]
    calls.clear()
    assert run_cli("reproduce", "--profile", "tutorial", "--methods", "pgd_at", "--out", tmp_path,
                   capsys=capsys)[0] == 0
    assert [name for name, _ in calls] == ["reproduce"]  # no export unless asked
    for argv in (["--methods", "trades", "supcon_at"], ["--ablation"]):
        calls.clear()
        code, out, err = run_cli("reproduce", "--profile", "tutorial", *argv,
                                 "--export-checkpoints", tmp_path / "ck", capsys=capsys)
        assert code == 2 and "--export-checkpoints needs a run of standard, pgd_at or anchor" in err
        assert calls == []  # refused before any training


@pytest.mark.parametrize("flag", [["--params", "beta"], ["--attacks", "clean"], ["--no-sanity"]])
def test_ablation_only_options_are_refused_without_ablation(flag, monkeypatch, capsys):
    from anchor_lib import reproduce

    calls = []
    monkeypatch.setattr(reproduce, "reproduce", lambda *a, **k: calls.append(a))
    code, _, err = run_cli("reproduce", "--profile", "smoke", *flag, capsys=capsys)
    assert code == 2 and f"{flag[0]} applies only with --ablation (" in err and calls == []
    # The other two ablation-only options are not named when only this one was given, and the
    # reason is this option's.
    assert not any(other in err.split("reproduce: ")[-1].split(" applies only")[0]
                   for other in ("--params", "--attacks", "--no-sanity") if other != flag[0])
    assert ("knobs the ablation varies" in err) == (flag[0] == "--params")
    code, _, err = run_cli("reproduce", "--profile", "smoke", "--params", "beta", "--no-sanity",
                           capsys=capsys)
    assert code == 2 and "--params, --no-sanity apply only with --ablation (it names the knobs " \
        "the ablation varies; the reproduction's runs get every attack" in err


def test_bench_passes_its_options_on(monkeypatch, tmp_path, capsys):
    from anchor_lib import bench

    calls = []
    monkeypatch.setattr(bench, "run_benchmark", lambda **kw: calls.append(kw) or tmp_path / "b.json")
    code, out, _ = run_cli("bench", "--tiny", "--out", tmp_path / "b.json", capsys=capsys)
    assert code == 0 and out == f"wrote {tmp_path / 'b.json'}\n"
    assert run_cli("bench", capsys=capsys)[0] == 0
    # Without --tiny the benchmark picks by itself (tiny on a CPU, the full sizes on a GPU).
    assert calls == [{"out": tmp_path / "b.json", "tiny": True,
                      "command": f"python -m anchor_lib bench --out {tmp_path / 'b.json'} --tiny"},
                     {"out": None, "tiny": None, "command": "python -m anchor_lib bench"}]


def test_one_line_joins_a_list_with_semicolons_and_keeps_its_punctuation():
    err = FileNotFoundError("no CIFAR-10 found; looked in:\n- /a/cifar\n  - /b/cifar.\n- /c/x:\n"
                            "\n- /d/last")
    assert cli.one_line(err) == "no CIFAR-10 found; looked in: /a/cifar; /b/cifar. /c/x: /d/last"
    # A line that merely starts with a dash (not "- ") is text, not a list item: no ";" added.
    assert cli.one_line(ValueError("first\n-5 is negative\nlast")) == "first -5 is negative last"
    assert cli.one_line(ValueError("tried:\n- a\n- b\n- c")) == "tried: a; b; c"
    assert cli.one_line(ValueError("")) == "ValueError"
    assert cli.one_line(ValueError("one line")) == "one line"
