"""anchor_lib.compile_cache: what one GPU machine compiled, loaded on the next.

The GPU side (inductor's kernels) cannot run here; these tests stand in for PyTorch's two calls
and check the plumbing: when the file is read and written, once per process, atomically, and that
a broken cache never stops training. A real CPU run (aot_eager generates no kernels) checks that
the trainer's hooks are harmless where there is nothing to save.
"""

from __future__ import annotations

import pytest
import torch

from anchor_lib import compile_cache, train


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test as a new process: nothing loaded yet."""
    monkeypatch.setattr(compile_cache, "_loaded", set())


def test_nothing_happens_without_the_variable(monkeypatch):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    calls = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: calls.append("save"))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda b: calls.append("load"))
    assert compile_cache.path() is None
    assert compile_cache.load() is False and compile_cache.save() is None and calls == []


def test_save_then_load_once_per_process(tmp_path, monkeypatch):
    file = tmp_path / "gpu" / "compile-cache.bin"
    monkeypatch.setenv(compile_cache.ENV, str(file))
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    assert compile_cache.load() is False  # the first machine: no file yet
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"kernels", object()))
    assert compile_cache.save() == file and file.read_bytes() == b"kernels"
    monkeypatch.setattr(compile_cache, "_loaded", set())  # the next machine's process
    assert compile_cache.load() is True and loaded == [b"kernels"]
    assert compile_cache.load() is False and loaded == [b"kernels"]  # once per process
    # Nothing compiled (or a CPU backend): the file from the earlier machine stays.
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert compile_cache.save() is None and file.read_bytes() == b"kernels"
    assert [p.name for p in file.parent.iterdir()] == ["compile-cache.bin"]  # no temp files


def test_a_broken_cache_is_reported_and_ignored(tmp_path, monkeypatch):
    file = tmp_path / "compile-cache.bin"
    file.write_bytes(b"not a cache")
    monkeypatch.setenv(compile_cache.ENV, str(file))

    def refuse(_data):
        raise RuntimeError("bad magic number")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", refuse)
    with pytest.warns(RuntimeWarning, match=r"could not load .*compile-cache.bin "
                                            r"\(RuntimeError: bad magic number\); compiling"):
        assert compile_cache.load() is False

    def fail():
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", fail)
    with pytest.warns(RuntimeWarning, match="could not serialise.*disk full.*left as it was"):
        assert compile_cache.save() is None
    assert file.read_bytes() == b"not a cache"


def test_a_compiled_cpu_run_trains_with_the_cache_on(tmp_path, monkeypatch):
    file = tmp_path / "compile-cache.bin"
    monkeypatch.setenv(compile_cache.ENV, str(file))
    calls = []
    real_save = torch.compiler.save_cache_artifacts

    def counting_save():
        calls.append("save")
        return real_save()

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", counting_save)
    cfg = train.TrainConfig.from_profile("smoke", method="pgd_at", data="synthetic", epochs=2,
                                         compile=True, progress=False, width=4, batch_size=32,
                                         train_subset=64, val_size=32, attack_steps=2,
                                         val_attack_steps=1)
    history = train.train(cfg)
    assert len(history) == 2
    assert calls == ["save"]  # after the first epoch only: it compiled every pass
    assert not file.exists()  # aot_eager generates no kernels: nothing to carry
