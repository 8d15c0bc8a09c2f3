"""anchor_lib.checkpoint: atomic writes, sha256 sidecars, weights_only loads, RNG round trips."""

from __future__ import annotations

import json
import random
import re
from functools import partial

import numpy as np
import pytest
import torch

from anchor_lib import checkpoint, cli


def test_save_load_round_trip_with_sidecar(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save({"model": {"w": torch.arange(4.0)}, "epoch": 3}, path)
    assert (tmp_path / "ck.pt.sha256").read_text().split()[0] == checkpoint.sha256_file(path)
    state = checkpoint.load(path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.arange(4.0))
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar", "missing"])
def test_damaged_checkpoint_names_the_file(tmp_path, damage):
    path = tmp_path / "ck.pt"
    checkpoint.save({"model": {"w": torch.randn(100)}}, path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        path.write_bytes(raw[:50] + bytes([raw[50] ^ 0xFF]) + raw[51:])
    elif damage == "no_sidecar":
        (tmp_path / "ck.pt.sha256").unlink()
    else:
        path.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="ck.pt"):
        checkpoint.load(path)


def test_unverified_garbage_still_gives_a_clear_error(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"garbage" * 10)
    checkpoint.write_sidecar(path)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint .*junk.pt"):
        checkpoint.load(path)


def test_weights_only_refuses_code(tmp_path):
    """A pickle that would run code on load is rejected, even with a matching hash."""
    path = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": {}, "payload": Evil()}, path)
    checkpoint.write_sidecar(path)
    with pytest.raises(checkpoint.CheckpointError, match="evil.pt"):
        checkpoint.load(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    checkpoint.save({"something": 1}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not an anchor_lib checkpoint"):
        checkpoint.load(path)


def test_json_artifact_atomic_and_verifiable(tmp_path):
    path = checkpoint.write_json(tmp_path / "m.json", {"a": 1})
    checkpoint.verify(path)
    path.write_text('{"a": 2}\n')
    with pytest.raises(checkpoint.CheckpointError, match="m.json"):
        checkpoint.verify(path)


def test_rng_state_round_trip_and_weights_only(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    state = checkpoint.rng_state()
    checkpoint.save({"model": {}, "rng": state}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_load_without_hash_check(tmp_path):
    """``verify_hash=False`` loads a file that has no sidecar, and still names a missing one."""
    path = tmp_path / "ck.pt"
    checkpoint.save({"model": {"w": torch.ones(2)}}, path)
    (tmp_path / "ck.pt.sha256").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no ck.pt.sha256"):
        checkpoint.load(path)
    assert torch.equal(checkpoint.load(path, verify_hash=False)["model"]["w"], torch.ones(2))
    with pytest.raises(checkpoint.CheckpointError, match="gone.pt does not exist"):
        checkpoint.load(tmp_path / "gone.pt", verify_hash=False)


def test_writes_create_missing_folders(tmp_path):
    """A run's first artifact goes into folders that do not exist yet (data/results/<run>/...)."""
    path = checkpoint.write_text(tmp_path / "results" / "run" / "history.csv", "epoch\n1\n")
    assert path.read_text() == "epoch\n1\n"
    checkpoint.verify(path)


def test_write_json_keeps_the_key_order(tmp_path):
    """metrics.json reads in the order it was built (DESIGN §6), indented, one trailing newline."""
    obj = {"run": "x", "accuracy": {"pgd20": 0.4, "clean": 0.8}, "epochs": 2}
    path = checkpoint.write_json(tmp_path / "m.json", obj)
    text = path.read_text()
    assert text == json.dumps(obj, indent=2) + "\n"
    assert list(json.loads(text)["accuracy"]) == ["pgd20", "clean"]


def test_read_json_verifies_and_wants_an_object(tmp_path):
    path = checkpoint.write_json(tmp_path / "m.json", {"a": [1, 2]})
    assert checkpoint.read_json(path) == {"a": [1, 2]}
    path.write_text('{"a": [1, 3]}')  # edited after its hash was written
    with pytest.raises(checkpoint.CheckpointError, match="m.json is corrupted"):
        checkpoint.read_json(path)
    assert checkpoint.read_json(path, verify_hash=False) == {"a": [1, 3]}


@pytest.mark.bad_input
@pytest.mark.parametrize("content,match", [
    (b"[1, 2]", "should hold a JSON object, not a list"),
    (b'"text"', "should hold a JSON object, not a str"),
    (b"null", "should hold a JSON object, not a NoneType"),
    (b'{"a": ', "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    (None, "does not exist"),
])
@pytest.mark.parametrize("verify_hash", [True, False])
def test_read_json_refuses_what_is_no_json_object(tmp_path, content, match, verify_hash):
    path = tmp_path / "m.json"
    if content is not None:
        checkpoint.atomic_write_bytes(path, content)  # its hash matches: only the kind is wrong
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.read_json(path, verify_hash=verify_hash)


@pytest.mark.bad_input
@pytest.mark.parametrize("holds,says", [
    (("best.pt", "checkpoint.pt"), "is a folder, not a checkpoint file; did you mean {run}/best.pt?"),
    (("checkpoint.pt",), "is a folder, not a checkpoint file; did you mean {run}/checkpoint.pt?"),
    (("other.pt", "history.csv"), "expected the path of a .pt file such as a run's best.pt or "
                                  "checkpoint.pt, and the folder holds no best.pt or checkpoint.pt "
                                  "but other.pt"),
    ((), "expected the path of a .pt file such as a run's best.pt or checkpoint.pt, and the folder "
         "holds no .pt file"),
])
def test_a_folder_given_as_checkpoint_is_called_one(tmp_path, capsys, holds, says):
    """``evaluate --checkpoint RUN`` (the run's folder, not a file in it) says so and names the
    checkpoint probably meant, rather than that RUN "does not exist"."""
    from anchor_lib.train import load_model

    run = tmp_path / "run"
    run.mkdir()
    for name in holds:
        checkpoint.save({"model": {}}, run / name)
    for load in (checkpoint.load, load_model, partial(checkpoint.load, verify_hash=False)):
        with pytest.raises(checkpoint.CheckpointError) as err:
            load(run)
        assert str(err.value).startswith(f"{run} is a folder") and says.format(run=run) in str(err.value)
        assert "does not exist" not in str(err.value)
    # The command line: one line, exit status 1.
    assert cli.main(["evaluate", "--checkpoint", str(run)]) == 1
    assert says.format(run=run) in capsys.readouterr().err
    # Another artifact's reader says it is a folder too, without checkpoint advice.
    folder = f"^{re.escape(str(run))} is a folder; expected a file$"
    with pytest.raises(checkpoint.CheckpointError, match=folder):
        checkpoint.read_json(run)


@pytest.mark.bad_input(cases=2)
def test_a_file_of_another_kind_with_a_valid_sidecar_is_no_checkpoint(tmp_path, capsys):
    """A run's history.csv verifies against its sidecar; loading it as a checkpoint used to end in
    the unpickler's "IndexError: pop from empty list"."""
    from anchor_lib.train import load_model

    history = checkpoint.write_text(tmp_path / "history.csv", "epoch,loss\n1,0.5\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    checkpoint.write_sidecar(empty)
    for path, came in ((history, "it starts with b'epoch,loss\\n1,0.5'"), (empty, "it is empty")):
        for load in (checkpoint.load, load_model):
            with pytest.raises(checkpoint.CheckpointError) as err:
                load(path)
            message = str(err.value)
            assert message.startswith(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint")
            assert "expected a file of torch.save" in message and came in message, message
            assert "IndexError" not in message and "pop from empty list" not in message
    assert cli.main(["evaluate", "--checkpoint", str(history)]) == 1
    said = capsys.readouterr().err
    assert f"error: cannot read checkpoint {history}: it is not a PyTorch checkpoint" in said


def test_both_formats_of_torch_save_still_load(tmp_path):
    """The format check lets through the zip archive (the default) and the older pickle format."""
    for name, zipped in (("zip.pt", True), ("pickle.pt", False)):
        torch.save({"model": {"w": torch.ones(2)}}, tmp_path / name,
                   _use_new_zipfile_serialization=zipped)
        checkpoint.write_sidecar(tmp_path / name)
        assert torch.equal(checkpoint.load(tmp_path / name)["model"]["w"], torch.ones(2))


# --------------------------------------------------------------------------------------------
# Failed writes, permissions, the up-front output check
# --------------------------------------------------------------------------------------------

def _leftovers(folder) -> list[str]:
    """Temporary files and sidecars in ``folder`` (what a failed write must not leave)."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".sha256")))


@pytest.mark.fault
def test_a_write_onto_a_folder_leaves_no_sidecar_and_names_the_path(tmp_path):
    """os.replace onto a folder fails after the sidecar was written: it used to stay behind, and
    the error named the temporary file."""
    folder = tmp_path / "metrics.json"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as err:
        checkpoint.write_json(folder, {"a": 1})
    assert err.value.filename == str(folder) and ".tmp" not in str(err.value)
    assert _leftovers(tmp_path) == [] and list(folder.iterdir()) == []


@pytest.mark.fault
def test_a_failed_replace_restores_the_sidecar_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Whatever makes the final rename fail, the file and its sidecar stay as they were: a new
    file loses its new sidecar, a replaced one keeps its old sidecar (not one listing a hash whose
    content never arrived)."""
    import os

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    checkpoint.write_json(old, {"v": 1})
    sidecar_before = (tmp_path / "old.json.sha256").read_bytes()
    real_replace = os.replace

    def failing(src, dst):
        if dst in (old, new):  # the file's own rename; the sidecar's renames go through
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    for path in (old, new):
        with pytest.raises(OSError, match="No space left"):
            checkpoint.write_json(path, {"v": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json", "old.json.sha256"]
    assert (tmp_path / "old.json.sha256").read_bytes() == sidecar_before
    assert checkpoint.read_json(old) == {"v": 1}


@pytest.mark.skipif(not hasattr(__import__("os"), "umask"), reason="needs POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=oct)
def test_artifacts_get_the_permissions_of_a_plain_open(tmp_path, umask):
    """Artifacts are renamed temporary files; mkstemp made them 0600 (unreadable to the rest of a
    team sharing a results folder). They get what open() gives: 0o666 less the umask."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        paths = [checkpoint.save({"model": {}}, tmp_path / "ck.pt"),
                 checkpoint.write_json(tmp_path / "m.json", {"a": 1}),
                 checkpoint.write_text(tmp_path / "h.csv", "epoch\n")]
        paths.append(checkpoint.write_text(tmp_path / "h.csv", "epoch\n1\n"))  # a replacement
    finally:
        os.umask(previous)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o666 & ~umask
    for path in {*paths, *(p.with_name(p.name + ".sha256") for p in paths)}:
        assert stat.S_IMODE(path.stat().st_mode) == plain, path.name
    assert _leftovers(tmp_path) == ["ck.pt.sha256", "h.csv.sha256", "m.json.sha256"]


def test_the_writers_temporary_files_are_recognised_as_stale(tmp_path):
    """remove_stale_temporaries knows the names atomic_write_bytes gives its temporary files."""
    import os

    fd, tmp = checkpoint._create_temporary(tmp_path / "checkpoint.pt")
    os.close(fd)
    assert checkpoint.remove_stale_temporaries(tmp_path) == [tmp_path / os.path.basename(tmp)]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.bad_input(cases=5)
def test_check_writable_names_what_and_the_path(tmp_path):
    a_file = tmp_path / "history.csv"
    a_file.write_text("epoch\n")
    (tmp_path / "run").mkdir()
    cases = [
        (dict(path=tmp_path / "run", kind="a JSON file", example="m.json"),
         f"--out {tmp_path / 'run'} is a folder; expected the path of a JSON file "
         f"(e.g. {tmp_path / 'run' / 'm.json'})"),
        (dict(path=a_file / "m.json"),
         f"--out {a_file / 'm.json'} cannot be written: expected {a_file} to be a folder, got a file"),
        (dict(path=a_file / "deeper" / "m.json"), f"expected {a_file} to be a folder, got a file"),
        (dict(path=a_file, folder=True), f"--out {a_file} is a file; expected a folder"),
        (dict(path=a_file / "run", folder=True), f"expected {a_file} to be a folder, got a file"),
    ]
    for kwargs, says in cases:
        with pytest.raises(ValueError) as err:
            checkpoint.check_writable(what="--out", **kwargs)
        assert says in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv", "run"]  # nothing made


@pytest.mark.bad_input
@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_check_writable_tries_rather_than_trusting_permission_bits(tmp_path):
    """/proc takes no new files, for root too (whom permission bits do not stop)."""
    with pytest.raises(ValueError, match=r"^out /proc/m\.json cannot be written: expected its "
                                         r"folder /proc to take new files"):
        checkpoint.check_writable("/proc/m.json", what="out")
    with pytest.raises(ValueError, match=r"^out_dir /proc/run cannot be written: expected the "
                                         r"folder /proc/run to exist or be creatable"):
        checkpoint.check_writable("/proc/run", what="out_dir", folder=True)


def test_check_writable_keeps_or_removes_the_folders_it_made(tmp_path):
    deep = tmp_path / "a" / "b"
    checkpoint.check_writable(deep / "m.json", keep_folders=False)
    assert list(tmp_path.iterdir()) == []  # nothing left, not even the folders
    checkpoint.check_writable(deep, folder=True, keep_folders=False)
    assert list(tmp_path.iterdir()) == []
    checkpoint.check_writable(deep / "m.json")  # the default keeps them, probe gone
    assert deep.is_dir() and list(deep.iterdir()) == []


@pytest.mark.bad_input
def test_a_model_entry_that_is_no_state_dict_is_refused(tmp_path):
    path = checkpoint.save({"model": [1, 2], "config": {}}, tmp_path / "ck.pt")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"ck\.pt is not an anchor_lib checkpoint: expected its 'model' entry "
                             r"to be a state_dict \(a dict of tensors\), got a list"):
        checkpoint.load(path)
