"""Embeddings of clean / augmented / adversarial views, their cluster metrics, and 2-D UMAP.

The question chapter 7 asks: where does a model put an image, a random crop-and-flip of it, and
a PGD adversarial version of it? A model whose adversarial views stay inside their own class's
cluster is robust *in representation*, not only at the classifier's output.

- :func:`embed_views` computes, for a fixed sample of images, the L2-normalised backbone features
  (or the contrastive projection ``z``) of three views per image.
- :func:`save_embeddings` / :func:`load_embeddings` write and read ``embeddings.npz``
  (float16, with a sha256 sidecar, refused when damaged).
- :func:`cluster_metrics` summarises the geometry in a few numbers (silhouette, clean-adversarial
  distance, intra- vs inter-class similarity, adversarial kNN agreement).
- :func:`umap_2d` projects points to 2-D with UMAP (McInnes et al., 2018) for the figures.

Arrays returned here are numpy (the plotting and metric code is numpy / scikit-learn); rows of
``clean``, ``aug`` and ``adv`` with the same index are views of the same image.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import attacks, checkpoint, data
from .checks import check_images, check_labels, check_number, check_seed

VIEWS = ("clean", "aug", "adv")
#: ``features``: the pooled backbone features the classifier reads, trained by every method, so the
#: space in which models trained differently can be compared. ``projection``: the head's ``z``,
#: trained only by the contrastive term; a standard, PGD-AT or TRADES model never trains its head,
#: which keeps its random initial weights, so its ``z`` is a random map of the features.
SPACES = ("features", "projection")
FORMAT = "anchor_lib.embeddings/1"

__all__ = ["FORMAT", "SPACES", "VIEWS", "balanced_indices", "cluster_metrics", "embed_views",
           "knn_hits", "load_embeddings", "save_embeddings", "stack_views", "umap_2d"]


# --- computing embeddings -----------------------------------------------------------------------


def balanced_indices(labels: torch.Tensor | np.ndarray, n: int):
    """Indices of a class-balanced sample of ``n`` items, independent of the dataset's order.

    Takes the first ``n // C`` items of each of the ``C`` classes present (one more for the first
    ``n % C`` classes), in dataset order, and interleaves them (class 0's first item, class 1's
    first item, ...). Some copies of CIFAR-10 store the test set sorted by class, where "the first
    n test images" would be one class only. ``labels``: integer ``(N,)``, a torch tensor or a
    numpy array; ``n``: an int in ``[1, N]``. Returns int64 indices ``(n,)`` of the same kind (and
    device) as ``labels``. Raises ValueError when labels are not 1-D, n is out of range, or a
    class has too few items for its share.
    """
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {y.shape}")
    n = int(check_number(n, "n", low=1, high=len(y), integer=True))
    classes = np.unique(y)
    per_class = [np.flatnonzero(y == c) for c in classes]
    counts = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    if any(k > len(idx) for k, idx in zip(counts, per_class, strict=True)):
        raise ValueError(f"cannot take a balanced sample of {n}: some class has fewer than "
                         f"{max(counts)} items")
    ranked = [(rank, i, int(idx[rank])) for i, (k, idx) in enumerate(zip(counts, per_class,
                                                                          strict=True))
              for rank in range(k)]
    out = np.array([j for _, _, j in sorted(ranked)], dtype=np.int64)
    return torch.from_numpy(out).to(labels.device) if isinstance(labels, torch.Tensor) else out


def _embed(model: nn.Module, x: torch.Tensor, space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, L2-normalised embedding) of a float batch, in one backbone pass when possible."""
    if space == "projection":
        if hasattr(model, "forward_all"):
            logits, z = model.forward_all(x)
        else:
            logits, z = model(x), model.project(x)
        return logits, F.normalize(z.float(), dim=1)
    feats = model.features(x)
    logits = model.linear(feats) if hasattr(model, "linear") else model(x)
    return logits, F.normalize(feats.float(), dim=1)


def embed_views(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255,
                alpha: float = 2 / 255, steps: int = 10, seed: int = 0, batch_size: int = 500,
                space: str = "features") -> dict[str, np.ndarray]:
    """Embed a clean, an augmented and a PGD-adversarial view of every image.

    Args:
        model: a ``PreActResNet18`` (or any module with ``project`` / ``features`` and logits
            from ``forward``). It is used in eval mode; its training flags come back unchanged.
        x: images ``(N, 3, H, W)``: uint8 in [0, 255] or float in [0, 1], on the model's device.
        y: integer labels ``(N,)`` in ``[0, num_classes)``, on x's device.
        eps, alpha, steps: the L-inf PGD attack that makes the adversarial view (the protocol's
            8/255, 2/255; ``steps=0`` or ``eps=0`` makes ``adv`` equal ``clean``).
        seed: an int >= 0; seeds the augmentation (crop + flip) and PGD's random start. Results are
            deterministic for a given ``seed`` and ``batch_size`` (the augmented views do not
            depend on ``batch_size``; PGD's random start is drawn per batch). The caller's
            global RNG streams are left as they were.
        batch_size: images per forward / attack batch.
        space: ``"features"`` (pooled backbone features, L2-normalised: comparable across
            methods) or ``"projection"`` (the contrastive ``z`` from ``model.project``: trained
            only by ``supcon_at`` and ``anchor``; see ``SPACES``).

    Returns:
        dict of numpy arrays: ``clean``, ``aug``, ``adv`` float32 ``(N, d)`` with unit rows
        (d = ``8 * width`` for ``"features"``, ``proj_dim`` for ``"projection"``);
        ``labels`` int64 ``(N,)``; ``pred_clean``, ``pred_aug``, ``pred_adv`` int64 ``(N,)``
        (the classifier's predictions on each view).
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (N, C, H, W), got {tuple(x.shape)}")
        xf_all = data.to_float(x)
    else:
        xf_all = check_images(x, "x")
    n = xf_all.shape[0]
    y = check_labels(y, n, getattr(model, "num_classes", None), device=xf_all.device)
    eps = check_number(eps, "eps", low=0.0)
    alpha = check_number(alpha, "alpha", low=0.0, low_inclusive=False)
    steps = check_number(steps, "steps", low=0, integer=True)
    batch_size = check_number(batch_size, "batch_size", low=1, integer=True)
    check_seed(seed)

    device = xf_all.device
    # All augmented views are drawn at once, so they do not depend on batch_size.
    aug_all = data.augment(xf_all, torch.Generator(device=device).manual_seed(seed))
    out: dict[str, list[torch.Tensor]] = {k: [] for k in
                                          (*VIEWS, "pred_clean", "pred_aug", "pred_adv")}
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), attacks.attack_mode(model):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            xb, yb = xf_all[start:start + batch_size], y[start:start + batch_size]
            views = {"clean": xb, "aug": aug_all[start:start + batch_size]}
            views["adv"] = (attacks.pgd(model, xb, yb, eps=eps, alpha=alpha, steps=steps)
                            if steps > 0 and eps > 0 else xb)
            with torch.no_grad():
                for name, v in views.items():
                    logits, z = _embed(model, v, space)
                    out[name].append(z.cpu())
                    out[f"pred_{name}"].append(logits.argmax(1).cpu())
    result = {k: torch.cat(v).numpy() for k, v in out.items()}
    for k in VIEWS:
        result[k] = result[k].astype(np.float32)
    for k in ("pred_clean", "pred_aug", "pred_adv"):
        result[k] = result[k].astype(np.int64)
    result["labels"] = y.cpu().numpy().astype(np.int64)
    return result


# --- the embeddings.npz artifact ------------------------------------------------------------------


def _check_emb(emb: dict[str, Any], where: str = "emb") -> int:
    """Check the views and labels of an embeddings dict agree in shape; return N."""
    missing = [k for k in (*VIEWS, "labels") if k not in emb]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}; expected arrays clean, aug, adv "
                         "(N, d) and labels (N,)")
    labels = np.asarray(emb["labels"])
    if labels.ndim != 1 or labels.shape[0] == 0:
        raise ValueError(f"{where}: labels must have shape (N,) with N >= 1, got {labels.shape}")
    # Float labels that are not whole numbers would be truncated silently (0.5 -> 0).
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and bool(np.all(labels == np.round(labels))))
    if not integral:
        raise ValueError(f"{where}: labels must be integer class indices, got dtype {labels.dtype}"
                         + (f" with non-integer values such as {labels[labels != np.round(labels)][0]}"
                            if np.issubdtype(labels.dtype, np.floating) else ""))
    n = labels.shape[0]
    shape = np.asarray(emb["clean"]).shape
    if len(shape) == 2 and shape[0] != n:
        raise ValueError(f"{where}: labels (N={n}) and the views ({shape[0]} rows) must have one "
                         f"entry per image")
    for k in VIEWS:
        a = np.asarray(emb[k])
        if a.ndim != 2 or a.shape[0] != n or a.shape != shape:
            raise ValueError(f"{where}: {k} must have shape (N={n}, d) like clean {shape}, "
                             f"got {a.shape}")
    return n


def save_embeddings(path: str | Path, emb: dict[str, Any], meta: dict[str, Any] | None = None
                    ) -> Path:
    """Write ``embeddings.npz`` atomically, with a ``.sha256`` sidecar.

    Stored: ``clean``, ``aug``, ``adv`` as float16 ``(N, d)``; ``labels`` and any ``pred_*`` or
    ``index`` array as int64 ``(N,)``; ``meta``, a JSON string (``meta`` plus ``format``, ``n``,
    ``dim``). Returns the path. Raises ValueError when ``emb`` lacks a view or the labels, or an
    array's shape disagrees with ``clean``'s.
    """
    n = _check_emb(emb)
    arrays: dict[str, np.ndarray] = {k: np.asarray(emb[k], dtype=np.float16) for k in VIEWS}
    arrays["labels"] = np.asarray(emb["labels"], dtype=np.int64)
    for k, v in emb.items():
        if k.startswith("pred_") or k == "index":
            a = np.asarray(v, dtype=np.int64)
            if a.shape != (n,):
                raise ValueError(f"emb[{k!r}] must have shape ({n},), got {a.shape}")
            arrays[k] = a
    full_meta = {"format": FORMAT, "n": n, "dim": int(arrays["clean"].shape[1]),
                 **(meta or {})}
    arrays["meta"] = np.array(json.dumps(full_meta, default=str))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return checkpoint.atomic_write_bytes(path, buf.getvalue())


def load_embeddings(path: str | Path, *, verify_hash: bool = True) -> dict[str, Any]:
    """Read an ``embeddings.npz`` written by :func:`save_embeddings`, verifying its sidecar.

    Returns a dict with ``clean``, ``aug``, ``adv`` as float32 ``(N, d)`` (float16 rounding:
    row norms are 1 to about 1e-3), ``labels`` int64 ``(N,)``, any ``pred_*`` arrays and
    ``meta`` (a dict).

    Raises:
        anchor_lib.checkpoint.CheckpointError: the file is missing, has no sidecar, does not
            match it, or is not a readable embeddings file (the message names the file).
    """
    path = Path(path)
    if verify_hash:
        checkpoint.verify(path)
    elif not path.is_file():
        raise checkpoint.CheckpointError(f"embeddings file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise checkpoint.CheckpointError(f"cannot read embeddings file {path}: "
                                         f"{type(err).__name__}: {err}") from err
    try:
        meta = json.loads(str(raw.pop("meta"))) if "meta" in raw else {}
        _check_emb(raw, str(path))
    except (ValueError, KeyError) as err:
        raise checkpoint.CheckpointError(f"{path} is not an anchor_lib embeddings file: {err}"
                                         ) from err
    out: dict[str, Any] = {k: (v.astype(np.float32) if k in VIEWS else v) for k, v in raw.items()}
    out["meta"] = meta
    return out


# --- cluster metrics ----------------------------------------------------------------------------


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def stack_views(emb: dict[str, Any], views: tuple[str, ...] = VIEWS
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of several views stacked: ``(points (V*N, d), labels (V*N,), view names (V*N,))``,
    float32, int64 and str arrays (V = ``len(views)``); ValueError when ``emb`` lacks a view or
    the labels, or their shapes disagree."""
    n = _check_emb(emb)
    points = np.concatenate([np.asarray(emb[v], dtype=np.float32) for v in views])
    labels = np.tile(np.asarray(emb["labels"], dtype=np.int64), len(views))
    names = np.repeat(np.array(views), n)
    return points, labels, names


def _silhouette(points: np.ndarray, labels: np.ndarray) -> float | None:
    from sklearn.metrics import silhouette_score

    k = len(np.unique(labels))
    if k < 2 or k >= len(labels):
        return None  # undefined: needs 2 <= number of classes <= N - 1
    return float(silhouette_score(points, labels, metric="cosine"))


def _knn_hits(queries: np.ndarray, refs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per query i: whether its k nearest refs (cosine, ref i excluded) elect labels[i] by
    majority vote (a win by 3 of 5 votes counts as fully as 5 of 5)."""
    n = len(labels)
    k = min(k, n - 1)
    sims = queries @ refs.T
    np.fill_diagonal(sims, -np.inf)  # leave one out: never the same image's own view
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    classes = np.unique(labels)
    votes = (labels[nearest][:, :, None] == classes[None, None, :])  # (n, k, C)
    near_sims = np.take_along_axis(sims, nearest, axis=1)
    # Majority vote; ties go to the class whose neighbours are more similar in total.
    score = votes.sum(1) + 1e-3 * (votes * near_sims[:, :, None]).sum(1)
    return classes[score.argmax(1)] == labels


def knn_hits(emb: dict[str, Any], view: str = "adv", *, k: int = 5) -> np.ndarray:
    """Which images' ``view`` embedding finds its class among the clean embeddings: the
    per-image outcomes behind :func:`cluster_metrics`' ``knn_clean`` (``view="clean"``) and
    ``knn_adv_agreement`` (``view="adv"``), which are their means.

    Two models embedded on the same images are compared best image by image: the noise of a
    difference of two shares is then that of the per-image differences (a paired comparison).

    Args:
        emb: as for :func:`cluster_metrics` (``clean``, ``aug``, ``adv`` ``(N, d)``, ``labels``
            ``(N,)``), N >= 2.
        view: ``"clean"``, ``"aug"`` or ``"adv"``: the embeddings that look for neighbours among
            the clean ones (each image's own clean embedding excluded).
        k: neighbours that vote, an int >= 1 (capped at N - 1).

    Returns:
        ``(N,)`` bool numpy array.

    Raises:
        ValueError: an unknown view, fewer than 2 images, k < 1, or views and labels that
            disagree in shape.
        TypeError: k is not an int.
    """
    n = _check_emb(emb)
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if n < 2:
        raise ValueError(f"kNN needs at least 2 images (one to look among), got {n}")
    k = check_number(k, "k", low=1, integer=True)
    labels = np.asarray(emb["labels"], dtype=np.int64)
    return _knn_hits(_unit(emb[view]), _unit(emb["clean"]), labels, k)


def cluster_metrics(emb: dict[str, Any], *, k: int = 5) -> dict[str, Any]:
    """A few numbers that describe how class clusters and adversarial views sit in the space.

    Args:
        emb: ``clean``, ``aug``, ``adv`` ``(N, d)`` embeddings (rows are renormalised here, so
            float16 copies are fine) and ``labels`` ``(N,)``; optional ``pred_clean`` /
            ``pred_adv`` give the sample's accuracies.
        k: neighbours for the kNN agreement, an int >= 1 (capped at N - 1).

    Returns:
        A JSON-ready dict (``None`` where a quantity is undefined, e.g. one class only):

        - ``silhouette_clean``, ``silhouette_adv``, ``silhouette_all``: silhouette score by class
          with cosine distance, in [-1, 1] (1 = tight, well-separated class clusters), on the
          clean view, the adversarial view, and all three views stacked.
        - ``clean_adv_distance``, ``clean_aug_distance``: mean of ``1 - cos(z_clean, z_view)``
          over images, in [0, 2] (0 = the view lands exactly on its clean image).
        - ``intra_class_cos``, ``inter_class_cos``: mean cosine similarity of clean pairs of the
          same class (distinct images) and of different classes, in [-1, 1];
          ``class_cos_gap`` = intra - inter.
        - ``knn_clean``: leave-one-out kNN accuracy of clean embeddings among clean ones;
          ``knn_adv_agreement``: fraction of adversarial embeddings whose ``k`` nearest clean
          embeddings (its own clean image excluded) elect its true class by majority vote (ties
          go to the class of the more similar neighbours). Both in [0, 1].
        - ``acc_clean``, ``acc_adv``: the classifier's accuracy on this sample (if predictions
          are present), ``n``, ``dim``, ``k``.
    """
    n = _check_emb(emb)
    # k = 0 would vote with no neighbours and elect the first class for every query.
    k = check_number(k, "k", low=1, integer=True)
    labels = np.asarray(emb["labels"], dtype=np.int64)
    clean, aug, adv = (_unit(emb[v]) for v in VIEWS)

    all_points = np.concatenate([clean, aug, adv])
    all_labels = np.tile(labels, 3)

    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(n, dtype=bool)
    sims = clean @ clean.T
    intra_mask, inter_mask = same & off_diag, ~same
    intra = float(sims[intra_mask].mean()) if intra_mask.any() else None
    inter = float(sims[inter_mask].mean()) if inter_mask.any() else None
    several = n > 1 and len(np.unique(labels)) > 1

    result: dict[str, Any] = {
        "n": n, "dim": int(clean.shape[1]), "k": int(k),
        "silhouette_clean": _silhouette(clean, labels),
        "silhouette_adv": _silhouette(adv, labels),
        "silhouette_all": _silhouette(all_points, all_labels),
        "clean_adv_distance": float(np.mean(1.0 - np.sum(clean * adv, axis=1))),
        "clean_aug_distance": float(np.mean(1.0 - np.sum(clean * aug, axis=1))),
        "intra_class_cos": intra,
        "inter_class_cos": inter,
        "class_cos_gap": (intra - inter) if intra is not None and inter is not None else None,
        # With one class every vote elects it: a perfect score that says nothing.
        "knn_clean": float(_knn_hits(clean, clean, labels, k).mean()) if several else None,
        "knn_adv_agreement": float(_knn_hits(adv, clean, labels, k).mean()) if several else None,
    }
    for view in ("clean", "adv"):
        if f"pred_{view}" in emb:
            result[f"acc_{view}"] = float((np.asarray(emb[f"pred_{view}"]) == labels).mean())
    return result


# --- UMAP ---------------------------------------------------------------------------------------


def _serial_umap_kernels(umap_module: Any) -> None:
    """Compile umap-learn's ``parallel=True`` numba kernels as serial code (once per process).

    With ``random_state`` set umap-learn runs single-threaded anyway, and on the few thousand
    points a figure shows, the parallel kernels only cost compile time: compiling them serially
    halves the first call's JIT time (about 10 s of CPU instead of 20). The switch must happen
    before the first compilation; it is skipped quietly if umap-learn's internals change.
    """
    try:
        import numba

        dispatcher = numba.core.registry.CPUDispatcher
        module = umap_module.umap_
        for name in dir(module):
            f = getattr(module, name)
            if isinstance(f, dispatcher) and f.targetoptions.get("parallel") and not f.overloads:
                f.targetoptions["parallel"] = False
    except (AttributeError, ImportError):  # pragma: no cover - depends on umap-learn's version
        pass


def umap_2d(points: np.ndarray, *, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
            metric: str = "cosine") -> np.ndarray:
    """2-D UMAP coordinates of ``points`` ``(N, d)``, float32 ``(N, 2)``.

    Deterministic for a given ``seed`` (``random_state`` makes umap-learn run single-threaded).
    The first call in a process compiles umap-learn's numba kernels (tens of seconds on a CPU);
    later calls take about a second per thousand points, so fit once per figure panel.
    ``n_neighbors`` is capped at ``N - 1``; N must be at least 4. Raises ValueError when points
    are not a finite ``(N, d)`` array with N >= 4, ``n_neighbors < 2`` or ``min_dist < 0``.
    """
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[0] < 4:
        raise ValueError(f"points must have shape (N, d) with N >= 4, got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("points contain NaN or Inf")
    check_number(n_neighbors, "n_neighbors", low=2, integer=True)
    check_number(min_dist, "min_dist", low=0.0)
    # umap-learn's dependencies reset the OpenMP thread count that torch shares; a library call
    # must not change the caller's settings (a second thread made later tiny models 10x slower).
    torch_threads = torch.get_num_threads()
    try:
        coords = _fit_umap(points, n_neighbors, min_dist, metric, seed)
    finally:  # also when the fit fails
        torch.set_num_threads(torch_threads)
    return np.asarray(coords, dtype=np.float32)


def _fit_umap(points: np.ndarray, n_neighbors: int, min_dist: float, metric: str,
              seed: int) -> np.ndarray:
    """umap-learn's 2-D layout of ``points`` (checked by :func:`umap_2d`)."""
    with warnings.catch_warnings():
        # umap-learn / numba / pynndescent emit import-time and small-data warnings (e.g. about
        # n_jobs with random_state, or spectral initialisation on tiny graphs) that would show up
        # in every executed notebook; the result does not depend on them.
        warnings.simplefilter("ignore")
        import umap

        _serial_umap_kernels(umap)
        reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, points.shape[0] - 1),
                            min_dist=min_dist, metric=metric, random_state=seed, n_jobs=1,
                            low_memory=True, verbose=False)
        return reducer.fit_transform(points)
