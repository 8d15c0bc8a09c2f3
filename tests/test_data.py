"""anchor_lib.data: resolution order, decoding, caching, faults, batches and augmentation."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anchor_lib import data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
CACHE = os.environ.get("ANCHOR_CACHE_DIR", "/tmp/anchor-test-cache")  # before fixtures change it


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_image_folder(root: Path, per_class: int = 2, classes=data.CLASSES) -> Path:
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (d / f"{i:04d}.jpg").write_bytes(_jpeg(hash((split, c, i)) % 2**32))
    return root


def make_tar(folder: Path, archive: Path, top: str = "") -> Path:
    """An xz archive of ``folder``'s train/ and test/, under a top-level folder ``top`` if given."""
    with tarfile.open(archive, "w:xz") as tar:
        for split in ("train", "test"):
            tar.add(folder / split, arcname=f"{top}/{split}" if top else split)
    return archive


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("ANCHOR_OFFLINE", "1")
    monkeypatch.setenv("ANCHOR_CACHE_DIR", str(tmp_path / "cache"))


def test_image_folder_is_decoded_and_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("ANCHOR_CACHE_DIR")  # unset: the cache goes next to a writable source
    root = make_image_folder(tmp_path / "copy-jpeg")
    d = data.load_cifar10(root)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.y_train.dtype == torch.int64 and sorted(d.y_train.tolist()) == sorted(
        list(range(10)) * 2)
    assert d.label == data.JPEG_COPY_LABEL
    assert list(root.glob(".anchor-cache-*.npz")), "decoded arrays are cached next to the source"
    again = data.load_cifar10(root)
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)


def test_labels_follow_class_folders_and_order_is_mixed(tmp_path):
    root = make_image_folder(tmp_path / "f", per_class=3)
    d = data.load_cifar10(root)
    for split_x, split_y, split in ((d.x_train, d.y_train, "train"), (d.x_test, d.y_test, "test")):
        for img, label in zip(split_x, split_y, strict=True):
            folder = root / split / data.CLASSES[label]
            decoded = [np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1)
                       for p in folder.glob("*.jpg")]
            assert any(np.array_equal(img.numpy(), ref) for ref in decoded)
    # Not sorted by class: the first ten test images cover more than one class.
    assert len(set(d.y_test[:10].tolist())) > 1


def test_read_only_source_caches_in_the_home_cache(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "src")
    root = tmp_path / "ro"
    root.mkdir()
    make_tar(folder, root / "cifar10-jpeg.tar.xz")
    monkeypatch.delenv("ANCHOR_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # No write bit: read-only by intent. CI runs as root, whom os.access lets write anyway,
    # so the mode itself has to count.
    root.chmod(0o555)
    try:
        d = data.load_cifar10(root)
    finally:
        root.chmod(0o755)
    assert d.x_test.shape[0] == 20
    assert not list(root.glob(".anchor-cache-*")), "nothing is written into a read-only source"
    assert list((tmp_path / "home" / ".cache" / "anchor_lib").glob(".anchor-cache-*.npz"))


def test_anchor_cache_dir_wins_over_a_writable_source(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "src")
    monkeypatch.setenv("ANCHOR_CACHE_DIR", str(tmp_path / "cache" / "new"))  # made as needed
    d = data.load_cifar10(root)
    assert d.x_test.shape[0] == 20
    assert not list(root.glob(".anchor-cache-*")), "an explicit cache folder is where it goes"
    assert list((tmp_path / "cache" / "new").glob(".anchor-cache-*.npz"))


def test_tar_archive_read_directly(tmp_path):
    folder = make_image_folder(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    make_tar(folder, root / "c.tar.xz")
    d = data.load_cifar10(root)
    from_folder = data.load_cifar10(folder)
    assert torch.equal(d.x_train, from_folder.x_train)
    # Only a copy named as the JPEG one is labelled as it: results must not claim the wrong data.
    assert d.label == "CIFAR-10 (ImageFolder copy)"
    jpeg_root = tmp_path / "jpeg-root"
    jpeg_root.mkdir()
    make_tar(folder, jpeg_root / "cifar10-jpeg.tar.xz")
    assert data.load_cifar10(jpeg_root).label == data.JPEG_COPY_LABEL
    # Under one top-level folder, and with a stray file beside the splits, it reads the same.
    (folder / "train" / "README.txt").write_text("not an image")
    nested = tmp_path / "nested"
    nested.mkdir()
    make_tar(folder, nested / "c.tar.xz", top="cifar10")
    assert torch.equal(data.load_cifar10(nested).x_train, from_folder.x_train)


def test_a_half_copied_folder_is_named_not_skipped(tmp_path):
    """train/ without test/ is a damaged copy: say so, rather than report no data at all."""
    import shutil

    root = make_image_folder(tmp_path / "f", per_class=1)
    shutil.rmtree(root / "test")
    with pytest.raises(ValueError, match="missing folder test/"):
        data.load_cifar10(root)


def test_the_dataset_is_immutable():
    d = data.synthetic(n_train=10, n_test=10)
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        d.label = "CIFAR-10"


def write_pickle_batches(base: Path, per_batch: int = 4) -> None:
    """torchvision's cifar-10-batches-py layout: five training batches and a test batch."""
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, per_batch))}
        (base / name).write_bytes(pickle.dumps(entry))


def test_pickle_batches(tmp_path):
    write_pickle_batches(tmp_path / "cifar-10-batches-py")
    d = data.load_cifar10(tmp_path)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.label == "CIFAR-10"


def test_missing_data_lists_where_it_looked(tmp_path):
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_cifar10(tmp_path / "nothing-here")
    message = str(info.value)
    assert "nothing-here" in message and "ANCHOR_DATA_DIR" in message
    assert "ANCHOR_OFFLINE" in message


def test_corrupt_jpeg_names_the_file(tmp_path):
    root = make_image_folder(tmp_path / "f", per_class=1)
    bad = root / "train" / "cat" / "0000.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=r"corrupt image .*cat/0000\.jpg"):
        data.load_cifar10(root)


def test_corrupt_jpeg_in_an_archive_names_the_member(tmp_path):
    root = make_image_folder(tmp_path / "f", per_class=1)
    (root / "train" / "dog" / "0000.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "a").mkdir()
    make_tar(root, tmp_path / "a" / "c.tar.xz")
    with pytest.raises(ValueError, match=r"corrupt image .*dog/0000\.jpg") as info:
        data.load_cifar10(tmp_path / "a")
    assert "truncated" not in str(info.value), "the archive is sound; one image in it is not"


def test_missing_class_folder_is_named(tmp_path):
    root = make_image_folder(tmp_path / "f", per_class=1, classes=data.CLASSES[:9])
    with pytest.raises(ValueError, match="truck"):
        data.load_cifar10(root)


def test_truncated_archive_is_named(tmp_path):
    folder = make_image_folder(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    archive = make_tar(folder, root / "c.tar.xz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"c\.tar\.xz"):
        data.load_cifar10(root)


def test_unreachable_network_fails_fast(tmp_path, monkeypatch):
    """With downloads allowed but no route to the internet, the error comes quickly."""
    import time

    import torchvision

    monkeypatch.delenv("ANCHOR_OFFLINE")

    def no_network(*args, **kwargs):
        raise OSError("network unreachable (simulated)")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    t0 = time.perf_counter()
    with pytest.raises(data.DataNotFoundError, match="download .* failed"):
        data.load_cifar10(tmp_path / "empty")
    assert time.perf_counter() - t0 < 5


def test_download_is_torchvisions_with_a_socket_timeout(tmp_path, monkeypatch):
    """The last resort: torchvision's download into the root, read back as pickle batches,
    with a socket timeout only while it runs."""
    import socket

    import torchvision

    monkeypatch.delenv("ANCHOR_OFFLINE")
    seen = []

    def fake_download(root, train, download):
        seen.append((root, train, download, socket.getdefaulttimeout()))
        write_pickle_batches(Path(root) / "cifar-10-batches-py")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    previous = socket.getdefaulttimeout()
    d = data.load_cifar10(tmp_path / "new" / "cifar")  # folders made as needed
    assert seen == [(str(tmp_path / "new" / "cifar"), True, True, data.DOWNLOAD_TIMEOUT_S)]
    assert socket.getdefaulttimeout() == previous
    assert d.label == "CIFAR-10" and d.x_train.shape == (20, 3, 32, 32)
    (tmp_path / "empty").mkdir()  # an existing, empty folder is fine too
    assert data.load_cifar10(tmp_path / "empty").label == "CIFAR-10"


def test_download_false_never_reaches_the_network(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.delenv("ANCHOR_OFFLINE")

    def refuse(*args, **kwargs):
        raise AssertionError("download=False tried to download")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", refuse)
    with pytest.raises(data.DataNotFoundError):
        data.load_cifar10(tmp_path / "empty", download=False)


def test_augment_shapes_range_and_determinism():
    x = data.synthetic(n_train=16, n_test=2).x_train
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = data.augment(x, g1), data.augment(x, g2)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)


def test_augment_is_a_crop_or_flip_of_the_padded_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) / (2 * 3 * 64)
    out = data.augment(x, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in crops)


def test_augment_default_is_the_standard_cifar_crop_and_flip():
    """Default: 4-pixel reflect padding, every one of the 9 x 9 crop offsets, a flip half the
    time. Each view is exactly one crop (or its mirror) of the padded image."""
    n, size = 600, 12
    x = (torch.arange(3 * size * size).reshape(1, 3, size, size) / (3 * size**2)).expand(n, -1, -1, -1)
    out = data.augment(x.contiguous(), torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x[:1], (4, 4, 4, 4), mode="reflect")[0]
    crops = torch.stack([padded[:, dy:dy + size, dx:dx + size] for dy in range(9) for dx in range(9)])
    plain = (out[:, None] == crops[None]).flatten(2).all(2)            # (n, 81)
    mirrored = (out[:, None] == crops[None].flip(-1)).flatten(2).all(2)
    assert ((plain | mirrored).sum(1) == 1).all(), "each view is one crop or its mirror"
    offsets = (plain | mirrored).float().argmax(1)
    assert set((offsets // 9).tolist()) == set(range(9)) == set((offsets % 9).tolist())
    assert 0.4 < mirrored.any(1).float().mean() < 0.6


def test_to_float_maps_0_255_onto_0_1():
    x = torch.tensor([0, 1, 128, 255], dtype=torch.uint8).view(1, 1, 2, 2)
    out = data.to_float(x)
    assert out.dtype == torch.float32 and out.device == x.device
    torch.testing.assert_close(out.flatten(), torch.tensor([0, 1, 128, 255]) / 255.0)
    assert x.dtype == torch.uint8 and x.max() == 255, "the input is left alone"


def test_to_float_refuses_what_is_not_uint8():
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"uint8 images in \[0, 255\], got dtype torch.float32.*"
                                         "already in"):
        data.to_float(x)
    assert x.max() > 0.004, "a float input is not divided in place"
    with pytest.raises(ValueError, match="got dtype torch.int32"):
        data.to_float(torch.zeros(1, 3, 4, 4, dtype=torch.int32))


def test_augment_keeps_a_float_dtype_and_refuses_other_integers():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    out = data.augment(x, g)
    assert out.dtype == torch.float64
    ref = data.augment(x.float(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.float(), ref)  # the same crops and flips, in float64
    with pytest.raises(ValueError, match="got dtype torch.int64"):
        data.augment(torch.zeros(2, 3, 8, 8, dtype=torch.int64))


def test_synthetic_labels_are_balanced_classes():
    d = data.synthetic(n_train=100, n_test=30, num_classes=5, size=8)
    assert torch.equal(d.y_train.bincount(), torch.full((5,), 20))
    assert torch.equal(d.y_test.bincount(), torch.full((5,), 6))
    assert d.x_train.shape == (100, 3, 8, 8) and d.x_train.dtype == torch.uint8
    assert data.synthetic().x_train.shape == (1000, 3, 32, 32)  # CIFAR-shaped by default
    assert d.x_train.min() == 0 and d.x_train.max() == 255, "pixels span the uint8 range"
    assert data.synthetic().x_test.shape == (200, 3, 32, 32)
    assert torch.equal(data.synthetic().y_train.bincount(), torch.full((10,), 100))  # ten classes


def test_batches_shuffle_by_default():
    x = torch.arange(64).view(64, 1, 1, 1).to(torch.uint8)
    y = torch.arange(64)
    order = torch.cat([yb for _, yb in data.batches(x, y, 16, generator=torch.Generator().manual_seed(0))])
    assert sorted(order.tolist()) == list(range(64)) and not torch.equal(order, y)
    in_order = torch.cat([yb for _, yb in data.batches(x, y, 16, shuffle=False)])
    assert torch.equal(in_order, y)


def test_batches_cover_the_data_once():
    x = torch.arange(10).view(10, 1, 1, 1).to(torch.uint8)
    y = torch.arange(10)
    seen = torch.cat([yb for _, yb in data.batches(x, y, 3, drop_last=False)])
    assert sorted(seen.tolist()) == list(range(10))
    assert sum(1 for _ in data.batches(x, y, 3)) == 3  # drop_last keeps shapes equal
    assert [len(yb) for _, yb in data.batches(x, y, 1)] == [1] * 10
    x100, y100 = torch.zeros(100, 1, 1, 1), torch.arange(100)
    assert [len(yb) for _, yb in data.batches(x100, y100, 3)] == [3] * 33
    with pytest.raises(ValueError, match="same length"):
        next(data.batches(x, y[:5], 3))


def test_train_val_split_is_fixed_and_disjoint():
    a_train, a_val = data.train_val_split(100, 10, seed=0)
    b_train, b_val = data.train_val_split(100, 10, seed=0)
    assert torch.equal(a_val, b_val) and len(a_val) == 10
    assert not set(a_train.tolist()) & set(a_val.tolist())
    with pytest.raises(ValueError, match="val_size"):
        data.train_val_split(10, 10)


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.xz").exists(),
                    reason="the shared CIFAR-10 JPEG copy is not beside this checkout")
def test_shared_jpeg_copy(monkeypatch):
    monkeypatch.setenv("ANCHOR_CACHE_DIR", CACHE)
    d = data.load_cifar10(SHARED)
    assert d.x_train.shape == (50000, 3, 32, 32) and d.x_test.shape == (10000, 3, 32, 32)
    assert torch.equal(d.y_train.bincount(), torch.full((10,), 5000))
    assert d.y_test[:1000].bincount().min() > 50, "the first 1,000 test images mix all classes"
    assert d.label == "CIFAR-10 (JPEG q75 copy)"


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.xz").exists(),
                    reason="the shared CIFAR-10 JPEG copy is not beside this checkout")
def test_model_normalisation_is_the_training_split_statistics(monkeypatch):
    # The model normalises its own input with these constants; a wrong one would still train,
    # only worse, so no other test notices. JPEG q75 smooths the images a little, which lowers
    # the standard deviations by about 0.002 against the original CIFAR-10's.
    from anchor_lib.models import CIFAR10_MEAN, CIFAR10_STD

    monkeypatch.setenv("ANCHOR_CACHE_DIR", CACHE)
    x = data.load_cifar10(SHARED).x_train
    channels = x.transpose(0, 1).reshape(3, -1).float() / 255
    assert torch.allclose(channels.mean(1), torch.tensor(CIFAR10_MEAN), atol=1e-3)
    assert torch.allclose(channels.std(1), torch.tensor(CIFAR10_STD), atol=3e-3)
