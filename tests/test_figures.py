"""The book's conceptual pictures (``normcourse.figures``) draw without a display, with the
elements each caption names."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from normcourse import figures  # noqa: E402


def gids(fig: Figure) -> set[str]:
    return {artist.get_gid() for artist in fig.findobj() if artist.get_gid()}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_batchnorm_graph_has_every_node_both_passes_and_the_two_fan_outs():
    fig = figures.batchnorm_graph()
    assert isinstance(fig, Figure)
    found = gids(fig)
    nodes = {"x", "mu", "xmu", "var", "std", "xhat", "y", "gamma", "beta"}
    assert {f"node:{n}" for n in nodes} <= found
    for source, target in figures.GRAPH_EDGES:
        assert f"forward:{source}->{target}" in found
        assert f"backward:{target}->{source}" in found
    assert {"used_twice:x", "used_twice:xmu", "upstream"} <= found
    # the variables used twice are exactly those with two outgoing edges
    consumers = {}
    for source, target in figures.GRAPH_EDGES:
        consumers.setdefault(source, []).append(target)
    assert {n for n, c in consumers.items() if len(c) == 2} == set(figures.USED_TWICE)
    fig.canvas.draw()  # renders without a display


def test_data_panels_one_axes_per_panel_on_shared_equal_axes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 2)) * [3.0, 0.5] + [4.0, 0.0]
    fig = figures.data_panels({"raw": x, "centred": x - x.mean(0)})
    assert len(fig.axes) == 2
    assert {"panel:raw", "panel:centred"} <= gids(fig)
    first, second = fig.axes
    assert first.get_xlim() == second.get_xlim() and first.get_ylim() == second.get_ylim()
    assert first.get_xlabel() == "feature 1" and first.get_ylabel() == "feature 2"
    fig.canvas.draw()


def test_data_panels_rejects_data_that_is_not_two_dimensional():
    with pytest.raises(ValueError, match="must be \\(N, 2\\)"):
        figures.data_panels({"three features": np.zeros((5, 3))})


@pytest.mark.parametrize("methods", [("batch", "layer"), ("batch", "layer", "instance", "group")])
def test_normalization_axes_one_labelled_cube_per_method(methods):
    fig = figures.normalization_axes(methods)
    assert len(fig.axes) == len(methods)
    assert {f"method:{m}" for m in methods} <= gids(fig)
    for ax in fig.axes:
        assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_zlabel()) == ("N", "C", "H, W")
    fig.canvas.draw()


def test_normalization_sets_are_the_axes_each_method_averages_over():
    n, c, hw = shape = (4, 6, 5)
    sizes = {m: figures.normalization_set(m, shape, num_groups=3).sum()
             for m in figures.NORMALIZATION_METHODS}
    assert sizes == {"batch": n * hw, "layer": c * hw, "instance": hw, "group": c // 3 * hw}
    batch = figures.normalization_set("batch", shape)
    assert batch[:, 0, :].all() and not batch[:, 1:, :].any()


def test_normalization_axes_rejects_unknown_methods_and_bad_groups():
    with pytest.raises(ValueError, match="choose one of"):
        figures.normalization_axes(("batch", "weight"))
    with pytest.raises(ValueError, match="groups"):
        figures.normalization_set("group", (2, 5, 3), num_groups=2)
