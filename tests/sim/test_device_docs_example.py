"""The worked example of a user's own drm_gpusvm-shaped driver in docs/simulator.md ("Worked example: a
drm_gpusvm-shaped driver") runs as written: the code block is taken from the document, imported as a module,
and run on a scripted partial munmap and a short seeded campaign with every invariant.

Expected behaviour from drm_gpusvm.c (6.18) and device-memory.md I2/I10: after the callback of an UNMAP the
device reaches nothing of the range (PTE, TLB, DMA); the garbage collector (a work item) removes the chunk and
its notifier; and the same driver with its TLB flush deleted is caught by ``device_reach``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

from hmmirror import Machine
from hmmirror.kernel import sched
from hmmirror.mm.mmap import vm_munmap
from hmmirror.sim.runner import device_fault, run_tasks
from hmmirror.sim.schedulers import SwitchListScheduler

DOC = Path(__file__).resolve().parents[2] / "docs" / "simulator.md"
PAGE = 4096


def example_source() -> str:
    text = DOC.read_text()
    m = re.search(r"```python\n(# mypkg/mysvm\.py.*?)```", text, re.S)
    assert m, "the worked example's code block (# mypkg/mysvm.py) is missing from docs/simulator.md"
    return m.group(1)


def load(source: str, where: Path, name: str = "mysvm_doc_example") -> types.ModuleType:
    """Import ``source`` as module ``name`` from a file (findings name their location from real files)."""
    path = where / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mysvm(tmp_path_factory):
    return load(example_source(), tmp_path_factory.mktemp("doc"))


def munmap_run(drv):
    """The device faults 8 pages in; then the CPU unmaps page 2 (one run, every invariant on)."""
    m = Machine("6.18", ram=64 << 20)
    p = m.spawn("p")
    a = p.mmap(8 * PAGE)
    p.touch(a, 8 * PAGE, write=True)
    seen = {}

    def dev(run):
        ret = yield from device_fault(run, a, a + 8 * PAGE, True)
        seen.update(ret=ret, pt=len(drv.pt), notifiers=len(drv.notifiers), dma=len(drv.pt.dma))

    def cpu(run):
        yield from sched.wait_event(lambda: bool(seen), "test: after the device fault")
        return (yield from vm_munmap(p.mm, a + 2 * PAGE, PAGE))

    f, eng = run_tasks(m, drv, p.mm, [("dev0", "device", dev), ("cpu0", "cpu", cpu)], SwitchListScheduler([]))
    assert seen == {"ret": 0, "pt": 8, "notifiers": 1, "dma": 8}
    return f, eng


def test_example_unmap_is_collected_on_the_work_item(mysvm):
    drv = mysvm.MySvm()
    f, eng = munmap_run(drv)
    assert f is None, f.describe()
    assert any(t.name == "kworker/mysvm.gc" for t in eng.tasks)
    assert drv.chunks == {} and drv.notifiers == [] and drv.pt.empty()


def test_example_without_the_tlb_flush_is_caught(tmp_path):
    src = example_source()
    line = "        self.pt.tlb_flush(inv.start, inv.end)\n"
    assert src.count(line) == 1
    bad = load(src.replace(line, ""), tmp_path, "mysvm_doc_example_noflush")
    f, _eng = munmap_run(bad.MySvm())
    assert f is not None and f.invariant == "device_reach" and "TLB" in f.message, f and f.describe()
    assert f.location.endswith("MySvm.invalidate")


def test_example_short_seeded_campaign_is_clean(mysvm):
    from hmmirror.sim.choices import SeededChoices
    from hmmirror.sim.runner import run_scenario
    from hmmirror.sim.scenario import generate
    from hmmirror.sim.schedulers import RandomScheduler

    for seed in range(12):
        c = SeededChoices(seed)
        sc = generate(c, "6.18", "mysvm_doc_example:MySvm")
        res = run_scenario(sc, RandomScheduler(c), driver=mysvm.MySvm())
        assert res.findings == [], (seed, [f.describe() for f in res.findings])
