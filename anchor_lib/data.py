"""CIFAR-10 on the device: find it, decode it once, and serve augmented batches as tensor ops.

Resolution order (the README's "Data" section), inside ``ANCHOR_DATA_DIR`` if set, else the
repository's ``data/``:

1. torchvision's ``cifar-10-batches-py`` folder;
2. an ImageFolder copy, ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``, as a folder (directly
   there or one level down) or as a ``.tar.xz`` holding those folders;
3. torchvision's download (skipped when ``ANCHOR_OFFLINE=1``; bounded by a socket timeout so an
   unreachable network fails instead of hanging);
4. otherwise one ``FileNotFoundError`` that lists every place looked at and how to provide the data.

Decoded arrays are cached as ``.npz`` (uint8) in ``ANCHOR_CACHE_DIR`` when it is set, else next to
the source when that folder is writable (a folder without any write bit counts as read-only, even
for root), else in ``~/.cache/anchor_lib``; so JPEG decoding happens once.

:func:`load_cifar10` returns uint8 ``(N, 3, 32, 32)`` CPU tensors and int64 labels; the trainer
moves them to the GPU once (``train.load_run_data``; 150 MB for the training set); :func:`batches`
slices them and :func:`augment` turns a uint8 batch into a float view
in [0, 1] with random crop (4-pixel reflect padding) and horizontal flip, all on the device, with no
DataLoader and no host round trip.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import socket
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
JPEG_COPY_LABEL = "CIFAR-10 (JPEG q75 copy)"
DOWNLOAD_TIMEOUT_S = 20.0
CACHE_VERSION = 2  # bump when the decoded layout changes, so old caches are not reused
_REPO_DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class CIFAR10:
    """CIFAR-10 as uint8 tensors.

    Attributes:
        x_train: uint8 ``(N_train, 3, H, W)``; y_train: int64 ``(N_train,)`` in
            ``[0, num_classes)``; likewise x_test and y_test. CIFAR-10 itself has 50,000 and
            10,000 images of 32 x 32 and labels in [0, 9] (``CLASSES``);
            :func:`anchor_lib.data.synthetic` returns the same class with its own sizes and
            number of classes.
        label: how results on this copy are labelled, e.g. ``"CIFAR-10 (JPEG q75 copy)"``.
        source: where the data was read from.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    label: str
    source: str

    def to(self, device: torch.device | str) -> CIFAR10:
        """A copy whose tensors live on ``device`` (uint8 stays uint8)."""
        return CIFAR10(self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                       self.y_test.to(device), self.label, self.source)

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of every image and label, train and test, with their shapes.

        Tells two copies apart whatever their labels say (the JPEG copy and the original, a
        copy with one pixel changed), so that a run resumed, or a finished run skipped, on
        other data is refused rather than mixed. Computed once per object (about 0.5 s for
        CIFAR-10 on a CPU).
        """
        digest = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            t = t.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()


class DataNotFoundError(FileNotFoundError):
    """CIFAR-10 could not be found or fetched; the message says where we looked."""


def same_data(label: str | None, fingerprint: str | None, current_label: str,
              current_fingerprint: str) -> bool:
    """Whether data recorded as ``label`` and ``fingerprint`` (:attr:`CIFAR10.fingerprint`) is
    the current data. What was not recorded (None: files from before fingerprints) is not held
    against it, so such a file is judged by its label alone."""
    return (label is None or label == current_label) and (
        fingerprint is None or fingerprint == current_fingerprint)


def data_dir() -> Path:
    """The folder searched for data: ``$ANCHOR_DATA_DIR`` or the repository's ``data/``."""
    env = os.environ.get("ANCHOR_DATA_DIR")
    return Path(env).expanduser() if env else _REPO_DATA


def offline() -> bool:
    """True when ``ANCHOR_OFFLINE`` is set to a true value: never try to download."""
    return os.environ.get("ANCHOR_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_cifar10(root: str | Path | None = None, *, download: bool = True) -> CIFAR10:
    """Find, decode (once, cached) and return CIFAR-10 as uint8 CPU tensors.

    Args:
        root: folder to search; default :func:`data_dir`.
        download: allow torchvision's download as the last resort (never when ``ANCHOR_OFFLINE=1``).

    Raises:
        DataNotFoundError: nothing usable was found; the message lists where and how to fix it.
        ValueError: a copy was found but is damaged (names the file or folder).
    """
    root = Path(root).expanduser() if root is not None else data_dir()
    looked: list[str] = []

    for base in (root, root / "cifar-10-batches-py"):
        if (base / "data_batch_1").is_file():
            return _cached(base, "pickle", lambda b=base: _read_pickles(b), "CIFAR-10")
        looked.append(f"{base}/data_batch_1 (torchvision's cifar-10-batches-py)")

    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []:
        if (folder / "train").is_dir() or (folder / "test").is_dir():
            return _cached(folder, "folder", lambda f=folder: _read_image_folder(f), JPEG_COPY_LABEL
                           if "jpeg" in str(folder).lower() else "CIFAR-10 (ImageFolder copy)")
    looked.append(f"{root}/[<sub>/]train/<class>/*.jpg and test/<class>/*.jpg (ImageFolder)")

    archives = sorted(root.glob("*.tar.xz")) + sorted(root.glob("*/*.tar.xz")) if root.is_dir() else []
    for archive in archives:
        label = JPEG_COPY_LABEL if "jpeg" in archive.name.lower() else "CIFAR-10 (ImageFolder copy)"
        return _cached(archive, "tar", lambda a=archive: _read_tar(a), label)
    looked.append(f"{root}/*.tar.xz (an archive of train/ and test/)")

    if download and not offline():
        try:
            return _download(root)
        except OSError as err:  # URLError and socket timeouts are OSErrors
            looked.append(f"torchvision download into {root} failed: {err}")
    else:
        looked.append("torchvision download (skipped: ANCHOR_OFFLINE is set or download=False)")

    raise DataNotFoundError(
        "CIFAR-10 not found. Looked at:\n  - " + "\n  - ".join(looked) + "\n"
        "Provide it by one of: set ANCHOR_DATA_DIR to a folder holding cifar-10-batches-py/ or an "
        "ImageFolder copy (train/, test/ or a .tar.xz of them); or allow the download (unset "
        "ANCHOR_OFFLINE, have network access)."
    )


# --- decoding -----------------------------------------------------------------------------------


def _read_pickles(folder: Path) -> dict[str, np.ndarray]:
    def load(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            path = folder / name
            try:
                with open(path, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(entry["labels"], dtype=np.int64))
            except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
                raise ValueError(f"damaged CIFAR-10 batch file {path}: {err}") from err
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = load([f"data_batch_{i}" for i in range(1, 6)])
    x_test, y_test = load(["test_batch"])
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _decode_jpeg(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"corrupt image file {name}: {err}") from err
    if arr.shape != (32, 32, 3):
        raise ValueError(f"image {name} has shape {arr.shape}, expected 32x32 RGB")
    return arr.transpose(2, 0, 1)


def _assemble(items: dict[str, list[tuple[str, bytes]]], where: str) -> dict[str, np.ndarray]:
    """Decode ``{"train": [(relative path, bytes)], "test": [...]}`` into arrays, checking classes."""
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        entries = sorted(items.get(split, []))
        found = {Path(rel).parts[0] for rel, _ in entries}
        missing = [c for c in CLASSES if c not in found]
        if missing:
            raise ValueError(f"{where}: {split}/ lacks class folder(s) {', '.join(missing)} "
                             f"(expected {split}/<class>/*.jpg for all 10 CIFAR-10 classes; "
                             "a half-extracted archive looks like this)")
        xs = [_decode_jpeg(data, f"{where}/{split}/{rel}") for rel, data in entries]
        ys = [CLASSES.index(Path(rel).parts[0]) for rel, _ in entries]
        # Folder copies are sorted by class; a fixed shuffle makes "the first n test images" a
        # random sample, balanced in expectation as in the original release (the first 1,000,
        # AutoAttack's, hold 83 to 123 images per class), instead of one or two classes.
        order = np.random.default_rng(0).permutation(len(entries))
        out[f"x_{split}"] = np.stack(xs)[order]
        out[f"y_{split}"] = np.asarray(ys, dtype=np.int64)[order]
    return out


def _read_image_folder(folder: Path) -> dict[str, np.ndarray]:
    items: dict[str, list[tuple[str, bytes]]] = {}
    for split in ("train", "test"):
        split_dir = folder / split
        if not split_dir.is_dir():
            raise ValueError(f"{folder}: missing folder {split}/ (expected train/ and test/)")
        items[split] = [(str(p.relative_to(split_dir)), p.read_bytes())
                        for p in split_dir.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    return _assemble(items, str(folder))


def _read_tar(archive: Path) -> dict[str, np.ndarray]:
    items: dict[str, list[tuple[str, bytes]]] = {"train": [], "test": []}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = Path(member.name).parts
                # Accept train/<class>/x.jpg, possibly under one top-level folder.
                while parts and parts[0] not in ("train", "test"):
                    parts = parts[1:]
                if not member.isfile() or len(parts) != 3:
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    items[parts[0]].append(("/".join(parts[1:]), f.read()))
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"damaged or truncated archive {archive}: {err}") from err
    return _assemble(items, str(archive))  # decodes: a corrupt image is named there


def _download(root: Path) -> CIFAR10:
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous)
    base = root / "cifar-10-batches-py"
    return _cached(base, "pickle", lambda: _read_pickles(base), "CIFAR-10")


# --- cache --------------------------------------------------------------------------------------


def _cache_path(source: Path, kind: str) -> Path:
    stat = source.stat()
    key = hashlib.sha256(f"{CACHE_VERSION}|{source.resolve()}|{kind}|{stat.st_size}|"
                         f"{stat.st_mtime_ns}".encode())
    name = f".anchor-cache-{kind}-{key.hexdigest()[:16]}.npz"
    if os.environ.get("ANCHOR_CACHE_DIR"):  # an explicit choice wins over the default below
        return Path(os.environ["ANCHOR_CACHE_DIR"]).expanduser() / name
    parent = source.parent if source.is_file() else source
    if _writable(parent):
        return parent / name
    return Path("~/.cache/anchor_lib").expanduser() / name


def _writable(folder: Path) -> bool:
    """Whether ``folder`` is meant to be written into by this process.

    os.access answers yes to root for any folder, so a folder whose mode has no write bit at
    all (a shared, deliberately read-only copy) counts as read-only too.
    """
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return bool(mode & 0o222) and os.access(folder, os.W_OK)


def _cached(source: Path, kind: str, read, label: str) -> CIFAR10:
    path = _cache_path(source, kind)
    arrays = None
    if path.is_file():
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, ValueError, KeyError, EOFError):
            arrays = None  # a damaged cache is rebuilt from the source, never trusted
    if arrays is None:
        arrays = read()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic write: a killed process never leaves a half-written cache behind.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    return CIFAR10(t["x_train"], t["y_train"], t["x_test"], t["y_test"], label, str(source))


# --- synthetic data for tests and offline demos ------------------------------------------------


def synthetic(n_train: int = 1000, n_test: int = 200, *, num_classes: int = 10, size: int = 32,
              noise: float = 0.15, seed: int = 0) -> CIFAR10:
    """A learnable CIFAR-shaped stand-in: each class is a smooth random template plus noise.

    Returns uint8 ``(N, 3, size, size)`` images (N = ``n_train`` or ``n_test``) and int64 labels
    in ``[0, num_classes)``, balanced, labelled ``"synthetic"``; used by tests and when
    a chapter runs with no data at all. Templates are low-frequency so crops and flips keep them
    recognisable.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = templates[y] + noise * torch.randn(n, 3, size, size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    return CIFAR10(x_train, y_train, x_test, y_test, "synthetic", f"synthetic(seed={seed})")


# --- splits, batches and augmentation ----------------------------------------------------------


def train_val_split(n: int, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded split of ``range(n)`` into ``(train_idx, val_idx)``: int64 CPU tensors of
    shapes ``(n - val_size,)`` and ``(val_size,)``, disjoint, together a permutation of
    ``range(n)``. Raises ValueError unless ``0 <= val_size < n``.

    Both come in the permutation's (random) order, so their first k entries are a random,
    class-balanced-in-expectation subset even when the source is sorted by class.
    """
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images ``(N, C, H, W)`` in [0, 255] -> a new float32 tensor in [0, 1] (same device).

    Raises ValueError for any other dtype: a float tensor is already scaled (dividing it again
    would silently darken it), and wider integers are not 8-bit pixels.
    """
    if x.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images in [0, 255], got dtype {x.dtype}"
                         + (" (float images are already in [0, 1]: use them as they are)"
                            if x.is_floating_point() else ""))
    return x.float().div_(255.0)


def augment(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad``-pixel reflect padding and horizontal flip, as tensor ops.

    Args:
        x: uint8 images ``(N, C, H, W)`` in [0, 255], or float in [0, 1] (the range is not
            checked; another dtype raises ValueError).
        generator: a ``torch.Generator`` on x's device, for reproducible views.
        pad: the padding (and largest shift) in pixels, ``0 <= pad < min(H, W)``.

    Returns:
        ``(N, C, H, W)`` on x's device, float32 for uint8 input, else x's dtype; in [0, 1] for
        input in range.
    """
    if x.dtype == torch.uint8:
        xf = to_float(x)
    elif x.is_floating_point():
        xf = x  # kept in its dtype: a float64 caller gets float64 views
    else:
        raise ValueError(f"augment expects uint8 images in [0, 255] or float images in [0, 1], "
                         f"got dtype {x.dtype}")
    n, c, h, w = xf.shape
    padded = F.pad(xf, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded.gather(2, rows.expand(n, c, h, w + 2 * pad)).gather(3, cols.expand(n, c, h, w))
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
            generator: torch.Generator | None = None,
            drop_last: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x[idx], y[idx])`` batches from device-resident tensors (no copies to the host).

    ``x`` is ``(N, ...)`` of any dtype (e.g. uint8 images ``(N, 3, 32, 32)``), ``y`` ``(N,)`` on
    its device; each batch is ``batch_size`` rows of both (``shuffle``: in a random order drawn
    from ``generator``, else ``0..N-1``), same dtypes and device. ``drop_last=True`` drops the
    final partial batch, so that every training step has the same shape (what CUDA graphs and
    compiled kernels like); when ``N < batch_size`` the one batch of all N rows is still yielded.
    Evaluation passes ``drop_last=False``. Raises ValueError when x and y differ in length or
    ``batch_size < 1``, at the first ``next()`` (this is a generator).
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x and y must have the same length, got {n} and {y.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = (torch.randperm(n, device=x.device, generator=generator) if shuffle
             else torch.arange(n, device=x.device))
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]
