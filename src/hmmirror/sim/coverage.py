"""Coverage of a campaign: which cells of the mirror's state space the HMM walks met.

A *walk cell* is ``(VMA kind, walk function, entry kind, return path)``: the handler of the profile's HMM
walk that ran (``pte`` = ``hmm_vma_handle_pte``, ``pmd`` = ``hmm_vma_walk_pmd``, ``pud`` =
``hmm_vma_walk_pud``, ``hugetlb`` = ``hmm_vma_walk_hugetlb_entry``, ``hole`` = ``hmm_vma_walk_hole``,
``test`` = [6.x] ``hmm_vma_walk_test``, ``api`` = the top-level ``hmm_range_fault``/``hmm_range_snapshot``),
the kind of the entry it was called for (read when the handler starts: ``none``, ``present``, ``devmap``,
``special``, ``zero``, ``huge_zero``, ``swap``, ``migration``, ``hwpoison``, ``protnone``, ``device_private``,
``marker``, ``table``, ``bad``), and how it returned (``0``, ``-EBUSY``, ``-EFAULT``, ...; ``1`` = skip the VMA).
Two more axes are crossed with the return path of the walk functions: the HMM API mode of the device job
(``mode x return``) and the background event that was running when the handler returned (``event x
function``).  The profile is the campaign's.

Reachable cells are derived from the specs (:func:`reachable`): which entries a VMA kind can hold in the model
(mm-substrate.md §5), which handler meets which entry (hmm-5.2.md §6-§7, hmm-modern.md §4.5) and which
returns each path has (hmm-5.2.md §13, hmm-modern.md §4.6); every other cell of the axis product is listed with
the reason it cannot be reached.

Collection is cheap: while a run with coverage is active the handler functions of the profile's HMM module
are wrapped (module globals swapped, restored when the run ends; the wrappers live in ``sim/`` so finding
stacks never show them); a wrapper reads one entry, and adds one small tuple to a set when the handler
returns.  Nothing is kept per page.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Iterator

from hmmirror.arch.x86 import pgtable as x86

ERRNO = {1: "-EPERM", 2: "-ENOENT", 11: "-EAGAIN", 12: "-ENOMEM", 14: "-EFAULT", 16: "-EBUSY", 22: "-EINVAL"}

VMA_KINDS = ("anon", "shmem", "file", "fsdax", "devdax", "hugetlb", "pfnmap", "mixedmap", "novma")
FUNCS = ("api", "test", "hole", "pud", "pmd", "pte", "hugetlb")
ENTRIES = ("none", "table", "present", "devmap", "special", "zero", "huge_zero", "swap", "migration", "hwpoison",
           "protnone", "device_private", "marker", "bad", "-")
RETS = ("0", "1", "-EBUSY", "-EFAULT", "-EAGAIN", "-EINVAL", "-EPERM", "-ENOENT")

# the handlers wrapped per HMM module: (module attribute, function label, how to read its entry)
_V52 = "hmmirror.mm.hmm.v5_2"
_MODERN = "hmmirror.mm.hmm.modern"


def ret_name(r: Any, positive: str = "0") -> str:
    """``0`` for success (a page count too), ``-EBUSY`` etc. for errors; ``positive`` names r > 0."""
    if isinstance(r, bool) or not isinstance(r, int):
        return "0"
    if r >= 0:
        return positive if r > 0 else "0"
    return ERRNO.get(-r, str(r))


# --- entry classification ---------------------------------------------------------------------------------
def classify_pte(e: int, mem: Any) -> str:
    """The kind of a PTE (or a hugetlb entry)."""
    if x86.pte_none(e):
        return "none"
    if not x86.pte_present(e):
        s = x86.pte_to_swp_entry(e)
        if x86.is_migration_entry(s):
            return "migration"
        if x86.is_hwpoison_entry(s):
            return "hwpoison"
        if x86.is_device_private_entry(s) or x86.is_device_exclusive_entry(s):
            return "device_private"
        if x86.is_pte_marker(s):
            return "marker"
        return "swap"
    if x86.pte_protnone(e):
        return "protnone"
    if x86.pte_devmap(e):
        return "devmap"
    if x86.pte_special(e):
        pfn = x86.pte_pfn(e)
        return "zero" if pfn == mem.zero_pfn else "special"
    pfn = x86.pte_pfn(e)
    if pfn == mem.zero_pfn:
        return "zero"
    return "present"


def classify_huge(e: int, mem: Any) -> str:
    """The kind of a PMD or PUD entry."""
    if x86.pte_none(e):
        return "none"
    if not x86.pmd_present(e):
        s = x86.pte_to_swp_entry(e)
        return "migration" if x86.is_migration_entry(s) else "bad"
    if not x86.pmd_leaf(e):
        return "table"
    if x86.pte_protnone(e):
        return "protnone"
    if x86.pte_devmap(e):
        return "devmap"
    pfn = x86.pte_pfn(e)
    if mem.is_huge_zero_pfn(pfn):
        return "huge_zero"
    return "present"


# --- what the campaign saw ---------------------------------------------------------------------------------
class Coverage:
    """The cells one campaign (worker) covered; ``add_run`` merges a run's cells, True if any was new."""

    def __init__(self, kernel: str, driver: str = "builtin") -> None:
        from hmmirror.profiles import get_profile
        self.kernel = get_profile(kernel).name
        self.driver = driver
        self.walk: set[tuple[str, str, str, str]] = set()
        self.mode_ret: set[tuple[str, str]] = set()
        self.event_fn: set[tuple[str, str]] = set()

    def run_collector(self) -> "RunCoverage":
        return RunCoverage(self.kernel)

    def add_run(self, res: Any) -> bool:
        rc = getattr(res, "coverage", None)
        if rc is None:
            return False
        n = len(self.walk) + len(self.mode_ret) + len(self.event_fn)
        self.walk |= rc.walk
        self.mode_ret |= rc.mode_ret
        self.event_fn |= rc.event_fn
        return len(self.walk) + len(self.mode_ret) + len(self.event_fn) > n

    def merge(self, snap: dict[str, Any]) -> None:
        self.walk |= {tuple(x) for x in snap.get("walk", ())}          # type: ignore[misc]
        self.mode_ret |= {tuple(x) for x in snap.get("mode_ret", ())}  # type: ignore[misc]
        self.event_fn |= {tuple(x) for x in snap.get("event_fn", ())}  # type: ignore[misc]

    def snapshot(self) -> dict[str, Any]:
        return {"walk": sorted(self.walk), "mode_ret": sorted(self.mode_ret), "event_fn": sorted(self.event_fn)}

    # -- reports ---------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """covered/total per axis and per grid (reachable cells only), and the unreachable cells' reasons."""
        reach = reachable(self.kernel, self.driver)
        out: dict[str, Any] = {"profile": self.kernel, "driver": self.driver, "axes": {}, "grids": {}}
        walk_r = set(reach["walk"])
        cov_w = self.walk & walk_r
        for i, axis in enumerate(("vma", "function", "entry", "return")):
            tot = sorted({c[i] for c in walk_r})
            got = sorted({c[i] for c in cov_w})
            out["axes"][axis] = {"covered": len(got), "total": len(tot), "missing": [x for x in tot if x not in got]}
        for name, got_set in (("walk", self.walk), ("mode_ret", self.mode_ret), ("event_fn", self.event_fn)):
            r = set(reach[name])
            out["grids"][name] = {"covered": len(got_set & r), "total": len(r),
                                  "missing": sorted("|".join(c) for c in r - got_set),
                                  "outside": sorted("|".join(c) for c in got_set - r)}
        for i, axis in enumerate(("mode", "mode_return")):
            r = {c[i] for c in reach["mode_ret"]}
            got = {c[i] for c in self.mode_ret} & r
            out["axes"]["api_mode" if i == 0 else "api_return"] = {"covered": len(got), "total": len(r),
                                                                  "missing": sorted(r - got)}
        r = {c[0] for c in reach["event_fn"]}
        got = {c[0] for c in self.event_fn} & r
        out["axes"]["event"] = {"covered": len(got), "total": len(r), "missing": sorted(r - got)}
        tot = sum(g["total"] for g in out["grids"].values())
        cov = sum(g["covered"] for g in out["grids"].values())
        out["covered"], out["total"] = cov, tot
        out["percent"] = round(100.0 * cov / tot, 1) if tot else 100.0
        out["unreachable"] = unreachable_reasons(self.kernel, self.driver)
        return out


class RunCoverage:
    """The cells of one run, collected by wrapping the HMM handlers while the run is active (an instrument)."""

    WINDOW = 64

    def __init__(self, kernel: str) -> None:
        self.kernel = kernel
        self.walk: set[tuple[str, str, str, str]] = set()
        self.mode_ret: set[tuple[str, str]] = set()
        self.event_fn: set[tuple[str, str]] = set()
        self.engine: Any = None
        self.recent: dict[str, int] = {}            # event kind -> last step one of its tasks ran
        self._saved: list[tuple[Any, str, Any]] = []
        self.mm: Any = None

    # -- instrument hooks -----------------------------------------------------------------------------------
    def attach(self, eng: Any, run: Any) -> None:
        self.engine = eng
        self.mm = run.procs[run.scenario.mirror].mm if run.scenario.mirror in run.procs else None
        self.install(run.machine.profile.hmm_module)

    #: the log kinds :meth:`on_log` reads (the engine routes only these to it)
    log_kinds = frozenset({"hmm_range_fault", "hmm_range_snapshot"})

    def on_log(self, eng: Any, ev: dict[str, Any]) -> None:
        """The API calls (``hmm_range_fault`` / ``hmm_range_snapshot`` log their result when they return)."""
        what = ev["what"]
        if what != "hmm_range_fault" and what != "hmm_range_snapshot":
            return
        mm, start = self.mm, ev.get("start")
        vk = "-"
        if mm is not None and isinstance(start, int):
            v = mm.find_vma(start)
            vk = "novma" if v is None or v.vm_start > start else v.kind
        rn = ret_name(ev.get("ret"))
        self.walk.add((vk, "api", "-", rn))
        self.mode_ret.add((self._mode(), rn))
        for ev_ in self._events():
            self.event_fn.add((ev_, "api"))

    def after_step(self, eng: Any, st: Any, point: Any) -> None:
        if st.kind == "kevent" and st.op:
            self.recent[st.label] = eng.step

    def run_finished(self, eng: Any) -> None:
        self.uninstall()

    # -- wrapping -------------------------------------------------------------------------------------------
    def install(self, module: str) -> None:
        mod = importlib.import_module(module)
        specs = _SPECS[module]
        wrapped = {}
        for attr, label, reader, is_gen in specs:
            fn = getattr(mod, attr, None)
            if fn is None:
                continue
            self._saved.append((mod, attr, fn))
            wrapped[fn] = self._wrap(fn, label, reader, is_gen)
            setattr(mod, attr, wrapped[fn])
        ops = getattr(mod, "hmm_walk_ops", None)       # [6.x] the callbacks live in a frozen ops table
        if ops is not None:
            import dataclasses
            self._saved.append((mod, "hmm_walk_ops", ops))
            repl = {f.name: wrapped[getattr(ops, f.name)] for f in dataclasses.fields(ops)
                    if getattr(ops, f.name) in wrapped}
            setattr(mod, "hmm_walk_ops", dataclasses.replace(ops, **repl))

    def uninstall(self) -> None:
        for mod, attr, fn in reversed(self._saved):
            setattr(mod, attr, fn)
        self._saved.clear()

    def _events(self) -> list[str]:
        """The background events that ran within the last WINDOW steps (as the signatures' ``kevent``)."""
        now = self.engine.step if self.engine is not None else 0
        evs = [lab for lab, st in self.recent.items() if now - st <= self.WINDOW]
        return evs or ["-"]

    def _mode(self) -> str:
        eng = self.engine
        st = eng.current if eng is not None else None
        if st is None:
            return "-"
        return getattr(eng, "fault_modes", {}).get(st.idx, "fault") if st.kind == "device" else st.kind

    def _wrap(self, fn: Callable[..., Any], label: str, reader: Callable[..., tuple[str, str]], is_gen: bool
              ) -> Callable[..., Any]:
        walk, event_fn = self.walk, self.event_fn
        me = self

        def record(vk: str, entry: str, r: Any) -> None:
            walk.add((vk, label, entry, ret_name(r, "1" if label == "test" else "0")))
            for ev_ in me._events():
                event_fn.add((ev_, label))

        if is_gen:
            @functools.wraps(fn)
            def gen_wrapper(*args: Any) -> Iterator[Any]:
                try:
                    vk, entry = reader(*args)
                except Exception:                     # noqa: BLE001 - classification never fails a run
                    vk, entry = "-", "-"
                r = yield from fn(*args)
                record(vk, entry, r)
                return r
            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any) -> Any:
            try:
                vk, entry = reader(*args)
            except Exception:                         # noqa: BLE001
                vk, entry = "-", "-"
            r = fn(*args)
            record(vk, entry, r)
            return r
        return wrapper


# --- readers: (VMA kind, entry kind) from a handler's arguments -------------------------------------------
def _vk(walk: Any) -> str:
    v = getattr(walk, "vma", None)
    return "novma" if v is None else v.kind


def _mem(walk: Any) -> Any:
    return walk.mm.machine.mem


def _pool(walk: Any) -> Any:
    return walk.mm.machine.pool


def _r_hole(addr: int, end: int, *rest: Any) -> tuple[str, str]:
    return _vk(rest[-1]), "none"


def _r_level(p: Any, start: int, end: int, walk: Any) -> tuple[str, str]:
    return _vk(walk), classify_huge(_pool(walk).get(p), _mem(walk))


def _r_pte(walk: Any, addr: int, end: int, pmdp: Any, ptep: Any, *rest: Any) -> tuple[str, str]:
    return _vk(walk), classify_pte(_pool(walk).get(ptep), _mem(walk))


def _r_hugetlb(p: Any, hmask: int, start: int, end: int, walk: Any) -> tuple[str, str]:
    return _vk(walk), classify_pte(_pool(walk).get(p), _mem(walk))


def _r_test(start: int, end: int, walk: Any) -> tuple[str, str]:
    return _vk(walk), "-"


_SPECS: dict[str, list[tuple[str, str, Callable[..., tuple[str, str]], bool]]] = {
    _V52: [("hmm_vma_walk_hole", "hole", _r_hole, True), ("hmm_vma_walk_pud", "pud", _r_level, True),
           ("hmm_vma_walk_pmd", "pmd", _r_level, True), ("hmm_vma_handle_pte", "pte", _r_pte, True),
           ("hmm_vma_walk_hugetlb_entry", "hugetlb", _r_hugetlb, True)],
    _MODERN: [("hmm_vma_walk_test", "test", _r_test, False),
              ("hmm_vma_walk_hole", "hole", _r_hole, True), ("hmm_vma_walk_pud", "pud", _r_level, True),
              ("hmm_vma_walk_pmd", "pmd", _r_level, True), ("hmm_vma_handle_pte", "pte", _r_pte, True),
              ("hmm_vma_walk_hugetlb_entry", "hugetlb", _r_hugetlb, True)],
}


# --- reachability (from the specs) -------------------------------------------------------------------------
def _entries(kernel: str) -> dict[str, dict[str, set[str]]]:
    """Entry kinds each VMA kind can present to each handler in the model.  ``pmd`` handlers never see a
    none PMD (the walker reports it as a hole, hmm-5.2.md §6, hmm-modern.md §4.2)."""
    from hmmirror.profiles import get_profile
    prof = get_profile(kernel)
    five = kernel == "5.2"
    dax = "devmap" if prof.devmap_bits else "present"
    # [6.x] device-private (and device-exclusive) entries: dmirror/drm_gpusvm migrate anonymous pages of
    # non-DAX VMAs to device memory (migrate_vma_setup refuses DAX, hugetlb and VM_SPECIAL VMAs) and take
    # anonymous pages exclusive (make_device_exclusive: also the COW copies inside private file/DAX mappings);
    # the HMM walk meets them in the PTE handler
    devp = set() if five else {"device_private"}
    # [6.x] walk_pud_range calls pud_entry for every present PUD, tables included (hmm_vma_walk_pud returns 0
    # and the walk goes down, ACTION_CONTINUE); [5.2] only for trans-huge/devmap PUDs
    pud_t = set() if five else {"table"}
    # [6.x] hmm_vma_walk_test runs for every VMA (0: walk it); VM_MIXEDMAP without VM_IO is walked
    test = {} if five else {"test": {"-"}}
    mixed = {} if five else {"pte": {"none", "present"}, "pmd": {"table"}, "pud": {"table"}, "hole": {"none"}}
    return {
        "anon": {"pte": {"none", "present", "zero", "swap", "migration", "hwpoison", "protnone"} | devp,
                 "pmd": {"table", "present", "huge_zero", "protnone", "migration"}, "hole": {"none"},
                 "pud": pud_t, **test},
        # memory_failure of a shmem page (shmem cannot write back) leaves hwpoison entries (mm/memory_failure.py)
        # [6.x] migrate_vma_setup collects shmem pages too (migrate_vma_collect_pmd: a page with a mapping) and
        # installs migration entries; migrate_vma_pages then refuses them (only anonymous memory goes to device
        # memory) and migrate_vma_finalize restores the PTEs: a walk meanwhile meets a migration entry
        "shmem": {"pte": {"none", "present", "hwpoison"} | (set() if five else {"migration"}), "pmd": {"table"},
                  "hole": {"none"}, "pud": pud_t, **test},
        # private file and DAX mappings hold anonymous COW copies: swapped, migrated or poisoned like anon pages;
        # a dirty page-cache page that memory_failure poisons becomes a hwpoison entry in every mapping of it;
        # [6.x] a 2 MiB page-cache folio (xfs from 6.12, ext4 from 6.16) is PMD-mapped
        "file": {"pte": {"none", "present", "hwpoison", "migration", "swap"} | devp,
                 "pmd": {"table"} | ({"present"} if prof.file_large_folios else set()),
                 "hole": {"none"}, "pud": pud_t, **test},
        "fsdax": {"pte": {"none", dax, "zero", "present", "hwpoison", "swap", "migration"} | devp,
                  "pmd": {"table", dax, "huge_zero"},
                  "hole": {"none"}, "pud": pud_t, **test},
        # [5.2] a write fault of hmm_vma_do_fault on a read-only shared device-dax PTE: hmm does not check
        # VM_WRITE (hmm-5.2.md §9) and do_wp_page() copies a page vm_normal_page() does not know
        # (wp_page_copy: an anonymous COW page inside the shared mapping)
        "devdax": {"pte": {"none", dax} | ({"present"} if five else set()), "pmd": {"table", dax},
                   "pud": {dax} | pud_t, "hole": {"none"}, **test},
        "hugetlb": {"hugetlb": {"none", "present"}, "hole": {"none"}, **test},
        "pfnmap": test,
        "mixedmap": {**test, **mixed},
        "novma": {"hole": {"none"}},
    }


#: VMA kinds mapped shared and writable without write-notify (no page_mkwrite, no dirty accounting):
#: vm_page_prot is writable, so every present entry of a writable VMA is writable from its first fault
SHARED_WRITABLE = ("shmem", "devdax", "mixedmap")


def _rets(kernel: str, fn: str, vk: str, entry: str) -> set[str]:
    """Return paths of a handler for an entry (hmm-5.2.md §13 / hmm-modern.md §4.6), fault and snapshot modes:
    ``0`` reported, ``-EBUSY`` faulted (or waited) and the walk restarts, ``-EFAULT`` an error entry or a
    fault error, ``-EAGAIN`` [5.2] the fault path dropped mmap_sem (VM_FAULT_RETRY: cold page cache),
    ``-EPERM`` [6.x] a write fault requested in a VMA without VM_WRITE (hmm_vma_fault)."""
    five = kernel == "5.2"
    # [6.x] hmm_vma_fault refuses a write fault in a read-only VMA; [5.2] has no such check
    perm = set() if five else {"-EPERM"}
    if fn == "test":                                  # 0 walk it; 1 skip (ERROR entries); -EFAULT a fault there
        return {"1", "-EFAULT"} if vk == "pfnmap" else {"0", "1", "-EFAULT"}
    if fn == "hole":
        if vk == "novma":
            return {"0", "-EFAULT"}                   # fault in a gap: [5.2] handle_mm_fault(NULL), [6.x] -EFAULT
        # VM_FAULT_SIGBUS of a DAX fault (past the end of the file, a device-dax fault the alignment refuses),
        # of an anonymous fault in an OOM-reaped mm (check_stable_address_space: MMF_UNSTABLE)
        # (and of a COW fault in a private file mapping of an OOM-reaped mm: finish_fault's
        # check_stable_address_space, as in the PTE handler)
        return {"0", "-EBUSY"} | ({"-EAGAIN"} if vk == "file" and five else set()) | \
            ({"-EFAULT"} if vk in ("fsdax", "devdax", "anon", "file") else set()) | perm
    if fn == "hugetlb":                               # -EFAULT: no free huge page for a fault (VM_FAULT_OOM)
        # [5.2] the handler's -EINVAL (a start not aligned to the huge page_shift, a page not whole in the range)
        # cannot happen: see unreachable_reasons
        return {"0", "-EBUSY"} | ({"-EFAULT"} if entry == "present" else set()) | perm
    if not five and vk in SHARED_WRITABLE and entry in ("present", "devmap") and fn in ("pte", "pmd", "pud"):
        # [6.x, model] such an entry is writable from its first fault in a writable VMA, read-only in a
        # read-only one: a fault is needed only for a write in a read-only VMA, and refused there (-EPERM);
        # see unreachable_reasons (soft-dirty)
        return {"0"} | perm
    if fn == "pud":
        if entry == "table":
            return {"0"}                              # [6.x] ACTION_CONTINUE: the PMD level is walked
        # [5.2] a fault under the PUD lock that reaches vmf_insert_pfn_pud never returns (B6), but one that
        # dev_dax_huge_fault refuses first (the device is dying: kill_dax cleared DAXDEV_ALIVE, the PUD is
        # still mapped until kill_dev_dax unmaps it) is VM_FAULT_SIGBUS: -EFAULT
        return {"0", "-EFAULT"} if five else {"0", "-EBUSY", "-EFAULT", "-EPERM"}
    r = {"0", "-EBUSY"}
    if five and fn == "pte" and entry in ("swap", "migration"):
        # [5.2] hmm_vma_handle_pte tests a swap or migration entry before hmm_pte_need_fault ran for it: fault and
        # write_fault are still false, so both are reported NONE with 0 whatever the request (hmm-5.2.md §7.3, §13)
        return {"0"}
    if entry == "hwpoison":                           # [6.x] reported as 0 when no fault is requested there
        return {"-EFAULT"} if five else {"0", "-EFAULT"}
    if entry == "migration":                          # wait for the migration: the walk restarts
        return r
    if fn == "pte":
        if entry == "zero" and five:
            return {"-EFAULT", "-EBUSY"}              # [5.2] the zero page is special: SPECIAL, -EFAULT
        # a PTE handler that needs a fault faults from its page to the end of the walk's range (hmm_vma_fault
        # [6.x], hmm_vma_walk_hole_ [5.2]: handle_mm_fault page by page, the first error returned), so the
        # failure of ANY page's fault in that range comes back through the handler of the first page that
        # needed one, whatever its entry: VM_FAULT_SIGBUS in an OOM-reaped mm (MMF_UNSTABLE:
        # do_anonymous_page, finish_fault of a private file or DAX mapping's COW fault), of a DAX fault past
        # the end of the file or on a DAX hole's zero page, of a device-dax fault on a dying device -> -EFAULT;
        # [5.2] a fault that dropped mmap_sem (VM_FAULT_RETRY, cold page cache) -> -EAGAIN
        faults = ("none", "present", "zero", "devmap", "swap", "protnone", "device_private")
        if entry in faults:
            if vk in ("anon", "file", "fsdax", "devdax"):
                r.add("-EFAULT")
            if vk == "file" and five:
                r.add("-EAGAIN")
            r |= perm
        return r
    if entry == "device_private":                     # (not below the PTE level)
        return r
    if fn == "pmd" and entry == "table":
        # the PTE handlers' returns come back through hmm_vma_walk_pmd (a hwpoison or [5.2] zero-page PTE, a
        # fault that failed: -EFAULT; a fault that dropped mmap_sem: -EAGAIN; -EPERM)
        for e in _entries(kernel).get(vk, {}).get("pte", ()):
            r |= _rets(kernel, "pte", vk, e)
        return r
    if fn == "pmd" and entry in ("present", "devmap", "huge_zero", "protnone"):
        r |= perm if entry != "protnone" else set()
        # [6.x] the PMD handler faults [addr, end) as the PTE handler does (hmm_vma_handle_pmd ->
        # hmm_vma_fault): a fault that fails anywhere in it is -EFAULT -- a COW fault of a huge zero PMD in an
        # OOM-reaped mm (do_huge_zero_wp_pmd [6.18] / the split PMD's PTE faults and finish_fault's
        # check_stable_address_space), a DAX fault past the end of the file or on a hole; [5.2] the same
        # through hmm_vma_handle_pmd -> hmm_vma_walk_hole_
        if vk in ("anon", "file", "fsdax"):
            r.add("-EFAULT")
    return r


_API_RETS = {"5.2": {"0", "-EFAULT", "-EAGAIN", "-EBUSY", "-EPERM"},
             "6.18": {"0", "-EFAULT", "-EBUSY", "-EPERM"}}


#: device-job modes that make no HMM API call (their mode x return cells cannot exist): test_hmm.c
#: dmirror_migrate_to_device / dmirror_migrate_to_system call migrate_vma_setup/pages/finalize, dmirror_exclusive
#: calls make_device_exclusive (the CPU faults that bring the pages back come from other tasks)
NO_HMM_CALL = ("migrate_dev", "migrate_sys", "exclusive")


def reachable(kernel: str, driver: str = "builtin") -> dict[str, list[tuple[str, ...]]]:
    """The reachable cells of each grid for a profile and a driver (a deterministic, sorted list): the
    ``gc`` event's cells only with a driver whose ``gc`` routine runs (``scenario.driver_runs_gc``)."""
    from hmmirror.profiles import get_profile
    from hmmirror.sim.scenario import DEVICE_MODES, EVENTS, driver_runs_gc
    kernel = get_profile(kernel).name
    five = kernel == "5.2"
    walk: set[tuple[str, ...]] = set()
    for vk, fns in _entries(kernel).items():
        for fn, ents in fns.items():
            for e in ents:
                for r in _rets(kernel, fn, vk, e):
                    walk.add((vk, fn, e, r))
        rets = set(_API_RETS["5.2" if five else "6.18"])   # 6.12 has the 6.18 API (hmm_range_fault)
        if vk in ("pfnmap", "mixedmap"):            # [5.2] -EAGAIN: the range was invalid already
            rets = {"-EFAULT", "-EAGAIN"} if five else {"0", "-EFAULT", "-EBUSY"} | (
                {"-EPERM"} if vk == "mixedmap" else set())
        if vk == "hugetlb" and five:
            rets.add("-EINVAL")
        for r in rets:
            walk.add((vk, "api", "-", r))
    modes = [e.name for e in DEVICE_MODES if (e.profiles is None or kernel in e.profiles)
             and e.name not in NO_HMM_CALL]
    mode_ret = set()
    for m in modes:
        for r in _API_RETS["5.2" if five else "6.18"]:
            if five and m.startswith("snapshot") and r == "-EBUSY":
                continue                              # [5.2] snapshot ignores walk results (§9.1)
            if not five and m == "snapshot" and r in ("-EFAULT", "-EPERM"):
                continue                              # [6.x] no request: no fault, no required-fault error
            mode_ret.add((m, r))
        if five and m.endswith("_huge"):
            mode_ret.add((m, "-EINVAL"))
    events = ["-"] + sorted({e.kind or e.name for e in EVENTS if not e.opt_in and
                             (e.profiles is None or kernel in e.profiles) and
                             (e.name != "gc" or driver_runs_gc(driver, kernel))})
    fns = sorted({c[1] for c in walk})
    event_fn = {(ev, fn) for ev in events for fn in fns}
    return {"walk": sorted(walk), "mode_ret": sorted(mode_ret), "event_fn": sorted(event_fn)}  # type: ignore[arg-type]


def unreachable_reasons(kernel: str, driver: str = "builtin") -> list[dict[str, str]]:
    """Groups of cells of the axis product that the model can never reach, with the reason."""
    from hmmirror.sim.scenario import driver_runs_gc
    five = kernel == "5.2"
    out = [*([] if driver_runs_gc(driver, kernel) else [
        {"cells": "gc x every walk function",
         "reason": f"driver {driver!r} on {kernel} has no gc routine: lib/test_hmm.c's dmirror has no background "
                   "collection, drm_gpusvm runs its garbage collector as a work item (a kworker task); the "
                   "campaign does not draw the gc event"}]),
        {"cells": "pfnmap|mixedmap x every walk function" if five else "pfnmap x pte/pmd/pud/hole, pfnmap x test x 0",
         "reason": "[5.2] per_vma_checks returns -EFAULT for VM_PFNMAP/VM_MIXEDMAP before any walk (hmm-5.2.md §9.1)"
         if five else "[6.x] hmm_vma_walk_test skips (1) or fails (-EFAULT) every VM_PFNMAP VMA "
                      "(hmm-modern.md §4.2); VM_MIXEDMAP without VM_IO is walked"},
        {"cells": "anon|shmem|file|fsdax|hugetlb x pud",
         "reason": "on x86-64 the only PUD leaves outside hugetlb are device-dax 1 GiB leaves (hmm-5.2.md §7.1); "
                   "hugetlb VMAs are walked through hugetlb_entry"},
        {"cells": "fsdax x pud", "reason": "fsdax never maps PUDs (mm-substrate.md §5.7)"},
        {"cells": "devdax x swap|migration|hwpoison|zero|huge_zero",
         "reason": "device-dax memory is never swapped, migrated or zero-page mapped; memory_failure of a DAX page "
                   "(memory_failure_dev_pagemap [5.2], mf_generic_kill_procs [6.x]) unmaps the file range "
                   "(unmap_and_kill: the entries become none) and leaves no hwpoison entry"},
        {"cells": "shmem x swap", "reason": "a shmem page is swapped out of the page cache: try_to_unmap clears its "
                                            "PTEs and the swap entry goes into the xarray (shmem_writepage), never "
                                            "into a PTE"},
        {"cells": "* x marker" if not five else "* x device_private|marker",
         "reason": "PTE markers are 6.x uffd/guard state no generated operation creates" if not five else
                   "5.2 device-private migration (hmm_devmem) is out of scope (hmm-5.2.md §14.7); no markers in 5.2"},
        *([{"cells": "shmem|devdax|hugetlb x device_private",
            "reason": "[6.x] migrate_vma_setup refuses DAX, hugetlb and VM_SPECIAL VMAs and migrate_vma_collect_pmd "
                      "collects anonymous pages only; make_device_exclusive takes anonymous folios only "
                      "(mm/migrate_device.c, mm/rmap.c): a shared shmem page or a device-dax page never becomes a "
                      "device-private or device-exclusive entry"},
           {"cells": "migrate_dev|migrate_sys|exclusive x every API return",
            "reason": "these device jobs make no HMM call: dmirror_migrate_to_device/_system use migrate_vma_setup, "
                      "dmirror_exclusive make_device_exclusive (lib/test_hmm.c)"}] if not five else []),
        {"cells": "hugetlb x swap|migration|hwpoison",
         "reason": "not modelled (a model limit, not the kernel's): the model's migration and memory_failure "
                   "handle non-hugetlb pages only (the kernel migrates hugetlb pages, migrate_huge_page_move_"
                   "mapping, and poisons them, hugetlb hwpoison entries); hugetlb pages are never swapped"},
        {"cells": "* x pmd x bad", "reason": "no syscall leaves a non-present non-migration PMD on x86-64 "
                                            "(reachable only with the opt-in inject event)"},
        *([{"cells": "devdax x pud x devmap x -EBUSY",
            "reason": "[5.2] a fault from hmm_vma_walk_pud runs under the PUD lock and never returns: "
                      "vmf_insert_pfn_pud takes that lock again (B6, hmm-5.2.md §7.1); get_dev_pagemap cannot fail "
                      "while the PUD is mapped (kill_dev_dax unmaps before devm_memremap_pages_release kills the "
                      "pgmap, and the PUD lock held by the walk keeps the unmap out)"}] if five else []),
        {"cells": "pud x table|none (handler)" if five else "pud x none (handler)",
         "reason": "[5.2] the walker calls pud_entry only for trans-huge/devmap PUDs (hmm-5.2.md §6)" if five else
                   "[6.x] walk_pud_range calls pte_hole for a none PUD, pud_entry for the others"},
    ]
    if five:
        out.append({"cells": "file x pmd x present", "reason": "[5.2] ext4/xfs page cache is never PMD-mapped"})
        out.append({"cells": "* x pte x swap|migration x -EBUSY|-EFAULT|-EAGAIN",
                    "reason": "[5.2] hmm_vma_handle_pte tests a real swap entry and a migration entry before it calls "
                              "hmm_pte_need_fault for them: fault and write_fault are still false, so it reports "
                              "NONE and returns 0 in both modes, never faults them in and never waits for the "
                              "migration (hmm-5.2.md §7.3, §13; fixed in 5.7 by 'return the fault type from "
                              "hmm_pte_need_fault')"})
        out.append({"cells": "hugetlb x hugetlb x -EINVAL",
                    "reason": "[5.2] hmm_vma_walk_hugetlb_entry's -EINVAL needs a start not aligned to the huge "
                              "page_shift or a huge page not whole in [start, end): hmm_range_register refuses a "
                              "range whose start or end is not aligned to page_shift, hmm_range_snapshot/fault refuse "
                              "(-EINVAL) a huge page_shift that is not the VMA's, hugetlb VMAs start and end on huge "
                              "page boundaries (munmap/mprotect of a part refuse unaligned addresses) and a restarted "
                              "walk starts at hmm_vma_walk.last, which the hole path sets to an aligned address; the "
                              "unaligned huge jobs end at hmm_range_register (mode x -EINVAL)"})
        out.append({"cells": "* x -EPERM (handlers)",
                    "reason": "[5.2] the handlers have no VM_WRITE check (-EPERM comes only from hmm_range_fault's "
                              "VM_READ check of the VMA)"})
    else:
        out.append({"cells": "snapshot x -EFAULT|-EPERM",
                    "reason": "[6.x] with no request hmm_range_fault faults nothing: -EFAULT and -EPERM come only "
                              "from a required fault (hmm_vma_fault, hmm_vma_walk_test, the PTE/PMD handlers)"})
        out.append({"cells": "shmem|devdax|mixedmap x pte|pmd|pud x present|devmap x -EBUSY|-EFAULT",
                    "reason": "[model limit, not the kernel's] shmem, device-dax and mixedmap mappings are shared "
                              "and writable without write-notify (no page_mkwrite, no writeback: vm_page_prot is "
                              "writable), so a present entry is writable from its first fault and the walk never "
                              "needs to fault it in a writable VMA (in a read-only one hmm_vma_fault refuses the "
                              "write: -EPERM); mprotect back to writable and fork keep it writable.  The kernel "
                              "write-protects such entries only through clear_refs soft-dirty (clear_soft_dirty, "
                              "then VM_SOFTDIRTY write-notify), which the model applies to anonymous VMAs only "
                              "(sim/kevents.py clear_refs_write: a simplification)"})
        out.append({"cells": "file x -EAGAIN",
                    "reason": "[6.x] hmm_vma_fault calls handle_mm_fault without FAULT_FLAG_ALLOW_RETRY: no "
                              "VM_FAULT_RETRY"})
    return out


# --- coverage-guided generation --------------------------------------------------------------------------
#: how much a target cell scales the draws that lead to it (``generate(targets=)``)
BOOST = 8.0
#: and the draws that lead away from it (e.g. ``probe:none`` when a walk must meet an event's entry)
DAMP = 0.15


@functools.lru_cache(maxsize=16)
def _reachable_cells(kernel: str, driver: str) -> tuple[tuple[str, ...], ...]:
    r = reachable(kernel, driver)
    return tuple((grid, *c) for grid in ("walk", "mode_ret", "event_fn") for c in r[grid])


def cell_targets(cov: "Coverage") -> list[tuple[str, ...]]:
    """The reachable cells ``cov`` has not covered, as ``(grid, *cell)`` tuples in a fixed order (the
    campaign's coverage targets, :func:`hmmirror.sim.scenario.generate`)."""
    got = {"walk": cov.walk, "mode_ret": cov.mode_ret, "event_fn": cov.event_fn}
    return [t for t in _reachable_cells(cov.kernel, cov.driver) if tuple(t[1:]) not in got[t[0]]]


def target_weights(target: tuple[str, ...], kernel: str) -> dict[str, float]:
    """Generator weights (``table:name`` / ``choice:option`` -> factor) that make the ingredients of one
    coverage cell likelier: the VMA kind and its variant, the walk function's leaf size, what leaves the entry
    kind (the page event that makes a swap, migration, NUMA-hinting or hwpoison entry; the device-memory job
    that makes a device-private one; the set-up that leaves a hole, a zero page, a written page) with a device
    coming back to those pages, and what makes the return path (a request that needs a fault, none, a write
    into a read-only VMA, a fault that fails: an OOM-reaped mm, a dying device; an unaligned huge range).
    The cell itself is not a parameter of anything: the scenario is drawn as any other, with other odds."""
    w: dict[str, float] = {}

    def up(*feats: str, f: float = BOOST) -> None:
        for x in feats:
            w[x] = w.get(x, 1.0) * f

    def down(*feats: str) -> None:
        for x in feats:
            w[x] = w.get(x, 1.0) * DAMP

    five = kernel == "5.2"
    grid = target[0]

    def fn_ingredients(vk: str | None, fn: str, f: float = BOOST) -> None:
        if fn == "pud":
            up("mapping:devdax", "target:devdax", "devdax_align:1G", "populate_dax:touch", f=f)
        elif fn == "hugetlb":
            up("mapping:hugetlb", "target:hugetlb", "populate_huge:touch", f=f)
        elif fn == "pmd" and vk in (None, "anon"):
            up("mapping:anon_thp", f=f / 2)
        elif fn == "hole":                            # no page table in the 2 MiB around: one mapping, untouched
            up("populate:no", "maps:1", f=f / 2)
        elif fn == "test":                            # [6.x] 1 / -EFAULT: a VMA without VM_READ (or PFN-mapped)
            up("prot:none", "shape_prot:none", "shape_mprotect:yes", f=f / 2)

    if grid == "walk":
        vk, fn, entry, ret = target[1:]
        down("event:exit")                              # the walk needs the mm it walks
        cow = entry in ("swap", "migration", "device_private") or (vk == "fsdax" and entry == "present")
        if vk == "anon":
            up("mapping:anon_thp" if fn == "pmd" or entry == "huge_zero" else "mapping:anon", "target:anon")
        elif vk == "file":
            up("mapping:file", "target:file")
            if cow:
                up("file_share:private")
            if fn == "pmd" or (fn == "pte" and entry == "present" and not five):
                up("file_size:2M", "file_fs:xfs")
            if ret == "-EAGAIN":
                up("file_cache:cold")
        elif vk == "fsdax":
            up("mapping:fsdax", "target:fsdax")
            if cow:
                up("fsdax_share:private")
            if fn == "pmd":
                up("fsdax_size:large", "fsdax_congruent:yes")
            if entry in ("huge_zero", "zero", "none"):
                up("fsdax_content:sparse", "fsdax_content:zero", f=BOOST / 2)
        elif vk == "devdax":
            up("mapping:devdax", "target:devdax",
               {"pud": "devdax_align:1G", "pmd": "devdax_align:2M"}.get(fn, "devdax_align:4K"))
            if fn == "pte" and entry == "present":      # [5.2] the COW copy of a read-only shared PTE
                up("prot:r", "job:write")
        elif vk == "hugetlb":
            up("mapping:hugetlb", "target:hugetlb")
        elif vk in ("pfnmap", "mixedmap"):
            up("mapping:pfnmap", "target:pfnmap", f"pfn_kind:{vk}")
        elif vk == "shmem":
            up("mapping:shmem", "target:shmem")
        elif vk == "novma":
            up("range:past", "range:below")
            if ret in ("0", "-EPERM", "-EBUSY"):          # the gap's pages request nothing, the VMA's do
                up("mode:fault_perpage", "probe:fault_perpage")
        fn_ingredients(vk, fn if fn != "test" or ret != "0" else "-")
        if entry == "none":
            up("populate:no", f=BOOST / 2)
        elif entry in ("present", "devmap", "table"):
            up("populate:write", "populate:read", "populate_dax:touch", "populate_mixed:touch",
               "populate_huge:touch", f=BOOST / 2)
        elif entry in ("zero", "huge_zero"):
            up("populate:read", "touch:read")
            if entry == "huge_zero":
                up("thp:always")
        elif entry in ("swap", "migration", "protnone", "hwpoison"):
            up({"swap": "event:reclaim", "migration": "event:migrate", "protnone": "event:numa",
                "hwpoison": "event:memory_failure"}[entry], "ev_target:fit", "ev_page:used")
            if entry == "migration":
                up("event:compact", "hold:long")
                if vk == "shmem":                       # [6.x] migrate_vma_setup's entries in a shmem VMA, walked
                    up("mode:migrate_dev", "dev_target:any", "devices:2", "job_start:now")   # meanwhile
            down("probe:none", "events:0")
            if fn == "pmd":
                up("thp:always")
        elif entry == "device_private":
            up("mode:migrate_dev", "mode:exclusive", "dev_target:fit", "dev_page:used", "devices:2")
        if ret == "0":
            up("mode:snapshot", "probe:snapshot", f=BOOST / 2)
            if entry in ("hwpoison", "migration", "swap", "protnone", "none"):   # reported only without a request
                up("mode:snapshot", "probe:snapshot", "job:read", f=2.0)
                down("probe:fault")
        elif ret == "-EBUSY":
            up("mode:fault", "probe:fault", "mode:fault_perpage", "probe:fault_perpage", f=BOOST / 2)
            if entry in ("present", "devmap", "zero", "huge_zero"):   # a mapped page needs a fault for a write
                up("job:write", f=BOOST / 2)
        elif ret == "-EFAULT":
            # a fault that fails: in an OOM-reaped mm (the reap comes first, the device later), on a dying device
            up("event:oom_reap", "mode:fault", "probe:fault", "job_start:later")
            down("probe:none", "event:exit")
            # the reaper leaves a VMA whose UNMAP range a subscriber refused (a device job holding its lock):
            # entries survive in an MMF_UNSTABLE mm, and a later fault of the range fails
            up("devices:2", "jobs:2", "jobs:3", f=BOOST / 4)
            if vk == "hugetlb":                         # no free huge page for a COW fault: VM_FAULT_OOM
                up("cpu:fork", "hugetlb_share:private", "job:write", "populate_huge:touch")
            if vk in ("file", "fsdax"):                 # finish_fault checks MMF_UNSTABLE in private mappings
                up(f"{vk}_share:private")
            if vk == "devdax":
                up("event:pmem_unbind")
            if vk == "fsdax" and five:
                up("event:pmem_remove")
            if vk in ("fsdax", "file"):
                up("range:past", f=BOOST / 2)
            down("events:0")
        elif ret == "-EPERM":
            up("job:write", "mode:fault", "probe:fault", "mprotect:r", "shape_mprotect:yes", "shape_prot:r")
            written = cow or (vk == "anon" and entry in ("present", "protnone", "hwpoison"))
            if not written:
                up("prot:r")                            # no page the process must have written first
            else:                                       # written first, then made read-only
                up("populate:write", "ev_page:used", "shape_block:yes")
        elif ret == "-EAGAIN":
            up("mode:fault", "mode:fault_nonblock")
        elif ret == "-EINVAL":
            up("huge_range:unaligned")
    elif grid == "mode_ret":
        mode, ret = target[1:]
        up(f"mode:{mode}")
        if mode.endswith("_huge"):                      # [5.2] huge page_shift jobs: hugetlb ranges
            up("mapping:hugetlb", "target:hugetlb", "populate_huge:touch")
        if ret in ("-EBUSY", "-EAGAIN"):                # [5.2] the range invalidated while (or before) it walked
            up("event:clear_refs", "clear_refs:storm", "cpu:munmap", "cpu:mprotect", "cpu:madvise")
        if ret == "-EFAULT":
            up("event:oom_reap", "range:past", "range:below")
        elif ret == "-EPERM":
            up("prot:r", "prot:none", "job:write")
        elif ret == "-EAGAIN":
            # [5.2] the range was invalidated after hmm_range_wait_until_valid: clear_refs, munmap, mprotect
            up("event:clear_refs", "clear_refs:storm", "event:notifier_churn", "cpu:munmap", "cpu:mprotect",
               "file_cache:cold")
        elif ret == "-EINVAL":
            up("huge_range:unaligned")
        elif ret == "-EBUSY":
            up("events:3", "events:4", "event:clear_refs")
    elif grid == "event_fn":
        ev, fn = target[1:]
        if ev != "-":
            up(f"event:{ev}")
            down("events:0")
            # the mapping the event acts on must be there too (Entry.needs)
            if ev == "evict":                             # device memory must exist first
                up("mode:migrate_dev", "dev_target:fit", "dev_page:used")
            need = {"reclaim": "mapping:anon", "migrate": "mapping:anon", "compact": "mapping:anon",
                    "numa": "mapping:anon", "khugepaged": "mapping:anon_thp", "thp_split": "mapping:anon_thp",
                    "pmem_unbind": "mapping:devdax", "pmem_remove": "mapping:fsdax"}.get(ev)
            if need:                                     # two or three mappings: the event's and the walk's
                up(need, "maps:2", "maps:3")
                up("prot:rw", "ev_target:fit", f=BOOST / 4)
        fn_ingredients(None, fn if fn != "test" else "-")
        up("probe_at:other")
        down("probe:none")
    return w


def coverage_png(summary_cells: dict[str, Any], kernel: str, path: str) -> None:
    """A heat map of the walk grid: rows VMA kind x function, columns entry kind x return; 2 = covered,
    1 = reachable not covered, 0 = unreachable."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    reach = set(map(tuple, reachable(kernel)["walk"]))
    got = {tuple(c) for c in summary_cells.get("walk", ())}
    rows = sorted({(c[0], c[1]) for c in reach | got})
    cols = sorted({(c[2], c[3]) for c in reach | got}, key=lambda x: (ENTRIES.index(x[0]) if x[0] in ENTRIES else 99,
                                                                      RETS.index(x[1]) if x[1] in RETS else 99))
    a = np.zeros((len(rows), len(cols)))
    for i, (vk, fn) in enumerate(rows):
        for j, (en, r) in enumerate(cols):
            c = (vk, fn, en, r)
            a[i, j] = 2 if c in got else (1 if c in reach else 0)
    fig, ax = plt.subplots(figsize=(max(8, len(cols) * 0.28), max(4, len(rows) * 0.28)))
    from matplotlib.colors import ListedColormap
    ax.imshow(a, cmap=ListedColormap(["#eeeeee", "#e8a33d", "#2f8f46"]), vmin=0, vmax=2, aspect="auto")
    ax.set_yticks(range(len(rows)), [f"{v} {f}" for v, f in rows], fontsize=6)
    ax.set_xticks(range(len(cols)), [f"{e} {r}" for e, r in cols], rotation=90, fontsize=6)
    cov = int((a == 2).sum())
    tot = int((a >= 1).sum())
    ax.set_title(f"hmmirror fuzz --kernel {kernel}: walk cells covered {cov}/{tot} "
                 f"(green covered, orange reachable, grey unreachable)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130, format="png")   # the path as given (no ".png" added)
    plt.close(fig)
