"""Swim lanes of an interleaving: one lane per task, the steps in order, the violating step marked."""

from __future__ import annotations

from typing import Any

COLORS = {"sleep": "#4e79a7", "lock": "#f28e2b", "wait": "#e15759", "preempt": "#76b7b2", "exit": "#59a14f"}


def draw_lanes(res: Any, path: str, max_steps: int = 4000) -> None:
    """Write a PNG of ``res.trace`` (a :class:`~hmmirror.sim.runner.SimResult`) to ``path``.

    Consecutive steps of one task are drawn as one bar coloured by the point it stopped at; long runs are
    cut to the last ``max_steps`` steps before the finding.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    trace = res.trace
    f = res.finding
    if f is not None and trace:
        end = min(len(trace), f.step + 1)
        trace = trace[max(0, end - max_steps): end]
    elif len(trace) > max_steps:
        trace = trace[-max_steps:]
    tasks = res.tasks
    n = len(tasks)
    fig_h = 1.2 + 0.55 * max(n, 1)
    fig, ax = plt.subplots(figsize=(14, fig_h))
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
    ax.set_xlabel("step")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], fontsize=7, loc="upper right",
              ncol=len(COLORS))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
