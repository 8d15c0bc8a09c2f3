"""scripts/figure_text.py: how large a figure's text reads on the page."""

from __future__ import annotations

import by_path
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

figure_text = by_path.load("scripts/figure_text.py", "_figure_text")


def _figure(width_in: float, size_pt: float):
    fig, ax = plt.subplots(figsize=(width_in, 3), dpi=100)
    ax.set_xlabel("a label", fontsize=size_pt)
    ax.tick_params(labelsize=size_pt + 2)
    ax.set_title("a title", fontsize=size_pt + 4)
    return fig


def test_a_narrow_figure_is_shown_at_its_own_size():
    fig = _figure(4, 10)
    found = figure_text.measure_figure(fig, column_px=708)
    plt.close(fig)
    assert found["scale"] == 1.0 and found["shown_px"] == found["natural_px"] < 708
    assert found["smallest_text_px"] == pytest.approx(10 * 100 / 72, abs=0.1)
    assert found["smallest_text"] == "a label"


def test_a_wide_figure_shrinks_its_text_with_it():
    fig = _figure(14, 10)
    found = figure_text.measure_figure(fig, column_px=708)
    plt.close(fig)
    # the saved width: the tight box plus the padding on both sides, at the figure's dpi
    assert 1000 < found["natural_px"] < 1500
    assert found["shown_px"] == 708 and found["scale"] == pytest.approx(708 / found["natural_px"],
                                                                         abs=1e-3)
    assert found["smallest_text_px"] == pytest.approx(10 * 100 / 72 * found["scale"], abs=0.1)


def test_hidden_and_empty_text_do_not_count():
    fig = _figure(4, 10)
    ax = fig.axes[0]
    ax.text(0.5, 0.5, "tiny but hidden", fontsize=2).set_visible(False)
    ax.text(0.5, 0.5, "   ", fontsize=2)
    found = figure_text.measure_figure(fig)
    plt.close(fig)
    assert found["smallest_text"] == "a label"
    empty = plt.figure(figsize=(2, 2))
    assert figure_text.measure_figure(empty)["smallest_text_px"] is None
    plt.close(empty)
