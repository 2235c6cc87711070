"""The audit's PNG plots, drawn headless (matplotlib's Agg canvas, no pyplot global state)."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from starvation.checkpoints import AuditableModel
from starvation.datasets.base import Dataset
from starvation.datasets.files import batched

GROUP_ACCURACY = "group_accuracy.png"
FOUR_CORNERS = "four_corners.png"
DECISION_BOUNDARY = "decision_boundary.png"
NTK_ALIGNMENT = "ntk_alignment.png"
# The group plot's bars (matplotlib's tab:blue and tab:orange); pages that draw next to it keep off these two.
ALIGNED_COLOUR, CONFLICTING_COLOUR = "#1f77b4", "#ff7f0e"
CAPTIONS = {
    GROUP_ACCURACY: "Test accuracy of each group (label × spurious attribute). Blue: bias-aligned groups, where the "
    "attribute goes with the label as it did in training; orange: bias-conflicting groups; dashed: "
    "the average. A model that leans on the attribute scores high on blue and low on orange.",
    FOUR_CORNERS: "Accuracy (left) and mean predictive entropy (right) on the test split with the core feature "
    "and/or the spurious attribute removed. Leaning on the attribute: accuracy falls when it is "
    "removed, and the model stays confident with only the attribute left.",
    DECISION_BOUNDARY: "The predicted probability of class 1 over the input plane (the black line is 0.5), with the "
    "training points (circles) and the test points (crosses) coloured by label.",
    NTK_ALIGNMENT: "Over training (a job with ntk_every): the centred alignment of the network's tangent kernel, on "
    "a fixed sample of training examples, with the label, the spurious attribute and the core feature. A kernel "
    "that turns towards the attribute and away from the core feature is the starvation the paper describes.",
}
_DPI = 100
_GRID = 200  # decision boundary: points per axis


def draw_plots(report: dict, model: AuditableModel, dataset: Dataset, out_dir: pathlib.Path) -> list[str]:
    """Every plot the report's numbers (and, for 2-D inputs, the model) allow; their file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    if report.get("groups"):
        _save(group_accuracy(report), out_dir / GROUP_ACCURACY)
        names.append(GROUP_ACCURACY)
    if report.get("four_corners"):
        _save(four_corners(report), out_dir / FOUR_CORNERS)
        names.append(FOUR_CORNERS)
    if tuple(dataset.input_shape) == (2,):
        _save(decision_boundary(model, dataset), out_dir / DECISION_BOUNDARY)
        names.append(DECISION_BOUNDARY)
    return names


def group_accuracy(report: dict) -> Figure:
    groups = report["groups"]
    attribute = report.get("spurious_attribute") or "attribute"
    fig = Figure(figsize=(max(4.0, 1.1 * len(groups) + 2), 3.6), dpi=_DPI)
    ax = fig.add_subplot()
    labels = [f"y={g['label']}\n{attribute}={g['attribute']}\nn={g['n']}" for g in groups]
    colours = [ALIGNED_COLOUR if g.get("aligned") else CONFLICTING_COLOUR for g in groups]
    bars = ax.bar(range(len(groups)), [g["accuracy"] for g in groups], color=colours)
    for bar, g in zip(bars, groups):
        ax.annotate(
            f"{g['accuracy']:.2f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if report.get("average_accuracy") is not None:
        ax.axhline(
            report["average_accuracy"],
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"average {report['average_accuracy']:.2f}",
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy per group (blue: bias-aligned, orange: bias-conflicting)", fontsize=9)
    fig.tight_layout()
    return fig


def draw_alignment_curves(rows: list[dict], out_dir: pathlib.Path) -> list[str]:
    """The NTK alignments over training (metric rows {step, name, value} named `ntk_alignment_*`), as
    NTK_ALIGNMENT in `out_dir`; [] when there are none."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["name"].startswith("ntk_alignment_"):
            curves.setdefault(row["name"].removeprefix("ntk_alignment_"), []).append((row["step"], row["value"]))
    if not curves:
        return []
    fig = Figure(figsize=(5.5, 3.4), dpi=_DPI)
    ax = fig.add_subplot()
    for name, points in sorted(curves.items()):
        steps, values = zip(*sorted(dict(points).items()))  # a step recorded twice (a resumed attempt) drawn once
        ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("centred kernel alignment")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("NTK alignment over training", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    _save(fig, out_dir / NTK_ALIGNMENT)
    return [NTK_ALIGNMENT]


def plot_caption(name: str) -> str:
    """What a plot shows, for a caption under it; `name` as a report lists it (a train job's: `seed0-...`)."""
    return next((caption for plot, caption in CAPTIONS.items() if name.endswith(plot)), name)


def four_corners(report: dict) -> Figure:
    """Two 2x2 panels, accuracy and entropy: rows core feature present/absent, columns spurious."""
    corners = report["four_corners"]
    layout = [["core_and_spurious", "core_only"], ["spurious_only", "neither"]]
    entropy_max = (report.get("four_corners_entropy") or {}).get("max") or np.log(2)
    fig = Figure(figsize=(8, 3.6), dpi=_DPI)
    for index, (key, vmax, title) in enumerate(
        (
            ("accuracy", 1.0, "accuracy"),
            ("entropy", entropy_max, "mean predictive entropy (nats)"),
        )
    ):
        ax = fig.add_subplot(1, 2, index + 1)
        values = np.array([[_value(corners.get(c), key) for c in row] for row in layout], dtype=float)
        ax.imshow(values, vmin=0.0, vmax=vmax, cmap="viridis")
        for (r, c), v in np.ndenumerate(values):
            ax.text(
                c,
                r,
                "n/a" if np.isnan(v) else f"{v:.2f}",
                ha="center",
                va="center",
                color="white" if np.isnan(v) or v < 0.6 * vmax else "black",
            )
        ax.set_xticks([0, 1], ["spurious present", "spurious removed"], fontsize=8)
        ax.set_yticks([0, 1], ["core present", "core removed"], fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.suptitle("Four corners (test split)", fontsize=10)
    fig.tight_layout()
    return fig


def decision_boundary(model: AuditableModel, dataset: Dataset) -> Figure:
    """The predicted class over the plane, with the training and test points."""
    points = torch.cat([dataset.splits[s].inputs for s in dataset.splits]).double().numpy()
    low, high = points.min(axis=0), points.max(axis=0)
    pad = 0.15 * (high - low) + 1e-3
    xs = np.linspace(low[0] - pad[0], high[0] + pad[0], _GRID)
    ys = np.linspace(low[1] - pad[1], high[1] + pad[1], _GRID)
    grid_x, grid_y = np.meshgrid(xs, ys)
    grid = torch.from_numpy(np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.float32))
    logits = batched(model.logits, grid, model.device, 8192)
    fig = Figure(figsize=(5, 4.4), dpi=_DPI)
    ax = fig.add_subplot()
    if logits.shape[1] == 1:
        score = torch.sigmoid(logits[:, 0]).numpy().reshape(grid_x.shape)
        ax.contourf(grid_x, grid_y, score, levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.5)
        ax.contour(grid_x, grid_y, score, levels=[0.5], colors="black", linewidths=1.5)
    else:
        classes = logits.argmax(dim=1).numpy().reshape(grid_x.shape)
        ax.contourf(grid_x, grid_y, classes, levels=np.arange(logits.shape[1] + 1) - 0.5, cmap="RdBu_r", alpha=0.5)
    for name, marker in ((dataset.train_splits[0], "o"), (dataset.test_split, "x")):
        split = dataset.splits[name]
        ax.scatter(
            split.inputs[:, 0].numpy(),
            split.inputs[:, 1].numpy(),
            c=split.y.numpy(),
            cmap="RdBu_r",
            marker=marker,
            s=12,
            linewidths=0.8,
            edgecolors="black" if marker == "o" else None,
            label=name,
        )
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Decision boundary (predicted class 1 probability)", fontsize=9)
    fig.tight_layout()
    return fig


def _value(corner: dict | None, key: str) -> float:
    value = (corner or {}).get(key)
    return float("nan") if value is None else float(value)


def _save(fig: Figure, path: pathlib.Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
