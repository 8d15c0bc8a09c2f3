"""Tests for anchor_lib.plots, anchor_lib.widgets and anchor_lib.results (chapters 7 and 8).

Figures are drawn with the Agg backend and widgets are built with no frontend, as in the
headless book build. The results tests feed a temporary folder of fake but well-formed
DESIGN §6 artifacts to the same functions chapter 8 calls; the numbers in them are made up
for the test and never reach the book.
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from anchor_lib import attacks, checkpoint, plots, results, widgets  # noqa: E402
from anchor_lib.data import CLASSES  # noqa: E402
from anchor_lib.models import PreActResNet18  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def umap_like(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(4), n // 4 * 3)[: 3 * n]
    views = np.repeat(np.array(["clean", "aug", "adv"]), n)
    return rng.standard_normal((3 * n, 2)).astype(np.float32), labels, views


HISTORY = [{"epoch": e, "loss": 2.0 / e, "ce": 1.5 / e, "con": 0.5 / e, "train_acc": 0.2 * e,
            "val_clean": 0.25 * e, "val_pgd": 0.1 * e, "lr": 0.1, "seconds": 3.0,
            "best": True} for e in (1, 2, 3)]


# --- plots ------------------------------------------------------------------------------------


def test_plot_history_from_list_frame_and_csv(tmp_path):
    ax = plots.plot_history(HISTORY, title="run")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "train accuracy", "validation clean", "validation PGD"]
    assert ax.get_ylim() == (0.0, 1.0)
    plots.plot_history(pd.DataFrame(HISTORY), ax=ax, columns=["val_pgd"], label="anchor")
    assert ax.get_lines()[-1].get_label() == "anchor"  # one column: the panel names it
    two = plots.plot_history(HISTORY, columns=["val_clean", "val_pgd"], label="anchor")
    assert [t.get_text() for t in two.get_legend().get_texts()] == [
        "anchor: validation clean", "anchor: validation PGD"]
    csv = tmp_path / "history.csv"
    pd.DataFrame(HISTORY).to_csv(csv, index=False)
    # The epoch ticks span every history on the axes, not only the last one drawn.
    longer = [dict(r, epoch=r["epoch"] * 10) for r in HISTORY]
    plots.plot_history(longer, ax=ax, columns=["val_pgd"], label="longer")
    plots.plot_history(HISTORY, ax=ax, columns=["val_pgd"], label="shorter")
    ax.figure.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert max(ticks) >= 25 and all(float(t).is_integer() for t in ticks)
    ax2 = plots.plot_history(csv, columns=["loss", "ce", "con"])
    assert len(ax2.get_lines()) == 3
    with pytest.raises(ValueError, match="no column"):
        plots.plot_history(HISTORY, columns=["nope"])


def test_plot_history_skips_all_nan_columns():
    rows = [dict(r, val_pgd=float("nan")) for r in HISTORY]  # e.g. a standard model
    ax = plots.plot_history(rows)
    assert len(ax.get_lines()) == 2


def test_plot_umap_colours_markers_and_legends():
    coords, labels, views = umap_like()
    ax = plots.plot_umap(coords, labels, views, title="t")
    assert len(ax.collections) == 3  # one scatter per view
    legends = [c for c in ax.get_children() if isinstance(c, matplotlib.legend.Legend)]
    texts = {t.get_text() for leg in legends for t in leg.get_texts()}
    assert {CLASSES[0], CLASSES[3], "adversarial (PGD)", "clean"} <= texts
    ax = plots.plot_umap(coords, labels, views, show_views=["adv"], highlight=2, legend=False)
    assert len(ax.collections) == 1
    with pytest.raises(ValueError, match="view"):
        plots.plot_umap(coords, labels, np.array(["other"] * len(labels)))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plots.plot_umap(coords[:, :1], labels, views)


@pytest.mark.parametrize("title", [None, "one line", "two\nlines"])
@pytest.mark.parametrize("panel_size", [2.0, 2.5, 3.0, 4.0])
def test_plot_umap_panels(panel_size, title):
    fig = plots.plot_umap_panels({m: umap_like(seed=i) for i, m in
                                  enumerate(["standard", "pgd_at", "anchor"])},
                                 panel_size=panel_size, title=title)
    assert (fig._suptitle.get_text() if fig._suptitle else None) == title
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Standard", "PGD-AT", "ANCHOR"]
    # One shared legend (classes, then views under their heading), beside the last panel only.
    legends = [[c for c in ax.get_children() if isinstance(c, matplotlib.legend.Legend)]
               for ax in fig.axes]
    assert [len(found) for found in legends] == [0, 0, 1]
    # Within the figure (constrained layout makes room for it), not cut off at its right edge.
    fig.canvas.draw()
    box = legends[2][0].get_window_extent()
    assert box.x1 <= fig.bbox.x1 and box.y0 >= fig.bbox.y0
    # Square panels whatever the legend's height (chapter 7's panels of 3 inches, shorter than
    # the legend, were drawn twice as wide as tall).
    for ax in fig.axes:
        extent = ax.get_window_extent()
        assert extent.width == pytest.approx(extent.height, rel=0.02), (panel_size, extent)
        assert extent.height >= 0.9 * panel_size * fig.dpi, (panel_size, title)


def test_plot_accuracy_vs_eps_and_show_images():
    eps = [0, 2 / 255, 4 / 255, 8 / 255]
    ax = plots.plot_accuracy_vs_eps(eps, {"standard": [0.9, 0.3, 0.1, 0.0],
                                          "pgd_at": [0.8, 0.7, 0.6, 0.45]})
    assert np.allclose(ax.get_lines()[0].get_xdata(), [0, 2, 4, 8])
    plots.plot_accuracy_vs_eps(eps, [1, 0.5, 0.2, 0.0], label="one curve")
    with pytest.raises(ValueError, match="eps values"):
        plots.plot_accuracy_vs_eps(eps, [1.0, 0.5])
    x = torch.rand(5, 3, 8, 8)
    fig = plots.show_images(x, [f"img {i}" for i in range(5)], ncols=3)
    assert len(fig.axes) == 6 and fig.axes[0].get_title() == "img 0"
    plots.show_images((x * 255).to(torch.uint8))
    plots.show_images(x.numpy().transpose(0, 2, 3, 1)[0])  # one HWC image
    with pytest.raises(ValueError, match="titles"):
        plots.show_images(x, ["a"])


def test_method_colours_stay_apart_for_colour_blind_readers():
    """The five methods are told apart by colour alone in chapter 8's bars and curves."""
    from colour_vision import closest_pair, delta_e

    gap, vision, a, b = closest_pair(plots.METHOD_COLORS)
    assert gap >= 15, f"{a} and {b} are {gap:.1f} CIE76 units apart with {vision}"
    # The simulation itself: Okabe and Ito's light grey and pink merge for a deuteranope.
    assert delta_e("#999999", "#CC79A7", "deuteranopia") < 8 < delta_e("#999999", "#CC79A7")


def test_class_colours_are_tab10_then_tab20_and_all_different():
    from matplotlib.colors import to_rgba

    ten = plots.class_colors(10)
    assert ten.shape == (10, 4)
    assert [tuple(c) for c in ten] == [to_rgba(plt.get_cmap("tab10")(i)) for i in range(10)]
    twelve = plots.class_colors(12)
    assert [tuple(c) for c in twelve] == [to_rgba(plt.get_cmap("tab20")(i)) for i in range(12)]
    for colours in (plots.class_colors(3), ten, twelve):
        assert len({tuple(c) for c in colours}) == len(colours)


def test_plot_umap_highlight_greys_the_rest_and_draws_the_class_on_top():
    coords, labels, views = umap_like()
    ax = plots.plot_umap(coords, labels, views, show_views=["clean"], highlight=2, legend=False)
    (points,) = ax.collections
    assert ax.get_legend() is None and not ax.get_xticks().size and not ax.get_yticks().size
    colours = points.get_facecolors()
    clean = views == "clean"
    on_top = np.sort(labels[clean] == 2)  # drawn in this order: the highlighted class last
    grey = np.all(np.isclose(colours[:, :3], 0.8), axis=1)
    assert list(grey) == list(~on_top)
    assert np.allclose(colours[on_top][:, :3], plots.class_colors(10)[2][:3])
    # The offsets follow the same order: the last points drawn are the highlighted class's.
    assert set(map(tuple, points.get_offsets()[on_top])) == set(map(tuple, coords[clean][labels[
        clean] == 2]))


def test_plot_umap_legends_name_the_classes_present_and_the_views_drawn():
    coords, labels, views = umap_like()
    labels = labels.copy()
    labels[0] = 10  # beyond the ten class names: shown by its number, in a colour of its own
    ax = plots.plot_umap(coords, labels, views, show_views=["clean", "adv"])
    [legend_] = [c for c in ax.get_children() if isinstance(c, matplotlib.legend.Legend)]
    texts = [t.get_text() for t in legend_.get_texts()]
    assert texts == [CLASSES[0], CLASSES[1], CLASSES[2], CLASSES[3], "10",
                     "view", "clean", "adversarial (PGD)"]
    assert legend_.get_title().get_text() == "class"
    assert legend_.get_texts()[5].get_fontweight() == "bold"   # the views' heading
    assert len(ax.collections) == 2
    assert np.allclose(ax.collections[0].get_facecolors()[0][:3], plots.class_colors(11)[10][:3])
    # One view drawn: the legend names the classes only (in chapter 7's grid it serves every
    # column, and the columns' titles name their views).
    one = plots.plot_umap(coords, labels, views, show_views=["adv"])
    assert [t.get_text() for t in one.get_legend().get_texts()] == texts[:5]


def test_show_images_scales_orients_and_lays_out_its_grid():
    x = torch.zeros(10, 3, 4, 6, dtype=torch.uint8)
    x[:, 0] = 255  # red
    fig = plots.show_images(x, ncols=4)
    axes = fig.axes
    assert len(axes) == 12 and not any(ax.axison for ax in axes)  # 3 rows of 4, no frames
    shown = [ax.images[0].get_array() for ax in axes if ax.images]
    assert len(shown) == 10 and shown[0].shape == (4, 6, 3)  # height x width x channel
    assert np.allclose(shown[0][..., 0], 1.0) and np.allclose(shown[0][..., 1:], 0.0)
    # numpy uint8 in NHWC is scaled too; floats outside [0, 1] are clipped, not wrapped.
    nhwc = plots.show_images(np.full((2, 4, 6, 3), 51, dtype=np.uint8)).axes[0].images[0]
    assert np.allclose(nhwc.get_array(), 0.2)
    clipped = plots.show_images(torch.full((1, 3, 4, 4), 1.7)).axes[0].images[0].get_array()
    assert np.allclose(clipped, 1.0)
    grey = plots.show_images(torch.rand(2, 1, 5, 5), ncols=8)
    assert len(grey.axes) == 2  # no more columns than images
    assert grey.axes[0].images[0].get_cmap().name == "gray"
    assert grey.axes[0].images[0].get_array().shape == (5, 5)
    assert grey.axes[0].images[0].get_clim() == (0, 1)  # black is 0 and white 1, not the range
    mid = plots.show_images(torch.full((1, 3, 2, 2), 51, dtype=torch.uint8))
    assert len(mid.axes) == 1 and np.allclose(mid.axes[0].images[0].get_array(), 0.2)
    # Channels last wins when both ends could be channels (an image 3 pixels high).
    assert plots.show_images(np.zeros((2, 3, 5, 3))).axes[0].images[0].get_array().shape == (3, 5, 3)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        plots.show_images(np.zeros((2, 2)))


def test_history_markers_and_axis_follow_what_is_drawn():
    twelve = [dict(HISTORY[0], epoch=e) for e in range(1, 13)]
    assert plots.plot_history(twelve, columns=["val_pgd"]).get_lines()[0].get_marker() == "^"
    long = [dict(HISTORY[0], epoch=e) for e in range(1, 14)]
    assert plots.plot_history(long, columns=["val_pgd"]).get_lines()[0].get_marker() == "None"
    losses = plots.plot_history(HISTORY, columns=["loss", "val_pgd"])
    assert losses.get_ylabel() == "" and losses.get_ylim() != (0.0, 1.0)  # a loss can exceed 1
    assert plots.plot_history(HISTORY, columns=["val_pgd"]).get_ylabel() == "accuracy"
    # Each accuracy curve has a line and a marker of its own, so colour is not the only cue...
    three = plots.plot_history(HISTORY).get_lines()
    assert len({line.get_linestyle() for line in three}) == 3
    assert len({line.get_marker() for line in three}) == 3
    # ...unless the caller styles the runs (chapter 8: the profile's line, the method's colour).
    given = plots.plot_history(HISTORY, columns=["val_pgd"], linestyle="--", marker="x")
    assert (given.get_lines()[0].get_linestyle(), given.get_lines()[0].get_marker()) == ("--", "x")


def test_eps_curve_legend_only_for_named_curves():
    eps = [0, 4 / 255, 8 / 255]
    assert plots.plot_accuracy_vs_eps(eps, [1.0, 0.5, 0.2]).get_legend() is None
    named = plots.plot_accuracy_vs_eps(eps, [1.0, 0.5, 0.2], label="pgd_at")
    assert [t.get_text() for t in named.get_legend().get_texts()] == ["pgd_at"]
    assert named.get_ylim() == (0.0, 1.0) and named.get_ylabel() == "accuracy"


def test_plot_results_places_each_runs_bar_in_its_own_slot():
    runs = [fake_metrics(m, {"clean": (0.9 - i / 10, 1000), "pgd20": (0.4, 1000)})
            for i, m in enumerate(("standard", "pgd_at", "anchor"))]
    ax = plots.plot_results(runs, attacks=("clean", "pgd20"))
    from matplotlib.container import BarContainer

    groups = [c for c in ax.containers if isinstance(c, BarContainer)]
    centres = [[b.get_x() + b.get_width() / 2 for b in g.patches] for g in groups]
    width = 0.8 / 3
    assert np.allclose(centres, [[a + (i - 1) * width for a in (0, 1)] for i in range(3)])
    assert all(b.get_width() == pytest.approx(width) for g in groups for b in g.patches)


# --- widgets (no frontend) --------------------------------------------------------------------


def test_embedding_explorer_headless():
    import ipywidgets

    box = widgets.embedding_explorer({"pgd_at": umap_like(), "anchor": umap_like(seed=1)})
    assert isinstance(box, ipywidgets.VBox)
    method, view, cls = box.children[0].children
    assert [v for _, v in method.options] == ["pgd_at", "anchor"]
    method.value, view.value, cls.value = "anchor", "adv", 3  # redraws, must not raise
    with pytest.raises(ValueError, match="empty"):
        widgets.embedding_explorer({})


def test_eps_explorer_headless():
    import ipywidgets

    torch.manual_seed(0)
    model = PreActResNet18(width=2, proj_dim=8).eval()
    x = torch.rand(3, 32, 32)
    eps = [0.0, 2 / 255, 8 / 255]
    frames = widgets.eps_frames(model, x, 3, eps, attack="fgsm")
    assert [f["eps"] for f in frames] == eps
    assert torch.equal(frames[0]["x_adv"], frames[0]["x"])
    for f in frames:
        assert (f["x_adv"] - f["x"]).abs().max() <= f["eps"] + 1e-6
        assert f["probs_adv"].shape == (10,) and abs(f["probs_adv"].sum() - 1) < 1e-5
    fig = widgets.plot_eps_frame(frames[2])
    assert len(fig.axes) == 4
    box = widgets.eps_explorer(model, x, torch.tensor([3]), eps, attack="pgd", steps=1)
    assert isinstance(box, ipywidgets.VBox)
    slider = box.children[0]
    slider.value = 2  # redraw, must not raise
    with pytest.raises(ValueError, match="attack"):
        widgets.eps_frames(model, x, 3, eps, attack="cw")


def test_embedding_explorer_redraws_what_the_controls_say(monkeypatch):
    drawn = []
    monkeypatch.setattr(widgets, "plot_umap", lambda *a, **kw: drawn.append((a, kw)))
    monkeypatch.setattr(widgets, "_show", lambda fig: plt.close(fig))
    data = {"pgd_at": umap_like(), "anchor": umap_like(seed=1)}
    box = widgets.embedding_explorer(data, class_names=CLASSES[:4])
    method, view, cls = box.children[0].children
    assert [label for label, _ in view.options] == ["all views", "clean", "aug", "adv"]
    assert cls.options[0] == ("all classes", -1) and [v for _, v in cls.options[1:]] == [0, 1, 2, 3]
    (coords, *_), kw = drawn[-1]  # the first figure: the first method, every view and class
    assert coords is data["pgd_at"][0]
    assert (kw["show_views"], kw["highlight"], kw["title"]) == (None, None, "PGD-AT: all views")
    method.value, view.value, cls.value = "anchor", "adv", 0
    (coords, *_), kw = drawn[-1]
    assert coords is data["anchor"][0]
    assert (kw["show_views"], kw["highlight"], kw["title"]) == (["adv"], 0, "ANCHOR: adv")
    assert list(kw["class_names"]) == list(CLASSES[:4])


def test_eps_frames_are_the_library_attacks_from_the_seeded_start():
    torch.manual_seed(0)
    model = PreActResNet18(width=2, proj_dim=8).eval()
    x8 = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8)
    x = x8.float() / 255
    eps = [0.0, 4 / 255, 8 / 255]
    frames = widgets.eps_frames(model, x8, torch.tensor([5]), eps, steps=3, seed=7)
    assert all(torch.equal(f["x"], x[0]) and f["y"] == 5 for f in frames)  # uint8 read as /255
    for f in frames[1:]:
        torch.manual_seed(7)
        expected = attacks.pgd(model, x, torch.tensor([5]), eps=f["eps"], alpha=f["eps"] / 4,
                               steps=3)
        assert torch.equal(f["x_adv"], expected[0])
        assert (f["x_adv"] - f["x"]).abs().max() > f["eps"] / 2  # it moved
    with torch.no_grad():
        clean = F.softmax(model(x), dim=1)[0].numpy()
    assert np.allclose(frames[0]["probs_clean"], clean, atol=1e-6)
    assert np.allclose(frames[0]["probs_adv"], clean, atol=1e-6)  # eps 0: the clean image
    # The documented defaults: PGD-10 from the start seeded with 0.
    default, = widgets.eps_frames(model, x, 5, [8 / 255])
    explicit, = widgets.eps_frames(model, x, 5, [8 / 255], attack="pgd", steps=10, seed=0)
    assert torch.equal(default["x_adv"], explicit["x_adv"])
    assert not torch.equal(default["x_adv"], widgets.eps_frames(model, x, 5, [8 / 255],
                                                                seed=1)[0]["x_adv"])
    fgsm = widgets.eps_frames(model, x, 5, [8 / 255], attack="fgsm")[0]
    assert torch.equal(fgsm["x_adv"], attacks.fgsm(model, x, torch.tensor([5]), eps=8 / 255)[0])
    for bad in (torch.rand(2, 3, 32, 32), torch.rand(32, 32)):
        with pytest.raises(ValueError, match="one image"):
            widgets.eps_frames(model, bad, 5, eps)


def test_eps_frame_panels_show_the_scaled_perturbation_and_name_the_classes():
    delta = torch.zeros(3, 4, 4)
    delta[0, 0, 0], delta[1, 1, 1] = 8 / 255, -8 / 255
    x = torch.full((3, 4, 4), 0.5)
    probs_clean, probs_adv = np.eye(3)[1], np.eye(3)[2]
    frame = {"eps": 8 / 255, "x": x, "x_adv": x + delta, "probs_clean": probs_clean,
             "probs_adv": probs_adv, "y": 1}
    fig = widgets.plot_eps_frame(frame, class_names=["ant", "bee"])
    img, adv, amp = (ax.images[0].get_array() for ax in fig.axes[:3])
    # 0.5 + delta / (2 eps): +eps is white, -eps black, no change grey.
    assert amp[0, 0, 0] == pytest.approx(1.0, abs=1e-5) and amp[1, 1, 1] == pytest.approx(0, abs=1e-5)
    assert amp[2, 2, 2] == pytest.approx(0.5) and amp.shape == (4, 4, 3)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["clean: bee", "eps=8/255: 2",
                                                       "perturbation (amplified)"]
    ticks = fig.axes[3].get_xticklabels()
    assert [t.get_text() for t in ticks] == ["ant", "bee", "2"]
    assert [t.get_fontweight() for t in ticks] == ["normal", "bold", "normal"]  # the true class
    bars = [p.get_height() for p in fig.axes[3].patches]
    assert bars == [0, 1, 0, 0, 0, 1]  # clean probabilities, then adversarial
    still = widgets.plot_eps_frame(dict(frame, eps=0.0, x_adv=x))
    assert np.allclose(still.axes[2].images[0].get_array(), 0.5)


def test_eps_explorer_slider_starts_at_the_first_radius(monkeypatch):
    shown = []
    monkeypatch.setattr(widgets, "_show", lambda fig: shown.append(fig.axes[1].get_title())
                        or plt.close(fig))
    torch.manual_seed(0)
    model = PreActResNet18(width=2, proj_dim=8).eval()
    box = widgets.eps_explorer(model, torch.rand(3, 32, 32), 3, [0.0, 2 / 255, 8 / 255],
                               steps=1)
    slider, out = box.children
    assert [label for label, _ in slider.options] == ["0/255", "2/255", "8/255"]
    assert slider.value == 0 and shown[-1].startswith("eps=0/255")
    slider.value = 2
    assert shown[-1].startswith("eps=8/255")
    with pytest.raises(ValueError, match="empty"):
        widgets.eps_explorer(model, torch.rand(3, 32, 32), 3, [])


def test_eps_explorer_starts_where_asked(monkeypatch):
    """Chapter 1 starts its slider at 8/255: a page rendered without a kernel keeps the widget's
    first view, which at 0/255 showed a clean image equal to its 'adversarial' one."""
    shown = []
    monkeypatch.setattr(widgets, "_show", lambda fig: shown.append(fig.axes[1].get_title())
                        or plt.close(fig))
    torch.manual_seed(0)
    model = PreActResNet18(width=2, proj_dim=8).eval()
    eps = [0.0, 2 / 255, 8 / 255]
    box = widgets.eps_explorer(model, torch.rand(3, 32, 32), 3, eps, steps=1, start=8 / 255)
    assert box.children[0].value == 2 and shown[-1].startswith("eps=8/255")
    with pytest.raises(ValueError, match=r"start must be one of eps_values .*got 0.5"):
        widgets.eps_explorer(model, torch.rand(3, 32, 32), 3, eps, steps=1, start=0.5)


# --- results (chapter 8's code path) ----------------------------------------------------------


def fake_metrics(method: str, accs: dict[str, tuple[float, int]], *, profile: str = "full",
                 **config) -> dict:
    return {"method": method, "data": "CIFAR-10 (JPEG q75 copy)",
            "hardware": "FAKE GPU (test fixture)", "torch": "0.0", "commit": "0" * 40,
            "seed": 0, "epochs": 30, "selected_epoch": 28, "train_seconds": 100.0,
            "eval_seconds": 10.0, "profile": profile,
            "config": {"method": method, "profile": profile, "beta": 1.0, "lam": 1.0, **config},
            "accuracy": {k: {"value": v, "n": n} for k, (v, n) in accs.items()},
            "sanity": {"more_steps": {"passed": True},
                       "eps_sweep": {"passed": method != "standard"}}}


def full_accs(clean: float, pgd: float, aa: float) -> dict[str, tuple[float, int]]:
    return {"clean": (clean, 10000), "fgsm": (pgd + 0.05, 10000), "pgd20": (pgd, 10000),
            "cw": (max(0.0, pgd - 0.01), 10000), "autoattack": (aa, 1000)}


@pytest.fixture()
def results_root(tmp_path):
    root = tmp_path / "results"
    runs = {"full-standard": fake_metrics("standard", full_accs(0.94, 0.0, 0.0)),
            "full-pgd_at": fake_metrics("pgd_at", full_accs(0.801, 0.50, 0.46)),
            "full-anchor": fake_metrics("anchor", full_accs(0.800, 0.55, 0.47))}
    for name, m in runs.items():
        checkpoint.write_json(root / name / "metrics.json", m)
        checkpoint.write_text(root / name / "history.csv",
                              pd.DataFrame(HISTORY).to_csv(index=False))
    for beta in (2.0, 0.0, 0.5):
        m = fake_metrics("anchor", full_accs(0.8, 0.5 + beta / 100, 0.45), beta=beta)
        # Validation ranks the values unlike the test set (0.5 first), as it may.
        m["validation"] = {"val_clean": 0.79, "val_pgd": 0.48 - abs(beta - 0.5) / 100}
        checkpoint.write_json(root / "ablation_beta" / f"beta-{beta}" / "metrics.json", m)
    (root / "bench").mkdir()
    return root


def test_load_results_and_tables(results_root):
    runs = results.load_results(results_root)
    assert [r.method for r in runs] == ["standard", "pgd_at", "anchor"]  # ablations excluded
    assert all(r.verified for r in runs)
    df = results.results_table(runs)
    assert list(df.index) == ["full-standard", "full-pgd_at", "full-anchor"]
    assert df.loc["full-anchor", "pgd20"] == pytest.approx(0.55)
    assert df.loc["full-anchor", "n_autoattack"] == 1000
    shown = results.format_results_table(df)
    # A sample size every row shares is in the header; one that differs is in each cell.
    assert shown.loc["full-anchor", "PGD-20 (n=10,000)"] == "55.0 %"
    mixed = df.copy()
    mixed.loc["full-standard", "n_pgd20"] = 1000
    mixed.loc["full-pgd_at", "pgd20"] = np.nan
    shown_mixed = results.format_results_table(mixed)
    assert list(shown_mixed["PGD-20"]) == ["{:.1f} % (n=1,000)".format(
        100 * df.loc["full-standard", "pgd20"]), "—", "55.0 % (n=10,000)"]
    assert shown.loc["full-anchor", "method"] == "ANCHOR"
    prov = results.provenance_table(runs)
    assert set(prov.columns) >= {"data", "hardware", "commit", "seed", "epochs", "train_seconds",
                                 "eval_batch_size", "sha256"}
    assert (prov["sha256"] == "verified").all()
    assert (prov["attack_search"] == "fp32").all()  # written without eval_search: fp32
    tf32 = {"eval_search": "tf32", "accuracy": {"pgd20": {"tf32_check": {"passed": True,
                                                                         "points": 0.02}}}}
    assert results.attack_search(tf32) == "TF32 (PGD-20 check +0.02 points)"
    tf32["accuracy"]["pgd20"]["tf32_check"] = {"passed": False, "points": -0.35}
    assert results.attack_search(tf32) == "fp32 (TF32 check failed: -0.35 points)"
    assert results.attack_search({"eval_search": "tf32", "accuracy": {"pgd20": {}}}) == \
        "fp32 (TF32 asked; none on this hardware)"
    sanity = results.sanity_table(runs)
    assert not sanity.loc["full-standard", "eps_sweep"] and sanity.loc["full-anchor", "eps_sweep"]
    # dicts work too (metrics_list), and a missing attack is NaN, never a guess
    m = fake_metrics("trades", {"clean": (0.8, 100)}, profile="demo")
    df2 = results.results_table([m])
    assert df2.index[0] == "demo-trades" and np.isnan(df2.loc["demo-trades", "cw"])


@pytest.mark.bad_input(cases=1)
def test_split_shared_names_once_what_every_row_shares():
    import pandas as pd

    df = pd.DataFrame({"method": ["PGD-AT", "ANCHOR"], "profile": ["full", "full"],
                       "data": ["CIFAR-10 (JPEG q75 copy)"] * 2, "Clean": ["75.8 %", "77.0 %"]},
                      index=["full-pgd_at", "full-anchor"])
    table, shared = results.split_shared(df)
    assert shared == {"profile": "full", "data": "CIFAR-10 (JPEG q75 copy)"}
    assert list(table.columns) == ["method", "Clean"] and list(table.index) == list(df.index)
    assert list(df.columns) == ["method", "profile", "data", "Clean"]  # the input is kept
    one, shared_one = results.split_shared(df.iloc[:1], ("method", "profile"))
    assert shared_one == {"method": "PGD-AT", "profile": "full"}
    assert list(one.columns) == ["data", "Clean"]
    empty, nothing = results.split_shared(df.iloc[:0])
    assert nothing == {} and list(empty.columns) == list(df.columns)
    with pytest.raises(ValueError, match="no column\\(s\\) 'epochs' in the table"):
        results.split_shared(df, ("method", "epochs"))


def test_compare_states_the_winner_from_the_files(results_root):
    runs = results.load_results(results_root)
    cmp = results.compare(runs, "anchor", "pgd_at")
    assert cmp.loc["PGD-20", "verdict"] == "ANCHOR higher"
    assert cmp.loc["PGD-20", "difference"] == pytest.approx(5.0)
    assert cmp.loc["Clean", "verdict"] == "within noise"  # 0.1 points on 10,000 images
    assert cmp.loc["AutoAttack", "verdict"] == "within noise"  # 1 point on 1,000 images
    assert cmp.loc["AutoAttack", "n_method"] == 1000
    assert results.compare(runs, "anchor", "pgd_at", profile="demo").empty


def _paired_root(tmp_path, b: int, c: int, seeds: int = 1):
    """PGD-AT right on the first 500 of 1,000 PGD-20 images; ANCHOR the same but also right on
    the next ``b`` and wrong on the last ``c`` of PGD-AT's."""
    root = tmp_path / "paired"
    base = np.zeros(1000, dtype=bool)
    base[:500] = True
    mine = base.copy()
    mine[500:500 + b] = True
    mine[500 - c:500] = False
    for seed in range(seeds):
        for method, mask in (("pgd_at", base), ("anchor", mine)):
            accs = {"clean": (0.8, 1000), "pgd20": (float(mask.mean()), 1000)}
            m = {**fake_metrics(method, accs), "seed": seed}
            folder = root / f"full-{method}-{seed}"
            checkpoint.write_json(folder / "metrics.json", m)
            results.save_per_image(folder / "per_image.npz",
                                   {"clean": np.ones(1000, dtype=bool) & (np.arange(1000) < 800),
                                    "pgd20": mask}, {"method": method})
    return root


def test_compare_is_paired_when_both_runs_have_per_image_masks(tmp_path):
    runs = results.load_results(_paired_root(tmp_path, b=20, c=0))
    row = results.compare(runs, "anchor", "pgd_at", attacks=("pgd20",)).loc["PGD-20"]
    # 52 % vs 50 % on 1,000 images: 4.5 points of unpaired noise would call it a tie, but the
    # models disagree on 20 images only, all in ANCHOR's favour.
    assert row["test"] == "paired" and (row["only_method"], row["only_baseline"]) == (20, 0)
    assert row["difference"] == pytest.approx(2.0)
    assert row["noise_2se"] == pytest.approx(200 * np.sqrt(20) / 1000)
    assert row["verdict"] == "ANCHOR higher"
    assert row["p_value"] == pytest.approx(2 * 0.5 ** 20)
    # Few disagreements: the exact test decides (4 of 4 has p = 0.125, 6 of 6 has p = 0.03).
    for b, verdict in ((4, "within noise"), (6, "ANCHOR higher")):
        row = results.compare(results.load_results(_paired_root(tmp_path / str(b), b=b, c=0)),
                              "anchor", "pgd_at", attacks=("pgd20",)).loc["PGD-20"]
        assert row["p_value"] == pytest.approx(2 * 0.5 ** b) and row["verdict"] == verdict
    # Disagreeing both ways on many images is noise, whichever way the net count falls.
    row = results.compare(results.load_results(_paired_root(tmp_path / "b", b=40, c=30)),
                          "anchor", "pgd_at", attacks=("pgd20",)).loc["PGD-20"]
    assert row["test"] == "paired" and row["difference"] == pytest.approx(1.0)
    assert row["verdict"] == "within noise"
    scipy_stats = pytest.importorskip("scipy.stats")
    assert row["p_value"] == pytest.approx(scipy_stats.binomtest(40, 70, 0.5).pvalue)


def test_compare_falls_back_to_unpaired_and_checks_the_masks(tmp_path):
    # Two seeds per method are averaged: no single pairing, so the unpaired test.
    runs = results.load_results(_paired_root(tmp_path, b=20, c=0, seeds=2))
    row = results.compare(runs, "anchor", "pgd_at", attacks=("pgd20",)).loc["PGD-20"]
    assert row["test"] == "unpaired, seeds" and row["runs_method"] == 2
    assert np.isnan(row["p_value"]) and row["verdict"] == "within noise"
    # Parsed dicts carry no masks either.
    row = results.compare([r.metrics for r in runs if r.metrics["seed"] == 0], "anchor", "pgd_at",
                          attacks=("pgd20",)).loc["PGD-20"]
    assert row["test"] == "unpaired"
    # A mask that disagrees with its metrics.json (say, rewritten by `evaluate --out`) is not
    # paired with anything: a warning, and the unpaired test.
    root = _paired_root(tmp_path / "bad", b=20, c=0)
    wrong = np.zeros(1000, dtype=bool)
    results.save_per_image(root / "full-anchor-0" / "per_image.npz", {"pgd20": wrong})
    with pytest.warns(UserWarning, match="pgd20 mask.*does not match metrics.json.*unpaired"):
        row = results.compare(results.load_results(root), "anchor", "pgd_at",
                              attacks=("pgd20",)).loc["PGD-20"]
    assert row["test"] == "unpaired"
    with pytest.raises(ValueError, match="non-empty 1-d bool array"):
        results.save_per_image(tmp_path / "x.npz", {"pgd20": np.zeros(3)})


def test_compare_counts_the_spread_between_seeds(tmp_path):
    """Averaged seeds are judged by their spread as well as by the test images' sampling: two
    ANCHOR seeds at 38.5 % and 44.5 % against PGD-AT's 39.0 % and 39.2 % (a statistics review's
    example) lead by 2.4 points, beyond the 1.39 points of sampling noise, yet one ANCHOR seed is
    below both of PGD-AT's."""
    for method, values in (("anchor", (0.385, 0.445)), ("pgd_at", (0.390, 0.392))):
        for seed, value in enumerate(values):
            checkpoint.write_json(tmp_path / f"full-{method}-{seed}" / "metrics.json",
                                  {**fake_metrics(method, {"pgd20": (value, 10000)}),
                                   "seed": seed})
    row = results.compare(results.load_results(tmp_path), "anchor", "pgd_at",
                          attacks=("pgd20",)).loc["PGD-20"]
    sampling = results.unpaired_noise(0.415, 10000, 0.391, 10000)
    seeds = results.seed_noise([[0.385, 0.445], [0.390, 0.392]])
    pooled = ((0.445 - 0.385) ** 2 / 2 + (0.392 - 0.390) ** 2 / 2) / 2   # two variances, 1 dof
    assert seeds == pytest.approx(200 * np.sqrt(pooled * (1 / 2 + 1 / 2)))
    assert row["test"] == "unpaired, seeds" and row["difference"] == pytest.approx(2.4)
    assert row["noise_2se"] == pytest.approx(np.hypot(sampling, seeds))
    assert row["noise_2se"] > 2.4 > sampling and row["verdict"] == "within noise"
    # One seed a side: no spread to measure, the sampling noise alone (and the label says so).
    assert results.seed_noise([[0.4], [0.5]]) is None
    # A side of one seed is taken to vary as much as the other side's seeds.
    assert results.seed_noise([[0.4, 0.5], [0.45]]) == pytest.approx(
        200 * np.sqrt(0.005 * (1 / 2 + 1)))


def test_holm_adjusts_a_family_of_p_values():
    assert results.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # 0.023 x 2 = 0.046, raised to the 0.048 before it: adjusted p never falls with rank
    assert results.holm([0.023, 0.82, 0.016, 0.001]) == pytest.approx([0.048, 0.82, 0.048, 0.004])
    assert results.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])        # capped at 1
    assert results.holm([0.02]) == [0.02] and results.holm([]) == []
    with pytest.raises(ValueError, match=r"p_values must be numbers in \[0, 1\], got \[0.01, nan\]"):
        results.holm([0.01, float("nan")])


def test_a_tie_on_validation_goes_to_the_default():
    """Validation accuracies move in steps of one image: a tie between β = 0 (listed first) and
    the default β = 1 must not turn ANCHOR into SupCon-AT."""
    assert results.best_value({"0.0": 0.46, "0.5": 0.45, "1.0": 0.46}, "beta") == "1.0"
    assert results.best_value({"0.0": 0.46, "0.5": 0.47, "1.0": 0.46}, "beta") == "0.5"
    assert results.best_value({"0.0": 0.46, "2.0": 0.46}, "beta") == "0.0"   # no default tied
    assert results.best_value({"0": 0.46, "1": 0.46}, "beta") == "1"   # an int names it too
    assert results.best_value({"0.0": float("nan"), "1.0": 0.4}, "beta") == "1.0"
    assert results.best_value({"False": 0.4, "True": 0.4}, "adv_in_contrastive") == "True"
    with pytest.raises(ValueError, match="no finite score to choose beta by"):
        results.best_value({"0.0": float("nan")}, "beta")
    runs = [fake_metrics("anchor", {"clean": (0.8, 100)}, beta=b) for b in (0.0, 0.5, 1.0)]
    for m, val in zip(runs, (0.46, 0.45, 0.46), strict=True):
        m["validation"] = {"val_pgd": val}
    assert results.ablation_choice(runs, "beta", (0.0, 0.5, 1.0))["leading"] == "1.0"


def _validated_pair(root, b: int, c: int, *, val_size: int = 1000, with_masks=(True, True)):
    """Two ablation runs validated on the same 1,000 images: run "beta-1.0" right on the first
    400, run "beta-0.5" the same but also on the next ``b`` and wrong on the last ``c`` of them."""
    base = np.arange(1000) < 400
    mine = base.copy()
    mine[400:400 + b] = True
    mine[400 - c:400] = False
    runs = []
    for (name, mask), keep in zip((("beta-0.5", mine), ("beta-1.0", base)), with_masks, strict=True):
        m = fake_metrics("anchor", {"clean": (0.8, 1000)}, val_size=val_size,
                         beta=float(name.split("-")[1]))
        m["validation"] = {"val_clean": 0.7, "val_pgd": float(mask.mean())}
        checkpoint.write_json(root / name / "metrics.json", m)
        masks = {"clean": np.arange(1000) < 800}
        if keep:
            masks |= {"val_clean": np.arange(1000) < 700, "val_pgd": mask}
        results.save_per_image(root / name / "per_image.npz", masks, {"method": "anchor"})
        runs.append(results.load_run(root / name))
    return runs


def test_validation_difference_pairs_the_validation_images(tmp_path):
    """Two runs 2 points apart on 1,000 validation images: within the 4.4-point unpaired
    yardstick, but 20 images to none, paired: beyond noise."""
    chosen, default = _validated_pair(tmp_path, b=20, c=0)
    row = results.validation_difference(chosen, default)
    assert row["test"] == "paired" and (row["only_method"], row["only_baseline"]) == (20, 0)
    assert row["difference"] == pytest.approx(2.0) and row["p_value"] == pytest.approx(2 * 0.5 ** 20)
    assert row["verdict"] == "beta-0.5 higher" and row["n_method"] == 1000
    assert results.describe_difference(row).startswith("+2.00 points (noise ±0.89, paired, p <")
    same = results.validation_difference(chosen, default, "val_clean")
    assert same["difference"] == 0 and same["verdict"] == "within noise"
    # Many disagreements both ways: noise, whichever way the count falls.
    assert results.validation_difference(*_validated_pair(tmp_path / "b", b=40, c=30)
                                         )["verdict"] == "within noise"


def test_validation_difference_without_masks_or_on_other_images(tmp_path):
    old = _validated_pair(tmp_path / "old", b=20, c=0, with_masks=(True, False))
    assert results.validation_difference(*old) is None  # a run written before the masks
    with pytest.raises(ValueError, match="key must be one of val_clean, val_pgd"):
        results.validation_difference(*old, key="pgd20")
    other = _validated_pair(tmp_path / "other", b=20, c=0, val_size=500)
    with pytest.raises(ValueError, match="validated on different images"):
        results.validation_difference(old[0], other[1])
    # A mask that disagrees with metrics.json is not used.
    chosen, default = _validated_pair(tmp_path / "bad", b=20, c=0)
    results.save_per_image(chosen.per_image_path, {"val_pgd": np.zeros(1000, dtype=bool)})
    with pytest.warns(UserWarning, match="val_pgd mask .* does not match metrics.json"):
        assert results.validation_difference(chosen, default) is None


def test_compare_runs_pairs_two_runs_of_one_method(tmp_path):
    """Two ablation values are runs of one method, which compare() cannot tell apart by method:
    compare_runs pairs the two runs themselves, and names the higher run in its verdict."""
    root = _paired_root(tmp_path, b=20, c=3)
    anchor, pgd_at = results.load_run(root / "full-anchor-0"), results.load_run(root / "full-pgd_at-0")
    tab = results.compare_runs(anchor, pgd_at, attacks=("clean", "pgd20", "autoattack"))
    assert list(tab.index) == ["Clean", "PGD-20"]  # neither run has AutoAttack
    row = tab.loc["PGD-20"]
    assert row["test"] == "paired" and (row["only_method"], row["only_baseline"]) == (20, 3)
    assert row["difference"] == pytest.approx(1.7) and row["verdict"] == "full-anchor-0 higher"
    assert tab.loc["Clean", "verdict"] == "within noise" and tab.loc["Clean", "difference"] == 0
    # The same numbers as compare() gives for the two methods.
    same = results.compare([anchor, pgd_at], "anchor", "pgd_at", attacks=("pgd20",)).loc["PGD-20"]
    assert same.drop("verdict").equals(row.drop("verdict"))
    flipped = results.compare_runs(pgd_at, anchor, attacks=("pgd20",)).loc["PGD-20"]
    assert flipped["difference"] == pytest.approx(-1.7) and flipped["verdict"] == row["verdict"]
    # Grouped by verdict, under the rows' own labels (chapter 8's summary of the evidence).
    assert results.verdicts_by_attack(tab) == {"ahead": ["PGD-20"], "behind": [],
                                               "within noise": ["Clean"]}
    assert results.verdicts_by_attack(results.compare_runs(pgd_at, anchor, attacks=("pgd20",))) \
        == {"ahead": [], "behind": ["PGD-20"], "within noise": []}
    assert results.describe_difference(row) == (
        "+1.70 points (noise ±0.96, paired, p < 0.001) -> full-anchor-0 higher")
    unpaired = row.copy()  # the words of an unpaired row carry no p-value
    unpaired[["test", "p_value"]] = ["unpaired", np.nan]
    assert results.describe_difference(unpaired) == (
        "+1.70 points (noise ±0.96, unpaired) -> full-anchor-0 higher")
    # Few disagreements: 7 against 1 of 150 images is beyond ±2 s.e. (4.0 > 3.77 points) but
    # McNemar's exact p is 0.07: the verdict follows p, and the words say so.
    few = results.paired_difference(np.r_[[True] * 7, [False] * 143],
                                    np.r_[[False] * 7, [True], [False] * 142])
    assert few["difference"] > few["noise_2se"] and few["p_value"] >= 0.05
    assert results.describe_difference({**few, "test": "paired", "verdict": "within noise"}) == (
        "+4.00 points (noise ±3.77, paired, p = 0.070) -> within noise (by the exact p: with this "
        "few disagreeing images the ±2 s.e. understates the noise)")
    # The other way round: p just under 0.05 for a difference inside the band (a review's
    # example, 1,049 against 960 of 10,000 images).
    near = results.paired_difference(np.r_[[True] * 1049, [False] * 8951],
                                     np.r_[[False] * 1049, [True] * 960, [False] * 7991])
    assert near["p_value"] < 0.05 and near["difference"] <= near["noise_2se"]
    assert results.describe_difference({**near, "test": "paired", "verdict": "A higher"}) == (
        "+0.89 points (noise ±0.90, paired, p = 0.050) -> A higher (by the exact p, just under "
        "0.05: the ±2 s.e. band, an approximation, is a little wider)")



def test_attack_gap_tells_a_weaker_loss_from_masking(tmp_path):
    """PGD-20 right on 400 of 1,000 images, AutoAttack (first 100 only) on 30 of them; CW breaks
    6 of the 10 images AutoAttack breaks and PGD-20 does not."""
    pgd = np.arange(1000) < 400
    aa = np.arange(100) < 30
    cw = pgd.copy()
    cw[30:36] = False
    accs = {"clean": (0.9, 1000), "pgd20": (0.4, 1000), "cw": (float(cw.mean()), 1000),
            "autoattack": (0.3, 100)}
    folder = tmp_path / "full-pgd_at"
    checkpoint.write_json(folder / "metrics.json", fake_metrics("pgd_at", accs))
    results.save_per_image(folder / "per_image.npz", {"clean": np.arange(1000) < 900,
                                                      "pgd20": pgd, "cw": cw, "autoattack": aa})
    run = results.load_run(folder)
    gap = results.attack_gap(run)
    assert gap["n"] == 100  # compared on AutoAttack's images only, not PGD-20's 1,000
    assert (gap["weak"], gap["strong"]) == (1.0, 0.3) and gap["gap"] == pytest.approx(70.0)
    assert (gap["strong_only"], gap["weak_only"]) == (70, 0)
    assert gap["also_broken"] == {"cw": 6}
    assert gap["ensemble"]["accuracy"] == pytest.approx(0.94)
    assert gap["ensemble"]["gap"] == pytest.approx(64.0)
    # An attack the run has no mask for is named, with what the run has.
    with pytest.raises(ValueError, match="no usable per-image mask for 'fgsm'.*autoattack"):
        results.attack_gap(run, others=("fgsm",))
    (folder / "per_image.npz").unlink()
    with pytest.raises(ValueError, match="per_image.npz"):
        results.attack_gap(results.load_run(folder))

def test_plot_results_bars_and_their_noise(results_root):
    runs = results.load_results(results_root)
    ax = plots.plot_results(runs, attacks=("clean", "pgd20", "autoattack"))
    from matplotlib.container import BarContainer

    groups = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [len(g.patches) for g in groups] == [3, 3, 3]  # three runs, three attacks each
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Clean", "PGD-20", "AutoAttack"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Standard", "PGD-AT", "ANCHOR"]
    anchor_bars = groups[2]
    assert [b.get_height() for b in anchor_bars.patches] == pytest.approx([0.8, 0.55, 0.47])
    # Each method has its colour in every figure that compares methods.
    from matplotlib.colors import to_rgba

    assert [g.patches[0].get_facecolor() for g in groups] == [
        to_rgba(plots.METHOD_COLORS[m]) for m in ("standard", "pgd_at", "anchor")]
    # Whiskers are two standard errors of each accuracy: wider on 1,000 images than on 10,000.
    lines = anchor_bars.errorbar.lines[2][0].get_segments()
    half = [abs(seg[1][1] - seg[0][1]) / 2 for seg in lines]
    assert half == pytest.approx([2 * np.sqrt(p * (1 - p) / n) for p, n in
                                  ((0.8, 10000), (0.55, 10000), (0.47, 1000))])
    # Two runs of one method are told apart by their run names.
    twice = [*runs, results.load_run(results_root / "ablation_beta" / "beta-2.0")]
    labels = [t.get_text() for t in plots.plot_results(twice).get_legend().get_texts()]
    assert labels[-1] == "beta-2.0" and labels[0] == "full-standard"
    # A bar of height 0 says so; the others carry no label.
    zero = fake_metrics("standard", {"clean": (0.9, 100), "pgd20": (0.0, 100)})
    ax = plots.plot_results([zero], attacks=("clean", "pgd20"))
    assert [t.get_text() for t in ax.texts] == ["", "0"]
    with pytest.raises(ValueError, match="plot_results needs runs"):
        plots.plot_results([])

def test_plots_leave_out_attacks_no_run_was_evaluated_with():
    runs = [fake_metrics(m, {"clean": (0.8, 100), "pgd20": (0.4, 100)}, beta=b)
            for m, b in (("anchor", 0.5), ("anchor", 1.0))]
    for r, v in zip(runs, (0.3, 0.35), strict=True):
        r["validation"] = {"val_clean": 0.7, "val_pgd": v}
    ax = plots.plot_results(runs[:1])  # every attack asked for, two evaluated
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Clean", "PGD-20"]
    with pytest.raises(ValueError, match="plot_results needs runs"):
        plots.plot_results(runs[:1], attacks=("autoattack",))
    ax = plots.plot_ablation(runs, "beta")  # its default attacks include AutoAttack
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "test Clean", "test PGD-20", "validation PGD"]


def test_history_and_ablation_plots(results_root):
    runs = results.load_results(results_root)
    hist = results.load_history(runs[-1].history_path)  # verified against its sidecar
    assert list(hist["epoch"]) == [1, 2, 3]
    ax = plots.plot_history(runs[-1].history_path, label="anchor")
    assert ax.get_legend() is not None
    abl = results.load_ablations(results_root)
    assert list(abl) == ["ablation_beta"]
    param = results.ablation_param("ablation_beta", abl["ablation_beta"])
    assert param == "beta"
    table = results.ablation_table(abl["ablation_beta"], param)
    assert list(table["beta"]) == [0.0, 0.5, 2.0]
    assert list(table["val_pgd"]) == pytest.approx([0.475, 0.48, 0.465])
    assert list(table["pgd20"]) == pytest.approx([0.5, 0.505, 0.52])
    ax = plots.plot_ablation(abl["ablation_beta"], param)
    assert ax.get_xlabel() == "β" and len(ax.get_lines()) == 4  # the book's symbol
    # test lines for the report, and the validation line the knob is chosen on, dashed
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "test Clean", "test PGD-20", "test AutoAttack", "validation PGD"]
    # with the runs' validation attack recorded, the legend names its steps
    with_steps = [dict(r.metrics, config={**r.metrics["config"], "val_attack_steps": 10})
                  for r in abl["ablation_beta"]]
    texts = [t.get_text() for t in plots.plot_ablation(with_steps, param).get_legend().get_texts()]
    assert texts[-1] == "validation PGD-10"
    assert ax.get_lines()[-1].get_linestyle() == "--"
    assert list(ax.get_lines()[-1].get_ydata()) == pytest.approx([0.475, 0.48, 0.465])
    # the varied field is found even when the folder name is not a config key
    assert results.ablation_param("ablation_mining", abl["ablation_beta"]) == "beta"


def test_ablation_choice_reads_validation_and_the_summary(results_root):
    """Until every planned value has run, nothing is chosen; the leader is the best on
    validation (not on the test set, where beta 2.0 leads here); the chosen value is the
    summary's."""
    runs = results.load_ablations(results_root)["ablation_beta"]
    assert results.load_ablation_summary(results_root) is None
    state = results.ablation_choice(runs, "beta", (0.0, 0.5, 1.0, 2.0))
    assert state == {"param": "beta", "finished": ["0.0", "0.5", "2.0"], "missing": ["1.0"],
                     "leading": "0.5", "chosen": None}
    summary = {"params": {"beta": {"chosen": "0.5"}}}
    checkpoint.write_json(results_root / "ablation_summary.json", summary)
    loaded = results.load_ablation_summary(results_root)
    assert results.ablation_choice(runs, "beta", (0.0, 0.5, 2.0), loaded)["chosen"] == "0.5"
    (results_root / "ablation_summary.json").write_text(json.dumps({"params": {}}))
    with pytest.raises(checkpoint.CheckpointError, match="ablation_summary"):
        results.load_ablation_summary(results_root)  # edited after its sidecar was written
    (results_root / "ablation_summary.json.sha256").unlink()  # unverified, but no summary
    (results_root / "ablation_summary.json").write_text("[]")
    with pytest.raises(checkpoint.CheckpointError, match="should hold a JSON object, not a list"):
        results.load_ablation_summary(results_root)


def test_malformed_or_damaged_results_are_refused(results_root, tmp_path):
    assert results.load_results(tmp_path / "nowhere") == []
    assert results.load_ablations(tmp_path / "nowhere") == {}
    path = results_root / "full-anchor" / "metrics.json"
    path.write_text(path.read_text().replace("0.55", "0.65"))  # edited after the fact
    with pytest.raises(checkpoint.CheckpointError, match="full-anchor"):
        results.load_results(results_root)
    bad = tmp_path / "bad" / "run"
    bad.mkdir(parents=True)
    m = fake_metrics("anchor", {"clean": (1.5, 10)})
    (bad / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"run/metrics.json.*value must be a number in \[0, 1\]"):
        results.load_results(bad.parent)
    del m["hardware"]
    with pytest.raises(ValueError, match="hardware"):
        results.validate_metrics(m, "x")


def test_committed_embeddings_and_tutorial_checkpoints(results_root, tmp_path, monkeypatch):
    from anchor_lib import embeddings
    from anchor_lib.train import TrainConfig

    assert results.find_embeddings("anchor", results_root) is None
    rng = np.random.default_rng(0)
    z = rng.standard_normal((8, 4))
    emb = {"clean": z, "aug": z, "adv": z, "labels": np.arange(8) % 2}
    embeddings.save_embeddings(results_root / "full-anchor" / "embeddings.npz", emb, {})
    run = results.find_embeddings("anchor", results_root)
    assert run is not None and run.name == "full-anchor"
    assert results.find_embeddings("anchor", results_root, profile="demo") is None

    root = tmp_path / "checkpoints"
    assert results.load_tutorial_checkpoint("anchor", root) is None  # no manifest yet
    torch.manual_seed(0)
    model = PreActResNet18(width=2, proj_dim=8)
    cfg = TrainConfig(method="anchor", width=2, proj_dim=8)
    from dataclasses import asdict

    checkpoint.save({"model": {k: v.half() if v.is_floating_point() else v
                               for k, v in model.state_dict().items()},
                     "config": asdict(cfg)}, root / "anchor-w2.pt")
    sha = checkpoint.sha256_file(root / "anchor-w2.pt")
    (root / "manifest.json").write_text(json.dumps(
        {"checkpoints": [{"method": "anchor", "file": "anchor-w2.pt", "sha256": sha}]}))
    loaded, state, entry = results.load_tutorial_checkpoint("anchor", root)
    assert entry["sha256"] == sha and not loaded.training and loaded.width == 2
    assert results.load_tutorial_checkpoint("pgd_at", root) is None
    # By default the checkpoints are looked for beside the results folder, wherever
    # ANCHOR_RESULTS_DIR puts it (a clone on Colab, with a pip-installed anchor_lib).
    monkeypatch.setenv("ANCHOR_RESULTS_DIR", str(results_root))
    assert results.load_tutorial_checkpoint("anchor")[2]["sha256"] == sha
    monkeypatch.setenv("ANCHOR_RESULTS_DIR", str(tmp_path / "elsewhere" / "results"))
    assert results.load_tutorial_checkpoint("anchor") is None
    (root / "manifest.json").write_text(json.dumps(
        {"anchor": {"file": "anchor-w2.pt", "sha256": "0" * 64}}))
    with pytest.raises(checkpoint.CheckpointError, match="anchor-w2.pt"):
        results.load_tutorial_checkpoint("anchor", root)


def test_knobs_table_says_where_each_knob_came_from():
    anchor = fake_metrics("anchor", full_accs(0.8, 0.5, 0.45), beta=0.5, temperature=0.1)
    anchor["knobs"] = {"beta": {"value": 0.5, "source": "validation"},
                       "temperature": {"value": 0.1, "source": "default"},
                       "lam": {"value": 1.0, "source": "default"}}
    supcon = fake_metrics("supcon_at", full_accs(0.8, 0.5, 0.45), temperature=0.1)
    old = fake_metrics("anchor", full_accs(0.8, 0.5, 0.45), profile="tutorial", temperature=0.1)
    pgd = fake_metrics("pgd_at", full_accs(0.8, 0.5, 0.45))
    table = results.knobs_table([anchor, supcon, old, pgd])
    assert list(table.index) == ["full-anchor", "full-supcon_at", "tutorial-anchor"]
    assert table.loc["full-anchor", "beta"] == "0.5 (validation)"
    assert table.loc["full-anchor", "temperature"] == "0.1 (default)"
    assert table.loc["full-supcon_at", "beta"] == "0 (by definition)"
    assert table.loc["full-supcon_at", "lam"] == "1.0 (not recorded)"
    assert table.loc["tutorial-anchor", "beta"] == "1.0 (not recorded)"
    assert results.knobs_table([pgd]).empty


def test_compare_refuses_to_average_different_experiments():
    """With profile=None, runs of two profiles (widths) would be averaged as if seeds."""
    full = fake_metrics("anchor", full_accs(0.8, 0.5, 0.45), width=64)
    small = fake_metrics("anchor", full_accs(0.7, 0.4, 0.35), profile="tutorial", width=16)
    base = fake_metrics("pgd_at", full_accs(0.8, 0.5, 0.45), width=64)
    with pytest.raises(ValueError, match="one profile, width and data copy.*profile="):
        results.compare([full, small, base], profile=None)
    assert not results.compare([full, small, base], profile="full").empty


@pytest.mark.bad_input(cases=8)
def test_validate_metrics_names_each_malformed_accuracy_entry():
    """Each way an accuracy entry can be malformed is refused on its own, with what came."""
    good = fake_metrics("anchor", {"clean": (0.5, 10)})
    assert results.validate_metrics(good) is good
    cases = [({}, "'accuracy' must be a non-empty object"),
             ([["clean", 0.5]], "'accuracy' must be a non-empty object"),
             ({"clean": 0.5}, r"accuracy\['clean'\] must be \{'value': v, 'n': n\}, got 0.5"),
             ({"clean": {"value": 0.5}}, r"accuracy\['clean'\] must be .*got \{'value': 0.5\}"),
             ({"clean": {"n": 10}}, r"accuracy\['clean'\] must be .*got \{'n': 10\}"),
             ({"clean": {"value": 0.5, "n": True}}, r"\.n must be an int >= 1, got True"),
             ({"clean": {"value": 0.5, "n": 0}}, r"\.n must be an int >= 1, got 0"),
             ({"clean": {"value": 0.5, "n": "10"}}, r"\.n must be an int >= 1, got '10'")]
    for accuracy, message in cases:
        with pytest.raises(ValueError, match=message):
            results.validate_metrics({**good, "accuracy": accuracy})


def test_mcnemar_p_is_the_exact_two_sided_binomial_test():
    """Against scipy's exact binomial test at p = 1/2, where the two-sided p-value is twice the
    smaller tail, capped at 1; no disagreements at all is no evidence (p = 1)."""
    from scipy.stats import binomtest

    assert results._mcnemar_p(0, 0) == 1.0
    for b, c in [(3, 3), (0, 5), (5, 0), (7, 2), (1, 1), (0, 1), (40, 20), (120, 95)]:
        want = binomtest(b, b + c, 0.5).pvalue
        assert results._mcnemar_p(b, c) == pytest.approx(want, rel=1e-9), (b, c)
        assert 0 < results._mcnemar_p(b, c) <= 1.0


@pytest.mark.bad_input(cases=2)
def test_paired_difference_counts_the_images_the_two_disagree_on():
    right = np.array([True, True, True, False, False, True, True, True])
    other = np.array([True, False, False, False, True, True, True, True])
    d = results.paired_difference(right, other)
    assert (d["only_method"], d["only_baseline"]) == (2, 1)
    assert d["difference"] == pytest.approx(100 / 8) and d["noise_2se"] == pytest.approx(
        200 * np.sqrt(3) / 8)
    assert d["p_value"] == results._mcnemar_p(2, 1)
    for bad in (other[:-1], np.zeros((2, 4), dtype=bool)):
        with pytest.raises(ValueError, match=r"two \(N,\) outcome arrays"):
            results.paired_difference(right, bad)


def test_tables_read_an_older_runs_profile_from_its_config():
    """Runs written before metrics.json had a top-level profile name it in their config."""
    m = fake_metrics("pgd_at", {"clean": (0.8, 100)}, profile="demo")
    del m["profile"]
    assert results.results_table([m]).loc["demo-pgd_at", "profile"] == "demo"
    assert results.provenance_table([m]).loc["demo-pgd_at", "profile"] == "demo"
    assert results.results_table([{**m, "profile": "full"}]).iloc[0]["profile"] == "full"


def test_default_root_outside_a_clone(tmp_path, monkeypatch):
    """$ANCHOR_RESULTS_DIR first; then the repository's data/results; a pip-installed package
    (none beside it) looks in ../data/results, then data/results, under the working directory
    (a notebook in a clone's book/ folder), and otherwise names a folder that does not exist."""
    monkeypatch.delenv("ANCHOR_RESULTS_DIR", raising=False)
    assert results.default_root() == results._REPO_RESULTS
    monkeypatch.setenv("ANCHOR_RESULTS_DIR", str(tmp_path / "mine"))
    assert results.default_root() == tmp_path / "mine"
    monkeypatch.delenv("ANCHOR_RESULTS_DIR")
    missing = tmp_path / "site-packages" / "data" / "results"
    monkeypatch.setattr(results, "_REPO_RESULTS", missing)
    book = tmp_path / "clone" / "book"
    (book / "data" / "results").mkdir(parents=True)  # data/results under book/: the second try
    monkeypatch.chdir(book)
    assert results.default_root() == book / "data" / "results"
    (tmp_path / "clone" / "data" / "results").mkdir(parents=True)
    assert results.default_root() == tmp_path / "clone" / "data" / "results"  # ../ comes first
    monkeypatch.chdir(tmp_path)
    assert results.default_root() == missing and not missing.exists()


def test_compare_pairs_only_single_runs_with_matching_masks(tmp_path):
    """Each condition of a paired comparison on its own: one run a side, both loaded from files,
    the same data copy and n, and both masks present; otherwise the unpaired test, whose two
    standard errors are those of two independent accuracies."""
    root = _paired_root(tmp_path, b=20, c=0)
    anchor, pgd_at = results.load_run(root / "full-anchor-0"), results.load_run(root / "full-pgd_at-0")
    paired = results.compare_runs(anchor, pgd_at, attacks=("pgd20",)).loc["PGD-20"]
    assert paired["test"] == "paired"

    def unpaired_noise(p1, n1, p2, n2):
        return 200 * np.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)

    # one side a parsed dict (no masks to read)
    row = results.compare([anchor, pgd_at.metrics], "anchor", "pgd_at", attacks=("pgd20",))
    assert row.loc["PGD-20", "test"] == "unpaired"
    assert row.loc["PGD-20", "noise_2se"] == pytest.approx(unpaired_noise(0.52, 1000, 0.5, 1000))
    # two seeds of one method against one run of the other: averaged, so unpaired
    extra = tmp_path / "seed1"
    checkpoint.write_json(extra / "metrics.json", {**anchor.metrics, "seed": 1})
    row = results.compare([anchor, results.load_run(extra), pgd_at], "anchor", "pgd_at",
                          attacks=("pgd20",)).loc["PGD-20"]
    assert row["test"] == "unpaired, seeds" and row["runs_method"] == 2
    assert row["runs_baseline"] == 1
    # another data copy, or another n, is not the same images
    for change in ({"data": "CIFAR-10 (original)"},
                   {"accuracy": {**pgd_at.metrics["accuracy"], "pgd20": {"value": 0.5, "n": 800}}}):
        other = tmp_path / f"other-{len(change)}-{next(iter(change))}"
        checkpoint.write_json(other / "metrics.json", {**pgd_at.metrics, **change})
        (other / "per_image.npz").write_bytes((root / "full-pgd_at-0" / "per_image.npz").read_bytes())
        row = results.compare_runs(anchor, results.load_run(other), attacks=("pgd20",))
        assert row.loc["PGD-20", "test"] == "unpaired", change
    # a run whose per_image.npz lacks this attack's mask (but has others)
    results.save_per_image(root / "full-pgd_at-0" / "per_image.npz",
                           {"clean": np.arange(1000) < 800})
    row = results.compare_runs(anchor, results.load_run(root / "full-pgd_at-0"),
                               attacks=("clean", "pgd20"))
    assert list(row["test"]) == ["paired", "unpaired"]


def test_compare_skips_what_one_side_lacks(results_root):
    """An attack only one method was evaluated with has no row; a method with no run gives an
    empty table with the documented columns; an older run without a top-level profile is
    chosen by its config's."""
    runs = results.load_results(results_root)
    anchor = next(r for r in runs if r.method == "anchor").metrics
    pgd = next(r for r in runs if r.method == "pgd_at").metrics
    no_aa = {**anchor, "accuracy": {k: v for k, v in anchor["accuracy"].items()
                                    if k != "autoattack"}}
    assert "AutoAttack" not in results.compare([no_aa, pgd]).index
    assert "AutoAttack" in results.compare([anchor, pgd]).index
    empty = results.compare([pgd], "anchor", "pgd_at")
    assert empty.empty and list(empty.columns) == results.COMPARE_COLUMNS
    assert results.compare([anchor], "anchor", "pgd_at").empty
    older = {k: v for k, v in anchor.items() if k != "profile"}
    assert len(results.compare([older, pgd], profile="full")) == 5
    assert len(results.compare([older, pgd], profile=None)) == 5


def test_run_profile_ablation_loading_and_tables_edge_cases(tmp_path, results_root):
    m = fake_metrics("anchor", {"clean": (0.5, 1)})  # n = 1 is a (tiny) sample
    assert results.validate_metrics(m)["accuracy"]["clean"]["n"] == 1
    older = {k: v for k, v in m.items() if k != "profile"}
    assert results.RunResult("r", tmp_path, older, False).profile == "full"  # from the config
    assert results.RunResult("r", tmp_path, {**older, "config": {}}, False).profile == "?"
    # An ablation folder holding an unfinished run (a checkpoint, no metrics.json yet) and a
    # stray file: only finished runs are loaded.
    (results_root / "ablation_beta" / "beta-1.0").mkdir()
    (results_root / "ablation_beta" / "beta-1.0" / "checkpoint.pt").write_bytes(b"")
    (results_root / "ablation_beta" / "notes.txt").write_text("slot 2 stopped here")
    runs = results.load_ablations(results_root)["ablation_beta"]
    assert sorted(r.name for r in runs) == ["beta-0.0", "beta-0.5", "beta-2.0"]
    # The ablation table's columns: the knob, the two validation columns, then the test ones.
    table = results.ablation_table(runs, "beta", ["clean", "pgd20"])
    assert list(table.columns)[:6] == ["beta", "val_clean", "val_pgd", "method", "profile", "data"]
    # The knob named by the folder only when every run's config has it; else the one that varies.
    with_lam = fake_metrics("anchor", {"clean": (0.5, 10)}, beta=0.0)
    without_lam = fake_metrics("anchor", {"clean": (0.5, 10)}, beta=2.0)
    del without_lam["config"]["lam"]
    assert results.ablation_param("ablation_lam", [with_lam, without_lam]) is None  # two vary
    assert results.ablation_param("ablation_lam", [with_lam, with_lam]) == "lam"
    # a folder not named after a key, two runs: the one key that differs
    assert results.ablation_param("ablation_mining", runs[:2]) == "beta"
    # Sanity entries that are neither a dict with "passed" nor a bool are left out.
    s = results.sanity_table([{**m, "sanity": {"more_steps": {"passed": False}, "eps_sweep": True,
                                                "note": "passed by hand", "square": {"n": 3}}}])
    assert s.to_dict("records") == [{"more_steps": False, "eps_sweep": True}]


@pytest.mark.bad_input(cases=2)
def test_per_image_masks_of_one_image_and_no_pickles(tmp_path):
    one = tmp_path / "one.npz"
    results.save_per_image(one, {"clean": np.array([True])})
    assert results.load_per_image(one)["clean"].tolist() == [True]
    with pytest.raises(ValueError, match="non-empty 1-d bool array"):
        results.save_per_image(tmp_path / "none.npz", {"clean": np.zeros(0, dtype=bool)})
    # A file holding pickled objects is refused, not unpickled (pickles can run code).
    evil = tmp_path / "evil.npz"
    np.savez(evil, clean=np.array([{"a": 1}], dtype=object), meta=np.array("{}"))
    with pytest.raises(ValueError, match="pickle"):
        results.load_per_image(evil)


def test_not_found_names_what_and_where_and_how_the_library_finds_results(tmp_path, monkeypatch):
    monkeypatch.setenv("ANCHOR_RESULTS_DIR", str(tmp_path / "mine"))
    note = results.not_found("committed histories")
    assert note.startswith(f"No committed histories under {tmp_path / 'mine'}. ")
    assert "ANCHOR_RESULTS_DIR" in note and "set-up cell" in note
    assert results.not_found("call counts", tmp_path / "x").startswith(
        f"No call counts under {tmp_path / 'x'}. ")
