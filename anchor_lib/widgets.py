"""ipywidgets explorers for the chapters: embeddings (chapter 7) and the eps slider (chapter 1).

Both explorers precompute everything they show, so moving a control only redraws a figure, and
both are safe without a frontend: constructing them in a headless kernel (the book build), or
in plain Python (tests), draws the initial figure and raises nothing. In the rendered book
the controls do not update without a kernel; chapters show a static figure next to them.

Usage in a notebook::

    from anchor_lib import widgets
    display(widgets.embedding_explorer({"anchor": (coords, labels, views), ...}))
    display(widgets.eps_explorer(model, x[0], y[0], [0, 2/255, 4/255, 8/255]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from . import attacks
from .data import CLASSES
from .plots import VIEW_MARKERS, plot_umap
from .results import METHOD_LABELS

__all__ = ["embedding_explorer", "eps_explorer", "eps_frames", "plot_eps_frame"]


def _show(fig) -> None:
    """Display a figure into the current output (an Output widget, a cell) and close it."""
    try:
        from IPython.display import display

        display(fig)
    finally:
        plt.close(fig)


def embedding_explorer(results: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                       class_names: Sequence[str] = CLASSES, figsize=(5.6, 4.2)):
    """Method x view (x class) dropdowns over precomputed 2-D embeddings.

    Args:
        results: ``{method: (coords (N, 2), labels (N,), views (N,))}`` with view names
            ``"clean"``, ``"aug"``, ``"adv"`` (see :func:`anchor_lib.embeddings.stack_views`).

    Returns:
        An ``ipywidgets.VBox`` (controls above the plot); display it, or let it be the cell's
        last expression.
    """
    import ipywidgets as W

    if not results:
        raise ValueError("results is empty: nothing to explore")
    methods = list(results)
    method = W.Dropdown(options=[(METHOD_LABELS.get(m, m), m) for m in methods],
                        value=methods[0], description="method")
    view_opts = [("all views", "all")] + [(v, v) for v in VIEW_MARKERS]
    view = W.Dropdown(options=view_opts, value="all", description="view")
    cls = W.Dropdown(options=[("all classes", -1)] + [(c, i) for i, c in enumerate(class_names)],
                     value=-1, description="highlight")

    def draw(method: str, view: str, highlight: int) -> None:
        coords, labels, views = results[method]
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        plot_umap(coords, labels, views, ax, class_names=class_names,
                  title=f"{METHOD_LABELS.get(method, method)}: "
                        f"{'all views' if view == 'all' else view}",
                  show_views=None if view == "all" else [view],
                  highlight=None if highlight < 0 else highlight)
        _show(fig)

    out = W.interactive_output(draw, {"method": method, "view": view, "highlight": cls})
    return W.VBox([W.HBox([method, view, cls]), out])


@torch.no_grad()
def _probs(model, x: torch.Tensor) -> np.ndarray:
    with attacks.attack_mode(model):
        return F.softmax(model(x).float(), dim=1)[0].cpu().numpy()


def eps_frames(model, x: torch.Tensor, y: int | torch.Tensor, eps_values: Sequence[float], *,
               attack: str = "pgd", steps: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    """Precompute one adversarial example per eps for a single image.

    Args:
        model: classifier taking ``(1, 3, H, W)`` images in [0, 1].
        x: one image, float ``(3, H, W)`` / ``(1, 3, H, W)`` in [0, 1] or uint8.
        y: its label.
        eps_values: L-inf radii (e.g. ``[0, 1/255, 2/255, 4/255, 8/255]``).
        attack: ``"fgsm"`` or ``"pgd"`` (PGD-``steps`` with step ``eps / 4``, random start seeded
            by ``seed``).

    Returns:
        One dict per eps: ``eps``, ``x`` and ``x_adv`` (``(3, H, W)`` CPU tensors),
        ``probs_clean``, ``probs_adv`` (numpy ``(K,)``), ``y`` (int).
    """
    if attack not in ("fgsm", "pgd"):
        raise ValueError(f"attack must be 'fgsm' or 'pgd', got {attack!r}")
    x = x.unsqueeze(0) if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"x must be one image (3, H, W) or (1, 3, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255
    label = int(y.reshape(-1)[0]) if isinstance(y, torch.Tensor) else int(y)
    device = next(model.parameters()).device
    x = x.to(device)
    yt = torch.tensor([label], device=device)
    p_clean = _probs(model, x)
    frames = []
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        for eps in eps_values:
            torch.manual_seed(seed)
            if eps == 0:
                x_adv = x.clone()
            elif attack == "fgsm":
                x_adv = attacks.fgsm(model, x, yt, eps=float(eps))
            else:
                x_adv = attacks.pgd(model, x, yt, eps=float(eps), alpha=float(eps) / 4,
                                    steps=steps)
            frames.append({"eps": float(eps), "x": x[0].cpu(), "x_adv": x_adv[0].cpu(),
                           "probs_clean": p_clean, "probs_adv": _probs(model, x_adv), "y": label})
    return frames


def plot_eps_frame(frame: Mapping[str, Any], *, class_names: Sequence[str] = CLASSES,
                   figsize=(8.5, 3.0)):
    """Image, adversarial image, amplified perturbation and class probabilities for one eps.

    The perturbation ``delta = x_adv - x`` is shown as ``0.5 + delta / (2 eps)`` (grey = 0), so
    it is visible even when eps is 1/255. Returns the Figure.
    """
    x, x_adv, eps = frame["x"], frame["x_adv"], frame["eps"]
    delta = (x_adv - x).numpy().transpose(1, 2, 0)
    amp = np.clip(0.5 + delta / (2 * eps), 0, 1) if eps > 0 else np.full_like(delta, 0.5)
    pc, pa, y = frame["probs_clean"], frame["probs_adv"], frame["y"]
    fig, axes = plt.subplots(1, 4, figsize=figsize, layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1, 1, 2.2]})
    def name(k: int) -> str:
        return class_names[k] if k < len(class_names) else str(k)

    panels = ((x.numpy().transpose(1, 2, 0), f"clean: {name(int(pc.argmax()))}"),
              (x_adv.numpy().transpose(1, 2, 0),
               f"eps={eps * 255:.3g}/255: {name(int(pa.argmax()))}"),
              (amp, "perturbation (amplified)"))
    for ax, (img, title) in zip(axes[:3], panels, strict=True):
        ax.imshow(np.clip(img, 0, 1))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    k = np.arange(len(pc))
    axes[3].bar(k - 0.2, pc, width=0.4, label="clean", color="0.6")
    axes[3].bar(k + 0.2, pa, width=0.4, label="adversarial", color="tab:red")
    axes[3].set_xticks(k, [name(i) for i in k], rotation=45, ha="right", fontsize=9)
    axes[3].get_xticklabels()[y].set_fontweight("bold")
    axes[3].set_ylim(0, 1)
    axes[3].set_ylabel("probability")
    axes[3].legend(fontsize=9)
    return fig


def eps_explorer(model, x: torch.Tensor, y: int | torch.Tensor, eps_values: Sequence[float], *,
                 attack: str = "pgd", steps: int = 10, seed: int = 0,
                 class_names: Sequence[str] = CLASSES, start: float | None = None):
    """A slider over ``eps_values`` showing the attacked image, the amplified perturbation and
    the class probabilities (see :func:`eps_frames`, :func:`plot_eps_frame`).

    ``start`` is the radius the slider shows first, one of ``eps_values`` (default: the first).
    A page rendered without a kernel keeps that first view, so a book shows a telling one.
    All attacks run once, up front; returns an ``ipywidgets.VBox``.
    """
    import ipywidgets as W

    if len(eps_values) == 0:
        raise ValueError("eps_values is empty")
    first = 0
    if start is not None:
        matches = [i for i, eps in enumerate(eps_values) if abs(float(eps) - start) < 1e-9]
        if not matches:
            raise ValueError(f"start must be one of eps_values {[float(e) for e in eps_values]}, "
                             f"got {start!r}")
        first = matches[0]
    frames = eps_frames(model, x, y, eps_values, attack=attack, steps=steps, seed=seed)
    slider = W.SelectionSlider(options=[(f"{f['eps'] * 255:.3g}/255", i)
                                        for i, f in enumerate(frames)],
                               value=first, description="eps", continuous_update=False)

    def draw(i: int) -> None:
        _show(plot_eps_frame(frames[i], class_names=class_names))

    out = W.interactive_output(draw, {"i": slider})
    return W.VBox([slider, out])
