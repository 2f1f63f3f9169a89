"""Page tables of an address range: a compressed tree (data, text) and a matplotlib picture (our own tool).

:func:`collect` walks one mm's tables over ``[start, end)`` level by level (PGD, P4D with 5-level paging,
PUD, PMD, PTE) and returns a :class:`TableView`: one :class:`Node` per upper-level entry, with consecutive
leaves of the same kind, permission and pfn progression merged into runs (512 zero-page PTEs are one node).
Leaf kinds are those of :func:`hmmirror.mm.inspect.model_page_state` (read for the whole range at once with
the vectorised :func:`~hmmirror.mm.inspect.inspect_arrays`; anon, zero, file, shmem, devmap,
hugetlb, special, swap, ...).  :func:`render_tree` turns a view into a ``rich`` tree, :func:`draw` into a PNG
(matplotlib, Agg backend; imported only when drawing).

Read-only: nothing here changes the model (no locks are taken; call it between operations).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hmmirror.arch.x86 import pgtable as x86
from hmmirror.arch.x86.pgtable import PAGE_SHIFT, PMD_SIZE, PTRS_PER_TABLE
from hmmirror.mm.inspect import inspect_arrays

if TYPE_CHECKING:
    from rich.tree import Tree

    from hmmirror.mm.mm_struct import VMA, MMStruct

#: Colours of leaf kinds (Paul Tol's "bright" and "muted" schemes: distinguishable with colour-blindness).
KIND_COLORS = {
    "anon": "#4477AA",
    "zero": "#CCBB44",
    "file": "#228833",
    "shmem": "#66CCEE",
    "devmap": "#AA3377",
    "hugetlb": "#EE6677",
    "special": "#777777",
    "swap": "#EE7733",
    "migration": "#EE7733",
    "device_private": "#882255",
    "device_exclusive": "#882255",
    "hwpoison": "#000000",
    "marker": "#DDAA33",
}
TABLE_COLOR = "#E4E4E4"
NONE_COLOR = "#FFFFFF"
#: Legend names of kinds (the DAX kinds say so).
KIND_LABELS = {"devmap": "devmap (DAX)", "zero": "zero page", "special": "special (PFNMAP)"}
_RICH_STYLE = {"anon": "blue", "zero": "yellow", "file": "green", "shmem": "cyan", "devmap": "magenta",
               "hugetlb": "red", "special": "bright_black", "table": "bold", "none": "dim"}


@dataclass
class Node:
    """An upper-level entry pointing to a table, or a run of ``count`` equal leaf / none entries."""

    level: str
    first: int                      # index of the first entry in its table
    count: int
    start: int                      # virtual span of the entries
    end: int
    entry: str                      # "table", "leaf" or "none"
    kind: str = "none"              # leaf kind (PageState.kind); "table" for table entries
    present: bool = False
    write: bool | None = None
    protnone: bool = False
    pfn: int | None = None          # pfn mapped at ``start`` (for huge leaves: the head pfn)
    pfn_last: int | None = None     # pfn mapped by the last entry of the run
    children: list[Node] = field(default_factory=list)

    @property
    def huge(self) -> bool:
        return self.entry == "leaf" and self.level in ("pmd", "pud")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"level": self.level, "first": self.first, "count": self.count,
                             "start": hex(self.start), "end": hex(self.end), "entry": self.entry, "kind": self.kind}
        if self.entry == "leaf":
            d.update(present=self.present, write=self.write, protnone=self.protnone, huge=self.huge,
                     pfn=None if self.pfn is None else hex(self.pfn),
                     pfn_last=None if self.pfn_last is None else hex(self.pfn_last))
        if self.entry == "table":
            d["children"] = [c.to_json() for c in self.children]
        return d


@dataclass
class TableView:
    """The page tables of ``[start, end)`` of one process, with the VMAs that intersect it."""

    proc: str
    start: int
    end: int
    paging: int
    kernel: str
    levels: tuple[str, ...]
    nodes: list[Node]
    vmas: list[dict[str, Any]]
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"proc": self.proc, "label": self.label, "start": hex(self.start), "end": hex(self.end),
                "paging": self.paging, "kernel": self.kernel, "levels": list(self.levels), "vmas": self.vmas,
                "tree": [n.to_json() for n in self.nodes], "summary": summary(self)}

    def leaves(self) -> list[Node]:
        """Leaf and none runs in address order (depth first)."""
        out: list[Node] = []

        def rec(nodes: list[Node]) -> None:
            for n in nodes:
                if n.entry == "table":
                    rec(n.children)
                else:
                    out.append(n)
        rec(self.nodes)
        return out


def vma_json(vma: VMA) -> dict[str, Any]:
    """A VMA as the ``vmas`` entries of ``--json`` output."""
    from hmmirror.mm.mm_struct import vma_flags_str

    f = vma.vm_file
    path = None
    if f is not None:
        path = getattr(f, "path", None) or getattr(getattr(f, "inode", None), "path", None) or str(f)
    return {"start": hex(vma.vm_start), "end": hex(vma.vm_end), "kind": vma.kind, "perms": vma_flags_str(vma.vm_flags),
            "file": path, "pgoff": vma.vm_pgoff, "size": vma.vm_end - vma.vm_start}


def levels_of(paging: int) -> list[tuple[str, int]]:
    """(name, VA shift) of each level, top first; with 4-level paging the P4D is folded into the PGD."""
    top = [("pgd", 48), ("p4d", 39)] if paging == 5 else [("pgd", 39)]
    return top + [("pud", 30), ("pmd", 21), ("pte", 12)]


def collect(mm: MMStruct, start: int, end: int, label: str = "") -> TableView:
    """The page tables of ``mm`` over ``[start, end)``, leaves merged into runs."""
    geo = mm.machine.geo
    lv = levels_of(geo.levels)
    pool = mm.machine.pool
    page0 = start & ~((1 << PAGE_SHIFT) - 1)
    chunks: dict[int, Any] = {}

    def state_at(va: int) -> tuple[Any, int]:
        """Page states of the 2 MiB chunk holding ``va`` (vectorised, once per chunk a leaf is seen in: a
        sparse range costs what it maps, not its size) and the index of ``va`` in them."""
        base = va & ~(PMD_SIZE - 1)
        arr = chunks.get(base)
        if arr is None:
            arr = chunks[base] = inspect_arrays(mm, max(base, page0), min(base + PMD_SIZE, end))
        return arr, (va - arr.start) >> PAGE_SHIFT

    def walk(tid: int, li: int, base: int, lo: int, hi: int) -> list[Node]:
        name, shift = lv[li]
        size = 1 << shift
        first = (lo - base) >> shift
        last = min((hi - 1 - base) >> shift, PTRS_PER_TABLE - 1)
        row = pool.tables[tid, first:last + 1]
        used = np.flatnonzero(row & np.uint64(~(x86._PAGE_ACCESSED | x86._PAGE_DIRTY) & (2**64 - 1)))
        out: list[Node] = []
        prev = first
        for j in used.tolist():
            i = first + j
            if i > prev:
                out.append(Node(name, prev, i - prev, base + prev * size, base + i * size, "none"))
            e = int(row[j])
            va = base + i * size
            out.append(entry_node(name, li, i, va, size, e, lo, hi))
            prev = i + 1
        if prev <= last:
            out.append(Node(name, prev, last + 1 - prev, base + prev * size, base + (last + 1) * size, "none"))
        return merge(out, size)

    def entry_node(name: str, li: int, i: int, va: int, size: int, e: int, lo: int, hi: int) -> Node:
        is_leaf = name == "pte" or (name in ("pmd", "pud") and (e & x86._PAGE_PSE or not e & x86._PAGE_PRESENT))
        if not is_leaf:
            node = Node(name, i, 1, va, va + size, "table", "table", present=True)
            node.children = walk(x86.table_id_of(e), li + 1, va, max(lo, va), min(hi, va + size))
            return node
        pages, k = state_at(max(lo, va) & ~((1 << PAGE_SHIFT) - 1))  # the state of the first page in range
        present = bool(pages.present[k])
        write = bool(pages.write[k]) if present else None
        pfn = x86.pte_pfn(e) if present else None
        return Node(name, i, 1, va, va + size, "leaf", pages.kind_name(k), present, write,
                    bool(pages.protnone[k]), pfn, pfn)

    nodes = walk(mm.pt.pgd, 0, 0, start, end) if end > start else []
    vmas = [vma_json(v) for v in mm.vmas_in(start, end)]
    return TableView(mm.name, start, end, geo.levels, mm.machine.profile.name, tuple(n for n, _ in lv), nodes,
                     vmas, label)


def merge(nodes: list[Node], size: int) -> list[Node]:
    """Merge neighbouring none entries, and leaves of equal kind/permissions whose pfns advance by one entry
    (or stay the same, as zero-page entries do)."""
    out: list[Node] = []
    step_pages = size >> PAGE_SHIFT
    for n in nodes:
        p = out[-1] if out else None
        if p is not None and p.end == n.start and p.entry == n.entry and n.entry != "table":
            if n.entry == "none":
                p.count += n.count
                p.end = n.end
                continue
            same = (p.kind, p.present, p.write, p.protnone) == (n.kind, n.present, n.write, n.protnone)
            if same and p.pfn is None and n.pfn is None:
                p.count, p.end = p.count + 1, n.end
                continue
            if same and p.pfn is not None and n.pfn is not None and p.pfn_last is not None:
                step = n.pfn - p.pfn_last
                run_step = (p.pfn_last - p.pfn) // (p.count - 1) if p.count > 1 else step
                if step == run_step and step in (0, step_pages):
                    p.count, p.end, p.pfn_last = p.count + 1, n.end, n.pfn
                    continue
        out.append(n)
    return out


def summary(view: TableView) -> dict[str, int]:
    """Counts of leaf entries by ``level:kind`` (e.g. ``{"pmd:devmap": 1, "pte:file": 16}``) and tables."""
    counts: dict[str, int] = {}

    def rec(nodes: list[Node]) -> None:
        for n in nodes:
            if n.entry == "table":
                counts[f"{n.level}:table"] = counts.get(f"{n.level}:table", 0) + n.count
                rec(n.children)
            elif n.entry == "leaf":
                key = f"{n.level}:{n.kind}"
                counts[key] = counts.get(key, 0) + n.count
    rec(view.nodes)
    return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------------------- text


def fmt_size(n: int) -> str:
    """4096 -> "4K", 2097152 -> "2M", 3 << 30 -> "3G" (exact binary units, else bytes in hex)."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n:#x}" if n >= 1024 else str(n)


def _idx(n: Node) -> str:
    return f"{n.first}" if n.count == 1 else f"{n.first}-{n.first + n.count - 1}"


def _pfns(n: Node) -> str:
    if n.pfn is None:
        return ""
    if n.pfn_last is None or n.pfn_last == n.pfn:
        return f"pfn {n.pfn:#x}" + (" (same)" if n.count > 1 else "")
    return f"pfn {n.pfn:#x}-{n.pfn_last:#x}"


def node_label(n: Node, child_level: str | None = None) -> str:
    """One line describing a node (rich markup): index, first address, what the entries hold."""
    head = f"{n.level}[{_idx(n)}] {n.start:#x}"
    each = fmt_size((n.end - n.start) // n.count)
    if n.entry == "table":
        return f"[bold]{head}[/] {each} \u2192 {child_level or 'next'} table"
    if n.entry == "none":
        return f"[dim]{head} none \u00d7{n.count}[/]"
    style = _RICH_STYLE.get(n.kind, "")
    perm = "protnone" if n.protnone else ("rw" if n.write else "ro") if n.present else "not present"
    huge = " [bold]huge[/]" if n.huge else ""
    return f"{head} {n.count}\u00d7{each} [{style}]{n.kind}[/]{huge} {perm} {_pfns(n)}".rstrip()


def render_tree(view: TableView) -> Tree:
    """A ``rich`` tree: one branch per table entry, one line per run of leaves."""
    from rich.tree import Tree

    lv = list(view.levels)
    title = (f"[bold]{view.label or view.proc}[/] {view.start:#x}-{view.end:#x} ({fmt_size(view.end - view.start)}), "
             f"process {view.proc}, {view.paging}-level paging" + (" (P4D folded into the PGD)" if view.paging == 4
                                                                      else "") + f", kernel {view.kernel}")
    root = Tree(title)

    def rec(parent: Tree, nodes: list[Node]) -> None:
        for n in nodes:
            li = lv.index(n.level)
            child = lv[li + 1] if li + 1 < len(lv) else None
            branch = parent.add(node_label(n, child))
            if n.entry == "table":
                rec(branch, n.children)
    if not view.nodes:
        root.add("[dim]no page tables[/]")
    rec(root, view.nodes)
    return root


# ----------------------------------------------------------------------------------------- picture


def _ticks(span: int) -> tuple[int, list[int]]:
    """A power-of-two tick step giving 3-8 ticks over ``span`` bytes."""
    step = 1 << max(span.bit_length() - 3, PAGE_SHIFT)
    while span // step > 8:
        step <<= 1
    return step, list(range(0, span + 1, step))


def _tick_label(n: int) -> str:
    """1536K -> "1.5M": the largest unit not above ``n``, with up to two decimals."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f}".rstrip("0").rstrip(".") + unit
    return str(n)


def draw_png(views: Sequence[TableView], out: str, title: str = "") -> None:
    """:func:`draw` for the command line: a file that cannot be written is bad input (InputError)."""
    from hmmirror.errors import InputError

    try:
        draw(views, out, title)
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None


def draw(views: Sequence[TableView], out: str, title: str = "") -> None:
    """Draw each view as one panel (VMAs and one row per paging level; address across) into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    views = list(views)
    if not views:
        raise ValueError("nothing to draw")
    rows_max = max(len(v.levels) for v in views) + 1
    fig, axes = plt.subplots(len(views), 1, figsize=(12, 0.45 * rows_max * len(views) + 1.3 * len(views) + 0.9),
                             squeeze=False)
    kinds_seen: set[str] = set()
    readonly_seen = False
    for ax, v in zip(axes[:, 0], views):
        span = max(v.end - v.start, 1)
        rows = ["vma", *v.levels]
        y_of = {name: len(rows) - 1 - k for k, name in enumerate(rows)}
        min_w = span * 0.005
        char_w = span * 0.0052            # approximate width of one label character at fontsize 7.5
        leaf_boxes: dict[str, list[dict[str, Any]]] = {}   # per row: leaf boxes whose label did not fit

        def box(row: str, a: int, b: int, face: str, edge: str = "#444444", hatch: str | None = None,
                text: str = "", text_color: str = "black", lw: float = 0.6) -> tuple[float, float, bool]:
            """Draw one box; its label goes inside if it fits.  Returns (x0, x1, labelled)."""
            x0 = max(a, v.start) - v.start
            x1 = min(b, v.end) - v.start
            w = max(x1 - x0, min_w)
            y = y_of[row] - 0.38
            ax.add_patch(Rectangle((x0, y), w, 0.76, facecolor=face, edgecolor=edge, hatch=hatch, linewidth=lw))
            fits = bool(text) and w > char_w * (len(text) + 2)
            if fits:
                bbox = dict(facecolor=face, edgecolor="none", pad=1.5) if hatch else None
                ax.text(x0 + w / 2, y + 0.38, text, ha="center", va="center", fontsize=7.5, color=text_color,
                        clip_on=True, bbox=bbox)
            return x0, x0 + w, fits

        def outside_labels(row: str, boxes: list[dict[str, Any]]) -> None:
            """One label per cluster of adjacent leaf boxes too narrow for their own (after it, else before)."""
            boxes.sort(key=lambda d: d["x0"])
            clusters: list[list[dict[str, Any]]] = []
            for d in boxes:
                if clusters and d["x0"] - clusters[-1][-1]["x1"] <= min_w * 0.5:
                    clusters[-1].append(d)
                else:
                    clusters.append([d])
            taken = 0.0                                   # the right end of the last label placed
            for k, c in enumerate(clusters):
                if any(d["labelled"] for d in c):
                    taken = max(taken, c[-1]["x1"])
                    continue
                kinds = "/".join(dict.fromkeys(d["kind"] for d in c))
                perms = "/".join(dict.fromkeys(d["perm"] for d in c))
                text = f"{sum(d['count'] for d in c)} \u00d7 {c[0]['level'].upper()} {kinds} {perms}"
                width = char_w * (len(text) + 1.5)
                nxt = clusters[k + 1][0]["x0"] if k + 1 < len(clusters) else span
                y = y_of[row]
                if c[-1]["x1"] + width < nxt:
                    ax.text(c[-1]["x1"] + char_w * 0.6, y, text, ha="left", va="center", fontsize=7.5,
                            color="#222222", clip_on=True)
                    taken = c[-1]["x1"] + width
                elif c[0]["x0"] - width > taken:
                    ax.text(c[0]["x0"] - char_w * 0.6, y, text, ha="right", va="center", fontsize=7.5,
                            color="#222222", clip_on=True)
                    taken = c[-1]["x1"]

        for vm in v.vmas:
            a, b = int(vm["start"], 16), int(vm["end"], 16)
            name = vm["kind"] + (f" {vm['file']}" if vm.get("file") else "") + f" {vm['perms']}"
            box("vma", a, b, "#F7F7F7", text=name)

        def rec(nodes: list[Node]) -> None:
            nonlocal readonly_seen
            for n in nodes:
                if n.entry == "table":
                    li = rows.index(n.level)
                    below = rows[li + 1].upper() if li + 1 < len(rows) else "next"
                    box(n.level, n.start, n.end, TABLE_COLOR, edge="#888888", text=f"\u2192 {below} table")
                    rec(n.children)
                elif n.entry == "none":
                    box(n.level, n.start, n.end, NONE_COLOR, edge="#BBBBBB", lw=0.4)
                else:
                    kinds_seen.add(n.kind)
                    ro = n.present and not n.write
                    readonly_seen |= ro
                    color = KIND_COLORS.get(n.kind, "#999999")
                    if n.huge:                    # the levels below a huge leaf hold no tables
                        x0 = max(n.start, v.start) - v.start
                        x1 = min(n.end, v.end) - v.start
                        below = [y_of[r] for r in rows[rows.index(n.level) + 1:]]
                        ax.add_patch(Rectangle((x0, min(below) - 0.38), x1 - x0, max(below) - min(below) + 0.76,
                                               facecolor=color, alpha=0.10, edgecolor="none"))
                        if x1 - x0 > span * 0.3:
                            ax.text((x0 + x1) / 2, (min(below) + max(below)) / 2,
                                    f"no lower tables: the {n.level.upper()} entry is the leaf", ha="center",
                                    va="center", fontsize=7.5, color="#555555", style="italic")
                    label = f"{n.count} \u00d7 {n.level.upper()}"
                    if n.count == 1:
                        label += f" {fmt_size(n.end - n.start)}"
                    perm = "ro" if ro else "rw" if n.present else "not present"
                    x0, x1, fits = box(n.level, n.start, n.end, color, hatch="////" if ro else None,
                                       text=f"{label} {n.kind} {perm}",
                                       text_color="white" if n.kind in ("anon", "devmap", "file", "special",
                                                                        "hugetlb", "hwpoison",
                                                                        "device_private") else "black")
                    leaf_boxes.setdefault(n.level, []).append(
                        {"x0": x0, "x1": x1, "labelled": fits, "count": n.count, "level": n.level,
                         "kind": n.kind, "perm": perm})
        rec(v.nodes)
        for row, boxes in leaf_boxes.items():
            outside_labels(row, boxes)
        ax.set_xlim(0, span)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.set_yticks([y_of[r] for r in rows])
        ax.set_yticklabels([r.upper() if r != "vma" else "VMA" for r in rows], fontsize=8)
        _step, ticks = _ticks(span)
        ax.set_xticks(ticks)
        ax.set_xticklabels(["+0"] + [f"+{_tick_label(t)}" for t in ticks[1:]], fontsize=7.5)
        ax.tick_params(axis="y", length=0)
        for s in ("top", "right", "left"):
            ax.spines[s].set_visible(False)
        ax.set_title(f"{v.label or v.proc}: {v.start:#x} - {v.end:#x} ({fmt_size(v.end - v.start)}), "
                     f"process {v.proc}", fontsize=9, loc="left")
    handles = [Patch(facecolor=KIND_COLORS.get(k, "#999999"), edgecolor="#444444", label=KIND_LABELS.get(k, k))
               for k in sorted(kinds_seen)]
    handles += [Patch(facecolor=TABLE_COLOR, edgecolor="#888888", label="entry \u2192 lower table"),
                Patch(facecolor=NONE_COLOR, edgecolor="#BBBBBB", label="none")]
    if readonly_seen:
        handles.append(Patch(facecolor="white", edgecolor="#444444", hatch="////", label="read-only"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    kernel = views[0].kernel
    fig.suptitle(title or f"page tables (kernel {kernel}, {views[0].paging}-level paging)", fontsize=11,
                 x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.06 + 0.02 / len(views), 1, 0.97))
    try:
        fig.savefig(out, dpi=110, format="png")
    finally:
        plt.close(fig)
