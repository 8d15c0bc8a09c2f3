"""Matplotlib figure helpers for the chapters.

Every function draws on the ``ax`` it is given (or a new figure) and returns the Axes (or, for
multi-panel helpers, the Figure); none calls ``plt.show()`` or changes global settings, so the
functions work the same in a notebook, in a headless book build (Agg) and in tests. The chapters
call ``plt.show()`` themselves.

Conventions: in embedding plots colour = class (matplotlib's ``tab10``, CIFAR-10 class names in
the legend) and marker = view (clean ``o``, augmented ``^``, adversarial ``x``); in plots that
compare methods colour = method (``METHOD_COLORS``); eps is shown in units of 1/255.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .data import CLASSES
from .results import (
    ATTACK_LABELS,
    ATTACKS,
    METHOD_LABELS,
    _runs,
    ablation_table,
    load_history,
    results_table,
)

# One colour per method in every figure that compares methods, so that PGD-AT is the same blue
# in the results bars, the training curves and the chapters' own comparisons. Okabe and Ito's
# palette, with a dark grey for the undefended model: the five stay at least 17 CIE76 units
# apart under simulated protanopia, deuteranopia and tritanopia (tests/colour_vision.py).
# Okabe and Ito's light grey did not: it and the pink of SupCon-AT both look grey (7 units)
# to a deuteranope, as do tab10's green and red side by side.
METHOD_COLORS = {"standard": "#444444", "pgd_at": "#0072B2", "trades": "#009E73",
                 "supcon_at": "#CC79A7", "anchor": "#D55E00"}
# The book's symbols for ANCHOR's knobs (chapter 5), for axis labels.
PARAM_LABELS = {"beta": "β", "lam": "λ", "temperature": "τ"}
VIEW_MARKERS = {"clean": "o", "aug": "^", "adv": "x"}
VIEW_LABELS = {"clean": "clean", "aug": "augmented", "adv": "adversarial (PGD)"}
# The accuracy curves differ in line and marker too, not in colour alone (tab10's orange and
# green are 5 CIE76 units apart for a protanope).
HISTORY_STYLES = {"train_acc": ("-", "o"), "val_clean": ("--", "s"), "val_pgd": (":", "^")}
HISTORY_LABELS = {"train_acc": "train accuracy", "val_clean": "validation clean",
                  "val_pgd": "validation PGD", "loss": "loss", "ce": "cross-entropy",
                  "con": "contrastive term", "lr": "learning rate"}

# Tables live in anchor_lib.results; exporting them here too would document them twice and
# send the API page's source links to the wrong module.
__all__ = ["METHOD_COLORS", "PARAM_LABELS", "VIEW_MARKERS", "class_colors", "plot_ablation",
           "plot_accuracy_vs_eps", "plot_history", "plot_results", "plot_umap", "plot_umap_panels",
           "show_images"]


def class_colors(num_classes: int = 10) -> np.ndarray:
    """``(num_classes, 4)`` RGBA colours, one per class (tab10, then tab20 beyond 10)."""
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    return np.array([cmap(i % cmap.N) for i in range(num_classes)])


def _new_ax(ax, figsize=(5.0, 3.5)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _history_frame(history: Any):
    import pandas as pd

    if isinstance(history, (str, Path)):
        return load_history(history)
    if isinstance(history, pd.DataFrame):
        return history
    return pd.DataFrame(list(history))


def plot_history(history: Any, ax=None, *, columns: Sequence[str] | None = None,
                 label: str | None = None, title: str | None = None, **line_kw: Any):
    """Training curves against the epoch.

    Args:
        history: ``train()``'s list of dicts, a DataFrame, or the path of a ``history.csv``.
        ax: Axes to draw on (default: a new figure).
        columns: which columns to plot; default the accuracies present
            (``train_acc``, ``val_clean``, ``val_pgd``; all-NaN columns skipped).
        label: prefix for the legend entries (e.g. the method, when overlaying runs); with a
            single column the entry is the label alone (the panel names the column).
        title: Axes title.
        line_kw: passed to ``Axes.plot`` (e.g. ``color``); a ``linestyle`` or ``marker`` given
            here replaces the column's own (``HISTORY_STYLES``: each accuracy curve has a
            line and marker of its own, markers up to 12 epochs).

    Returns:
        The Axes. The y axis is accuracy in [0, 1] when only accuracy columns are drawn.
    """
    df = _history_frame(history)
    if "epoch" not in df.columns:
        raise ValueError(f"history needs an 'epoch' column, got columns {list(df.columns)}")
    if columns is None:
        columns = [c for c in ("train_acc", "val_clean", "val_pgd")
                   if c in df.columns and df[c].notna().any()]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"history has no column(s) {', '.join(missing)}; it has "
                         f"{', '.join(map(str, df.columns))}")
    ax = _new_ax(ax)
    for c in columns:
        name = HISTORY_LABELS.get(c, c)
        entry = name if not label else label if len(columns) == 1 else f"{label}: {name}"
        ls, marker = HISTORY_STYLES.get(c, ("-", "o"))
        style = {} if {"ls", "linestyle"} & set(line_kw) else {"linestyle": ls}
        if "marker" not in line_kw:   # markers only where they do not crowd the line
            style["marker"] = marker if len(df) <= 12 else None
        ax.plot(df["epoch"], df[c], label=entry, **style, **line_kw)
    ax.set_xlabel("epoch")
    if columns and all(c in ("train_acc", "val_clean", "val_pgd") for c in columns):
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
    # Whole epochs, spanning every history drawn on these axes (not just the last one).
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if columns:
        ax.legend()
    return ax


def plot_umap(coords: np.ndarray, labels: np.ndarray, views: Sequence[str] | np.ndarray,
              ax=None, *, title: str | None = None, class_names: Sequence[str] = CLASSES,
              show_views: Sequence[str] | None = None, highlight: int | None = None,
              legend: bool = True, s: float = 14.0, alpha: float = 0.75):
    """Scatter 2-D embedding coordinates: colour = class, marker = view.

    Args:
        coords: ``(N, 2)`` (e.g. from :func:`anchor_lib.embeddings.umap_2d`).
        labels: ``(N,)`` class indices.
        views: ``(N,)`` view names among ``"clean"``, ``"aug"``, ``"adv"``.
        show_views: only draw these views (default: all present).
        highlight: draw this class in colour and the others in light grey.
        legend: add a legend of the classes and, under a heading, the views (when more than
            one is drawn).

    Returns:
        The Axes (axis ticks hidden: UMAP's axes have no units).
    """
    coords = np.asarray(coords)
    labels = np.asarray(labels).astype(int)
    views = np.asarray(views).astype(str)
    if coords.ndim != 2 or coords.shape[1] != 2 or not (len(coords) == len(labels) == len(views)):
        raise ValueError(f"coords must be (N, 2) with labels and views of length N; got "
                         f"{coords.shape}, {labels.shape}, {views.shape}")
    unknown = sorted(set(views) - set(VIEW_MARKERS))
    if unknown:
        raise ValueError(f"unknown view name(s) {unknown}; expected {list(VIEW_MARKERS)}")
    ax = _new_ax(ax, (5.0, 4.5))
    colors = class_colors(max(len(class_names), int(labels.max()) + 1 if len(labels) else 1))
    present = [v for v in VIEW_MARKERS if v in set(views)]
    drawn = [v for v in present if show_views is None or v in show_views]
    grey = np.array([0.8, 0.8, 0.8, 1.0])
    for v in drawn:
        m = views == v
        c = colors[labels[m]]
        if highlight is not None:
            c = np.where((labels[m] == highlight)[:, None], c, grey)
        # circles get a thin white edge; small triangles stay solid (an edge would wash them
        # out); 'x' is a line marker and takes the colour as is
        kw = {"clean": {"edgecolors": "white", "linewidths": 0.3},
              "aug": {"linewidths": 0, "s": 1.4 * s}, "adv": {"linewidths": 1.0}}[v]
        order = np.argsort(labels[m] == highlight) if highlight is not None else slice(None)
        ax.scatter(coords[m][order, 0], coords[m][order, 1], c=c[order], alpha=alpha,
                   marker=VIEW_MARKERS[v], **{"s": s, **kw})
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    if legend and len(labels):
        classes = sorted(set(labels.tolist()))
        handles = [Line2D([], [], ls="", marker="o", color=colors[k],
                          label=class_names[k] if k < len(class_names) else str(k))
                   for k in classes]
        # One legend, the views under a heading of their own: two legends stacked beside the
        # panel overlapped wherever the panel was shorter than both together. A panel of one
        # view names no view: its legend often serves a grid whose columns show the others.
        vh = [Line2D([], [], ls="", marker="", label="view"),
              *(Line2D([], [], ls="", marker=VIEW_MARKERS[v], color="0.3", label=VIEW_LABELS[v])
                for v in drawn)] if len(drawn) > 1 else []
        legend_ = ax.legend(handles=[*handles, *vh], loc="upper left",
                            bbox_to_anchor=(1.0, 1.0), frameon=False, title="class")
        if vh:
            legend_.get_texts()[len(handles)].set_fontweight("bold")
        legend_.get_title().set_fontweight("bold")
    return ax


# The height of one row of plot_umap's legend at matplotlib's default font size: its 15 rows
# (two headings, ten classes, three views) measured 3.23 inches.
LEGEND_ROW_INCHES = 0.22
# The height of one line of a figure title (suptitle) at the default font size, with its margin.
TITLE_LINE_INCHES = 0.25


def plot_umap_panels(results: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                     show_views: Sequence[str] | None = None, class_names: Sequence[str] = CLASSES,
                     panel_size: float = 4.0, s: float = 10.0, title: str | None = None):
    """One UMAP panel per method, side by side, with one shared legend on the right.

    Args:
        results: ``{name: (coords (N, 2), labels (N,), views (N,))}``; names like ``"anchor"``
            are shown as ``"ANCHOR"``.
        panel_size: each panel's width in inches.
        title: the figure's title, over all panels (lines split at ``"\\n"``); the figure is
            made taller for it, so that it does not squeeze the panels.

    Returns:
        The Figure.
    """
    if not results:
        raise ValueError("results is empty: nothing to plot")
    k = len(results)
    # The legend beside the last panel lists every class and view under two headings; a figure
    # shorter than it made constrained layout flatten every panel and cut the legend off.
    rows = 2 + len(class_names) + len(VIEW_MARKERS)
    lines = title.count("\n") + 1 if title else 0
    height = max(panel_size + 0.4, LEGEND_ROW_INCHES * rows + 0.3) + TITLE_LINE_INCHES * lines
    fig, axes = plt.subplots(1, k, figsize=(panel_size * k + 1.6, height),
                             layout="constrained", squeeze=False)
    if title:
        fig.suptitle(title)
    for i, (name, (coords, labels, views)) in enumerate(results.items()):
        plot_umap(coords, labels, views, axes[0, i], title=METHOD_LABELS.get(name, name),
                  class_names=class_names, show_views=show_views, legend=(i == k - 1), s=s)
        axes[0, i].set_box_aspect(1)  # UMAP's two axes are alike: square panels, as in the grid
    return fig


def plot_accuracy_vs_eps(eps_values: Sequence[float],
                         accuracies: Sequence[float] | Mapping[str, Sequence[float]], ax=None, *,
                         label: str | None = None, title: str | None = None):
    """Accuracy against the attack radius eps (x axis in units of 1/255).

    ``accuracies`` is one curve (a sequence, labelled ``label``) or ``{label: curve}``.
    Returns the Axes.
    """
    eps = np.asarray(eps_values, dtype=float)
    curves = dict(accuracies) if isinstance(accuracies, Mapping) else {label: accuracies}
    ax = _new_ax(ax)
    for name, acc in curves.items():
        acc = np.asarray(acc, dtype=float)
        if acc.shape != eps.shape:
            raise ValueError(f"curve {name!r} has {acc.shape[0] if acc.ndim else 0} values for "
                             f"{eps.shape[0]} eps values")
        ax.plot(eps * 255, acc, marker="o", label=name)
    ax.set_xlabel("eps (× 1/255)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if any(name is not None for name in curves):
        ax.legend(fontsize="small")
    return ax


def _to_hwc(x: Any) -> np.ndarray:
    """Images as float numpy ``(N, H, W, C)`` in [0, 1] from NCHW tensors / arrays or NHWC."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            x = x.numpy()
    except ImportError:  # pragma: no cover
        pass
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W) or (N, H, W, C), got {x.shape}")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    return np.clip(x, 0, 1)


def show_images(x: Any, titles: Sequence[str] | None = None, *, ncols: int = 8,
                scale: float = 1.4, suptitle: str | None = None):
    """A grid of images with optional titles.

    Args:
        x: ``(N, C, H, W)`` tensor / array (uint8 or float in [0, 1]) or ``(N, H, W, C)``.
        titles: one per image.

    Returns:
        The Figure.
    """
    imgs = _to_hwc(x)
    n = len(imgs)
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} images")
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(scale * ncols, scale * nrows + 0.3),
                             squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = imgs[i]
            # nearest: show the pixels as they are (and keep the PNG small)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img,
                      cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1,
                      interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i])
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def plot_ablation(runs: Sequence[Any], param: str, ax=None, *,
                  attacks: Sequence[str] = ("clean", "pgd20", "autoattack"),
                  title: str | None = None):
    """Accuracy against an ablated TrainConfig field (e.g. ``beta``): one line per attack (test
    accuracy) and a dashed one for the validation PGD accuracy the knob is chosen on.

    ``runs`` are :class:`anchor_lib.results.RunResult` objects or ``metrics.json`` dicts.
    Returns the Axes.
    """
    df = ablation_table(runs, param, [a for a in ATTACKS if a in attacks] or list(attacks))
    ax = _new_ax(ax)
    for a in attacks:
        if a in df.columns and df[a].notna().any():
            ax.plot(df[param], df[a], marker="o", label=f"test {ATTACK_LABELS.get(a, a)}")
    # The validation accuracy the knob is chosen on, dashed: the test lines are the report.
    if df["val_pgd"].notna().any():
        steps = {m["config"].get("val_attack_steps") for _, m in _runs(runs)}
        suffix = f"-{steps.pop()}" if len(steps) == 1 and None not in steps else ""
        ax.plot(df[param], df["val_pgd"], marker="s", linestyle="--",
                label=f"validation PGD{suffix}")
    ax.set_xlabel(PARAM_LABELS.get(param, param))
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def plot_results(runs: Sequence[Any], ax=None, *, attacks: Sequence[str] = ATTACKS,
                 title: str | None = None):
    """Test accuracy of each run under each attack: one group of bars per attack.

    ``runs`` are :class:`anchor_lib.results.RunResult` objects or ``metrics.json`` dicts (as
    for :func:`anchor_lib.results.results_table`); a bar per run, labelled with its method (with its run name
    when two runs share a method). Each bar's whisker is
    two standard errors of that accuracy alone, ``2 sqrt(p (1 - p) / n)``, the sampling noise of
    its ``n`` test images: wide on AutoAttack's 1,000, narrow on the others' 10,000. (Whether two
    runs differ is a paired question: :func:`anchor_lib.results.compare`.) Returns the Axes.

    Raises:
        ValueError: no runs, or none evaluated with any of ``attacks``.
    """
    df = results_table(runs, list(attacks))
    shown = [a for a in attacks if a in df.columns and df[a].notna().any()]
    if df.empty or not shown:
        raise ValueError(f"plot_results needs runs evaluated with some of {list(attacks)}; "
                         f"got {len(df)} run(s) with columns {list(df.columns)}")
    wide = 1.3 * len(shown) + 0.25 * len(df) * len(shown)  # inches: room for every bar
    # at most 8.5 inches: a wider figure is shrunk to the page's column, its text with it
    ax = _new_ax(ax, figsize=(min(8.5, max(6.0, wide)), 3.6))
    acc = df[shown].to_numpy(dtype=float)
    n = df[[f"n_{a}" for a in shown]].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    err = 2 * np.sqrt(acc * (1 - acc) / n)
    # Method names (and colours) when they tell the runs apart, else the run names (several
    # profiles, seeds) in the default colour cycle.
    unique = df["method"].nunique() == len(df)
    labels = [METHOD_LABELS.get(m, m) for m in df["method"]] if unique else list(df.index)
    colors = [METHOD_COLORS.get(m) for m in df["method"]] if unique else [None] * len(df)
    width = 0.8 / len(df)
    for i, label in enumerate(labels):
        x = np.arange(len(shown)) + (i - (len(df) - 1) / 2) * width
        bars = ax.bar(x, acc[i], width, yerr=err[i], capsize=2, label=label, color=colors[i])
        # A bar of height 0 is invisible: say "0" where it stands, so it does not read as missing.
        ax.bar_label(bars, labels=["0" if v == 0 else "" for v in acc[i]], fontsize=9)
    ax.set_xticks(np.arange(len(shown)), [ATTACK_LABELS.get(a, a) for a in shown])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=min(len(df), 5))
    if title:
        ax.set_title(title)
    return ax
