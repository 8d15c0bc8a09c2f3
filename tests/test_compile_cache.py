"""anchor_lib.compile_cache: what one GPU machine compiled, loaded on the next.

The GPU side (inductor's kernels) cannot run here; these tests stand in for PyTorch's two calls
and check the plumbing: which files are read and written, once per process, that one process's
save never drops another's, the size cap, and that a broken cache never stops training. A real
CPU run (aot_eager generates no kernels) checks that the trainer's hooks are harmless where there
is nothing to save.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from anchor_lib import compile_cache, train


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test as a new process: nothing loaded yet."""
    monkeypatch.setattr(compile_cache, "_loaded", set())


class FakeCompiler:
    """PyTorch's two calls: ``load`` records what it was given, ``save`` returns ``blob``."""

    def __init__(self, monkeypatch):
        self.loaded: list[bytes] = []
        self.blob: bytes | None = None
        monkeypatch.setattr(torch.compiler, "load_cache_artifacts", self._load)
        monkeypatch.setattr(torch.compiler, "save_cache_artifacts", self._save)

    def _load(self, data: bytes):
        self.loaded.append(data)
        return object()  # a CacheInfo

    def _save(self):
        return None if self.blob is None else (self.blob, object())


def test_nothing_happens_without_the_variable(monkeypatch):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    fake = FakeCompiler(monkeypatch)
    fake.blob = b"kernels"
    assert compile_cache.folder() is None
    assert compile_cache.load() == 0 and compile_cache.save() is None and fake.loaded == []


def test_every_process_adds_its_own_file_and_the_next_loads_them_all(tmp_path, monkeypatch):
    where = tmp_path / "gpu" / "compile-cache"
    monkeypatch.setenv(compile_cache.ENV, str(where))
    fake = FakeCompiler(monkeypatch)
    assert compile_cache.load() == 0  # the first machine: no folder yet
    fake.blob = b"pgd_at kernels"  # one group of methods' process ...
    first = compile_cache.save()
    assert first.parent == where and first.read_bytes() == b"pgd_at kernels"
    monkeypatch.setattr(compile_cache, "_loaded", set())
    fake.blob = b"trades kernels"  # ... and the next one's, which must not drop the first's
    second = compile_cache.save()
    assert second != first and sorted(p.read_bytes() for p in where.iterdir()) == [
        b"pgd_at kernels", b"trades kernels"]
    assert compile_cache.save() == second and len(list(where.iterdir())) == 2  # same: no copy

    monkeypatch.setattr(compile_cache, "_loaded", set())  # the next machine's process
    assert compile_cache.load() == 2
    assert sorted(fake.loaded) == [b"pgd_at kernels", b"trades kernels"]
    assert compile_cache.load() == 0 and len(fake.loaded) == 2  # once per process
    fake.blob = None  # nothing compiled: the folder stays as it was
    assert compile_cache.save() is None and len(list(where.iterdir())) == 2


def test_the_oldest_files_go_beyond_the_size_cap(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    monkeypatch.setattr(compile_cache, "MAX_BYTES", 25)
    fake = FakeCompiler(monkeypatch)
    for i, blob in enumerate((b"a" * 10, b"b" * 10, b"c" * 10)):
        fake.blob = blob
        path = compile_cache.save()
        os.utime(path, (1000 + i, 1000 + i))  # distinct ages, oldest first
    assert sorted(p.read_bytes() for p in tmp_path.iterdir()) == [b"b" * 10, b"c" * 10]
    fake.blob = b"d" * 40  # larger than the cap alone: kept, everything older goes
    newest = compile_cache.save()
    assert list(tmp_path.iterdir()) == [newest]


def test_nothing_to_save_is_neither_a_file_nor_a_warning(tmp_path, monkeypatch):
    """A CPU run compiles no kernels: PyTorch then gives None or an empty blob."""
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    fake = FakeCompiler(monkeypatch)
    for blob in (None, b""):
        fake.blob = blob
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert compile_cache.save() is None
    assert list(tmp_path.iterdir()) == []


def test_a_folder_of_exactly_the_cap_keeps_every_file(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    monkeypatch.setattr(compile_cache, "MAX_BYTES", 20)
    fake = FakeCompiler(monkeypatch)
    for i, blob in enumerate((b"a" * 10, b"b" * 10)):
        fake.blob = blob
        os.utime(compile_cache.save(), (1000 + i, 1000 + i))
    assert sorted(p.read_bytes() for p in tmp_path.iterdir()) == [b"a" * 10, b"b" * 10]


def test_the_cap_fits_what_a_device_machine_sends_back():
    # Files of at most 16 MB come back from a GPU slot, and the working tree that travels there
    # is limited to 64 MB in all.
    assert 0 < compile_cache.MAX_BYTES <= 16_000_000


def test_a_broken_cache_is_reported_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    (tmp_path / "0-refused.bin").write_bytes(b"bad magic")
    (tmp_path / "1-unreadable.bin").write_bytes(b"not a cache")
    (tmp_path / "2-good.bin").write_bytes(b"kernels")
    for age, name in enumerate(("0-refused.bin", "1-unreadable.bin", "2-good.bin")):
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    loaded = []

    def load(data: bytes):
        if data == b"bad magic":
            raise RuntimeError("bad magic number")
        loaded.append(data)
        return None if data == b"not a cache" else object()

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", load)
    with pytest.warns(RuntimeWarning) as caught:
        assert compile_cache.load() == 1
    messages = [str(w.message) for w in caught]
    assert any("could not load" in m and "RuntimeError: bad magic number" in m for m in messages)
    assert any("1-unreadable.bin holds no cache PyTorch can read" in m for m in messages)
    assert loaded[-1] == b"kernels"

    def fail():
        raise OSError("No space left on device")

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", fail)
    with pytest.warns(RuntimeWarning, match="could not save.*No space left on device"):
        assert compile_cache.save() is None


def test_a_compiled_cpu_run_trains_with_the_cache_on(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cache"))
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
    assert calls == ["save", "save"]  # after the first epoch, and at the end
    assert not (tmp_path / "cache").exists()  # aot_eager generates no kernels: nothing to carry
