"""Figures a person can look at: widths over training and the singular-value spectrum over epochs."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from matplotlib.figure import Figure

__all__ = ["topology_figure"]


def topology_figure(history: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]] = (),
                    threshold: Optional[float] = None) -> Figure:
    """Widths of every space over the epochs, and each space's singular values over the epochs.

    Args:
        history: records ``{"epoch", "step", "space", "width", "singular_values"}``, one per space
            per snapshot (the callback takes one at the end of every training epoch).
        events: topology changes (``{"epoch", "space", "op", ...}``), marked on the width plot.
        threshold: a horizontal line on the spectra (the scaffold threshold).

    Returns:
        A :class:`matplotlib.figure.Figure` (no pyplot state is touched).
    """
    spaces: List[str] = []
    for record in history:
        if record["space"] not in spaces:
            spaces.append(record["space"])
    rows = max(1, len(spaces))
    height = 2.6 * rows + 0.6
    # A fixed layout: a constrained one doubles the time the callback spends saving the figure.
    fig = Figure(figsize=(11, height))
    grid = fig.add_gridspec(rows, 2, width_ratios=[1, 1.4], left=0.06, right=0.97, bottom=0.55 / height,
                            top=1 - 0.35 / height, wspace=0.18, hspace=0.55)
    widths_ax = fig.add_subplot(grid[:, 0])
    by_space: Dict[str, List[Mapping[str, Any]]] = {s: [r for r in history if r["space"] == s] for s in spaces}
    for space, records in by_space.items():
        # A step curve over optimizer steps: snapshots give the width before a change, events after it.
        changes = [e for e in events if e.get("space") == space and e.get("op") in ("grow", "shrink")]
        points = sorted([(r["step"], 0, r["width"]) for r in records]
                        + [(e["step"], 1, e["new_width"]) for e in changes])
        if records and records[0]["step"] > 0:
            points.insert(0, (0, 0, records[0]["width"]))  # widths hold from the start of training
        line = widths_ax.plot([p[0] for p in points], [p[2] for p in points], drawstyle="steps-post", label=space)[0]
        for event in changes:
            widths_ax.annotate("+" if event["op"] == "grow" else "-", (event["step"], event["new_width"]),
                               color=line.get_color(), ha="center", va="bottom", fontsize=10)
    widths_ax.set_xlabel("optimizer step")
    widths_ax.set_ylabel("width (neurons)")
    widths_ax.set_title("Hidden widths (+ grow, - shrink)")
    if spaces:
        widths_ax.legend(fontsize=8)
    widths_ax.grid(alpha=0.3)
    for row, space in enumerate(spaces):
        ax = fig.add_subplot(grid[row, 1])
        records = by_space[space]
        xs, ys = [], []
        for record in records:
            values = list(record["singular_values"])
            xs += [record["epoch"]] * len(values)
            ys += values
        # The colour repeats the value (the y axis), which keeps the weak directions visible; no colour bar.
        ax.scatter(xs, ys, c=ys, cmap="viridis", s=6)
        if threshold is not None:
            ax.axhline(threshold, color="crimson", linewidth=0.8, linestyle="--", label=f"threshold {threshold:g}")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_title(f"{space}: singular values per epoch", fontsize=9)
        ax.set_ylabel("singular value")
        ax.grid(alpha=0.3)
        if row == rows - 1:
            ax.set_xlabel("epoch")
    if not spaces:
        widths_ax.text(0.5, 0.5, "no snapshots", ha="center", va="center", transform=widths_ax.transAxes)
    return fig
