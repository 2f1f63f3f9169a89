"""Swim lanes of an interleaving: one lane per task, the steps in order, the violating step marked; with a
placement timeline (``sim/placement.py``) a band below them shows, page by page, where the mirrored process's
pages live over the same steps (system memory, device-private, device-exclusive, migrating)."""

from __future__ import annotations

from typing import Any

COLORS = {"sleep": "#4e79a7", "lock": "#f28e2b", "wait": "#e15759", "preempt": "#76b7b2", "exit": "#59a14f"}


def window(res: Any, max_steps: int = 4000) -> list[tuple[int, int, str, str]]:
    """The part of ``res.trace`` the picture shows: up to the finding's step, at most ``max_steps`` steps."""
    trace = res.trace
    f = res.finding
    if f is not None and trace:
        end = min(len(trace), f.step + 1)
        return trace[max(0, end - max_steps): end]
    return trace[-max_steps:] if len(trace) > max_steps else trace


def placement_band(res: Any, max_steps: int = 4000) -> tuple[Any, list[tuple[int, str]], int, int] | None:
    """The data of the placement band: ``(matrix, row labels, first step, last step)`` where ``matrix[page,
    step - first]`` is a code into :data:`~hmmirror.sim.placement.PLACES` and the labels are ``(row, name)``
    at the first page of each watched range; None without a timeline (or nothing watched)."""
    tl = getattr(res, "placement", None)
    if tl is None or not tl.samples or not tl.npages:
        return None
    trace = window(res, max_steps)
    first = trace[0][0] if trace else 0
    last = trace[-1][0] if trace else 0
    labels, row = [], 0
    for name, _start, n in tl.ranges:
        labels.append((row, name))
        row += n
    return tl.matrix(first, last), labels, first, last


def draw_lanes(res: Any, path: str, max_steps: int = 4000) -> None:
    """Write a PNG of ``res.trace`` (a :class:`~hmmirror.sim.runner.SimResult`) to ``path``.

    Consecutive steps of one task are drawn as one bar coloured by the point it stopped at; long runs are
    cut to the last ``max_steps`` steps before the finding.  ``res.placement`` (a
    :class:`~hmmirror.sim.placement.PlaceTimeline`, set by ``replay --png``) adds the placement band.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    trace = window(res, max_steps)
    f = res.finding
    tasks = res.tasks
    n = len(tasks)
    band = placement_band(res, max_steps)
    fig_h = 1.2 + 0.55 * max(n, 1)
    if band is None:
        fig, ax = plt.subplots(figsize=(14, fig_h))
        bx = None
    else:
        fig, (ax, bx) = plt.subplots(2, 1, figsize=(14, fig_h + 2.6), sharex=True,
                                     gridspec_kw={"height_ratios": [fig_h, 2.6]})
    # merge runs of the same task
    i = 0
    while i < len(trace):
        step, idx, kind, what = trace[i]
        j = i
        while j + 1 < len(trace) and trace[j + 1][1] == idx:
            j += 1
        last = trace[j]
        ax.barh(idx, last[0] - step + 1, left=step, height=0.6, color=COLORS.get(last[2], "#bab0ac"),
                edgecolor="black", linewidth=0.3)
        if last[0] - step >= max(len(trace) // 60, 1):
            ax.text(step + 0.2, idx, last[3][:28], va="center", fontsize=6)
        i = j + 1
    if f is not None:
        ax.axvline(f.step + 0.5, color="red", linewidth=1.5)
        vi = next((k for k, t in enumerate(tasks) if t[0] == f.task), None)
        if vi is not None:
            ax.plot([f.step + 0.5], [vi], marker="X", color="red", markersize=12)
        ax.set_title(f"[{f.invariant}] {f.message}"[:140], fontsize=9)
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{name} ({kind})" for name, kind in tasks], fontsize=8)
    ax.invert_yaxis()
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], fontsize=7, loc="upper right",
              ncol=len(COLORS))
    if bx is None:
        ax.set_xlabel("step")
    else:
        from matplotlib.colors import ListedColormap

        from hmmirror.sim.placement import PLACE_COLORS, PLACES
        mat, labels, first, last = band
        cmap = ListedColormap([PLACE_COLORS[p] for p in PLACES])
        bx.imshow(mat, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=len(PLACES) - 1,
                  extent=(first - 0.5, last + 0.5, mat.shape[0] - 0.5, -0.5))
        bx.set_yticks([r for r, _name in labels])
        bx.set_yticklabels([name for _r, name in labels], fontsize=7)
        bx.set_ylabel("pages", fontsize=8)
        bx.set_xlabel("step")
        bx.legend(handles=[Patch(facecolor=PLACE_COLORS[p], edgecolor="black", label=p) for p in PLACES],
                  fontsize=7, loc="upper right", ncol=len(PLACES))
        if f is not None:
            bx.axvline(f.step + 0.5, color="red", linewidth=1.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")   # the path as given (no ".png" added)
    plt.close(fig)
