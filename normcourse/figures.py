"""Conceptual pictures of the book, drawn by code so that they rebuild with it.

Each function returns a matplotlib ``Figure`` (made with pyplot, so a notebook shows it; call
``plt.close(fig)`` when it is not shown). The elements a reader needs are labelled, and the
labels carry a ``gid`` (``"node:mu"``, ``"method:batch"``, ...) so that the tests can find them
without a display.

- ``batchnorm_graph()``: chapter 2, the computational graph of batch norm's forward pass, the
  backward pass flowing back through it, and the two variables used twice.
- ``data_panels(panels)``: chapter 1, 2-D data side by side on shared axes (raw, centred,
  standardized, whitened: the chapter computes them with the package's functions).
- ``normalization_axes(methods)``: chapter 5 (and 8), the (N, C, H*W) activation cube with the
  values that share one mean and variance shaded, for batch, layer, instance and group norm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from normcourse.validation import check_choice

__all__ = ["batchnorm_graph", "data_panels", "normalization_axes", "NORMALIZATION_METHODS",
           "GRAPH_NODES"]

# Chapter 2's graph: node -> (position, label). One line of ``reference.batchnorm_forward``
# per operation node; gamma and beta are the parameters.
GRAPH_NODES = {
    "x": ((0.0, 1.0), r"$x$"),
    "mu": ((1.5, 2.2), r"$\mu = \mathrm{mean}(x)$"),
    "xmu": ((3.1, 1.0), r"$x - \mu$"),
    "var": ((5.0, 2.2), r"$\sigma^2 = \mathrm{mean}((x-\mu)^2)$"),
    "std": ((7.6, 2.2), r"$\mathrm{std} = \sqrt{\sigma^2 + \epsilon}$"),
    "xhat": ((8.3, 1.0), r"$\hat x = (x - \mu) / \mathrm{std}$"),
    "gamma": ((10.0, 2.2), r"$\gamma$"),
    "beta": ((10.0, -0.2), r"$\beta$"),
    "y": ((11.3, 1.0), r"$y = \gamma \hat x + \beta$"),
}
GRAPH_EDGES = (("x", "mu"), ("x", "xmu"), ("mu", "xmu"), ("xmu", "var"), ("var", "std"),
               ("xmu", "xhat"), ("std", "xhat"), ("xhat", "y"), ("gamma", "y"), ("beta", "y"))
# The variables with two consumers: their gradient is the sum of the two that come back.
USED_TWICE = {"x": ("mu", "xmu"), "xmu": ("var", "xhat")}


def _node_box(ax, name, position, label, used_twice):
    style = dict(boxstyle="round,pad=0.35", facecolor="white", edgecolor="black", linewidth=1)
    if name in ("gamma", "beta"):
        style.update(facecolor="#e8f0fb", edgecolor="tab:blue")
    if used_twice:
        style.update(facecolor="#fff2cc", edgecolor="tab:orange", linewidth=2.2)
    text = ax.text(*position, label, ha="center", va="center", fontsize=10, bbox=style, zorder=3)
    text.set_gid(f"node:{name}")
    return text


def batchnorm_graph(figsize=(9.4, 3.4)):
    """Batch norm's forward pass as a graph, with the backward pass drawn through it.

    Black arrows: the forward pass (nodes as in ``reference.batchnorm_forward``). Red dashed
    arrows: the gradients flowing back, labelled with what they carry. The two variables used
    twice (``x`` feeds ``mu`` and ``x - mu``; ``x - mu`` feeds the variance and ``xhat``) are
    outlined in orange with a note that their two incoming gradients add.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    texts = {name: _node_box(ax, name, pos, label, name in USED_TWICE)
             for name, (pos, label) in GRAPH_NODES.items()}
    fig.canvas.draw()  # the boxes' sizes are needed to end the arrows at their edges
    for source, target in GRAPH_EDGES:
        forward = ax.annotate("", xy=GRAPH_NODES[target][0], xytext=GRAPH_NODES[source][0],
                              arrowprops=dict(arrowstyle="-|>", color="black", lw=1.2,
                                              patchA=texts[source].get_bbox_patch(),
                                              patchB=texts[target].get_bbox_patch(),
                                              shrinkA=3, shrinkB=5), zorder=4)
        forward.set_gid(f"forward:{source}->{target}")
        # the gradient goes the other way, slightly offset below the forward arrow
        start, end = _offset(GRAPH_NODES[target][0], GRAPH_NODES[source][0])
        backward = ax.annotate("", xy=end, xytext=start,
                               arrowprops=dict(arrowstyle="-|>", color="tab:red", lw=1.0,
                                               linestyle=(0, (4, 2)),
                                               patchA=texts[target].get_bbox_patch(),
                                               patchB=texts[source].get_bbox_patch(),
                                               shrinkA=4, shrinkB=4), zorder=1)
        backward.set_gid(f"backward:{target}->{source}")
    (y_x, y_y) = GRAPH_NODES["y"][0]
    upstream = ax.annotate(r"$\partial L/\partial y$", xy=(y_x, y_y - 0.25),
                           xytext=(y_x, y_y - 1.05), ha="center", va="center", color="tab:red",
                           fontsize=10.5, arrowprops=dict(arrowstyle="-|>", color="tab:red",
                                                          lw=1.0, linestyle=(0, (4, 2))))
    upstream.set_gid("upstream")
    notes = {
        "x": ("used twice: its gradient is\n" r"the sum of the paths via $\mu$" "\n"
              r"and via $x - \mu$", (0.1, 0.6)),
        "xmu": ("used twice: its gradient is\n" r"the sum of the paths via $\sigma^2$" "\n"
                r"and via $\hat x$", (3.1, 0.6)),
    }
    for name, (note, where) in notes.items():
        text = ax.text(*where, note, ha="center", va="top", fontsize=9, color="tab:orange")
        text.set_gid(f"used_twice:{name}")
    legend = [plt.Line2D([], [], color="black", lw=1.2, label="forward"),
              plt.Line2D([], [], color="tab:red", lw=1.0, ls="--",
                         label="backward: the gradient of the loss w.r.t. each node")]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(0.0, 1.12), ncol=2,
              frameon=False, fontsize=9.5)
    ax.set_xlim(-0.8, 12.2)
    ax.set_ylim(-0.6, 2.7)
    ax.axis("off")
    fig.tight_layout()
    return fig


def _offset(start, end, distance=0.09):
    """The segment start -> end moved sideways by ``distance`` (to its right, seen from start),
    so that the backward arrow runs beside the forward one."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    direction = (end - start) / np.linalg.norm(end - start)
    side = np.array([direction[1], -direction[0]]) * distance
    return tuple(start + side), tuple(end + side)


def data_panels(panels: Mapping[str, np.ndarray], *, share: bool = True, figsize=None,
                feature_names=("feature 1", "feature 2")):
    """2-D data sets side by side, one scatter per entry of ``panels`` (title -> (N, 2) array).

    ``share=True`` puts every panel on the same axis limits, with equal scales on both axes,
    so that a shift, a rescaling or a rotation shows as one. The origin is marked by thin lines.
    """
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("data_panels needs at least one panel")
    for title, points in panels.items():
        if np.ndim(points) != 2 or np.shape(points)[1] != 2:
            raise ValueError(f"data_panels: panel '{title}' must be (N, 2), got "
                             f"{np.shape(points)}")
    count = len(panels)
    figsize = figsize or (2.6 * count + 0.6, 3.0)
    fig, axes = plt.subplots(1, count, figsize=figsize, sharex=share, sharey=share,
                             squeeze=False)
    everything = np.vstack(list(panels.values()))
    low, high = everything.min(), everything.max()
    pad = 0.05 * (high - low)
    for ax, (title, points) in zip(axes[0], panels.items()):
        ax.axhline(0, color="0.7", lw=0.8, zorder=0)
        ax.axvline(0, color="0.7", lw=0.8, zorder=0)
        ax.scatter(points[:, 0], points[:, 1], s=5, alpha=0.5, color="tab:blue")
        ax.set_title(title)
        ax.title.set_gid(f"panel:{title}")
        ax.set_xlabel(feature_names[0])
        if share:
            ax.set_xlim(low - pad, high + pad)
            ax.set_ylim(low - pad, high + pad)
            ax.set_aspect("equal")
    axes[0][0].set_ylabel(feature_names[1])
    fig.tight_layout()
    return fig


# What each method averages over, for one mean and variance, in the (N, C, H*W) cube.
NORMALIZATION_METHODS = {
    "batch": "batch norm: one channel, all examples",
    "layer": "layer norm: one example, all channels",
    "instance": "instance norm: one example, one channel",
    "group": "group norm: one example, a group of channels",
}


def normalization_set(method: str, shape=(4, 6, 5), num_groups: int = 3) -> np.ndarray:
    """Boolean mask over (N, C, H*W): the values that share one mean and variance under
    ``method`` (the set containing example 0 and channel 0)."""
    check_choice(method, tuple(NORMALIZATION_METHODS), "normalization method")
    n, c, hw = shape
    mask = np.zeros(shape, dtype=bool)
    if method == "batch":
        mask[:, 0, :] = True
    elif method == "layer":
        mask[0, :, :] = True
    elif method == "instance":
        mask[0, 0, :] = True
    else:
        if c % num_groups:
            raise ValueError(f"normalization_set: {c} channels do not split into "
                             f"{num_groups} groups")
        mask[0, : c // num_groups, :] = True
    return mask


def normalization_axes(methods: Sequence[str] = ("batch", "layer"), *, shape=(4, 6, 5),
                       num_groups: int = 3, figsize=None):
    """The (N, C, H*W) activation cube, one panel per method, the values that share one mean
    and variance shaded (as in figure 2 of the group-norm paper).

    methods: any of ``"batch"``, ``"layer"``, ``"instance"``, ``"group"``. The cube has
    ``shape`` = (examples, channels, positions) cells; group norm uses ``num_groups`` groups.
    """
    import matplotlib.pyplot as plt

    methods = tuple(methods)
    if not methods:
        raise ValueError("normalization_axes needs at least one method")
    for method in methods:
        check_choice(method, tuple(NORMALIZATION_METHODS), "normalization method")
    figsize = figsize or (3.1 * len(methods), 3.3)
    fig = plt.figure(figsize=figsize)
    for i, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), i + 1, projection="3d")
        mask = normalization_set(method, shape, num_groups)
        # voxels' axes: x = N, y = C, z = H*W
        colors = np.where(mask[..., None], np.array([0.12, 0.47, 0.71, 0.9]),
                          np.array([0.85, 0.85, 0.85, 0.25]))
        ax.voxels(np.ones(shape, dtype=bool), facecolors=colors, edgecolor="0.45",
                  linewidth=0.3)
        ax.set_xlabel("N", labelpad=-12)
        ax.set_ylabel("C", labelpad=-12)
        ax.set_zlabel("H, W", labelpad=-12)
        ax.set_xticklabels([])
        ax.set_yticklabels([])
        ax.set_zticklabels([])
        ax.grid(False)
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.pane.set_visible(False)
            axis.set_tick_params(length=0)
        ax.view_init(elev=22, azim=-58)
        ax.set_box_aspect(shape, zoom=0.9)
        # one line per phrase: four panels side by side leave each title about 2 inches
        title = ax.set_title(NORMALIZATION_METHODS[method].replace(": ", ":\n")
                             .replace(", ", ",\n"), fontsize=11)
        title.set_gid(f"method:{method}")
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=0.78, wspace=0.0)
    return fig
