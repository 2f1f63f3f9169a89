"""The GUP test module (mm/gup_test.c, ``/sys/kernel/debug/gup_test``, CONFIG_GUP_TEST): an ioctl that runs
get_user_pages / pin_user_pages over a user range and releases the pages again.

Only what hmm-tests.c's ``hmm_gup_test`` uses is modelled: the commands GUP_FAST_BENCHMARK,
PIN_FAST_BENCHMARK, PIN_LONGTERM_BENCHMARK and GUP_BASIC_TEST on ``struct gup_test {addr, size,
nr_pages_per_call, gup_flags}``.  The fast variants fall back to the slow path for any page that is not
present and accessible (lockless ``gup_fast`` never faults), so in the model every command is
``__get_user_pages`` with FOLL_GET (GUP_*) or FOLL_PIN (PIN_*; PIN_LONGTERM_BENCHMARK adds FOLL_LONGTERM),
followed by put_page / unpin_user_page of every page obtained.  The timing fields of the benchmarks are not
modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hmmirror.arch.x86.pgtable import PAGE_SIZE
from hmmirror.kernel import sched
from hmmirror.kernel.sched import Gen
from hmmirror.mm.gup import FOLL_GET, FOLL_LONGTERM, FOLL_PIN, __get_user_pages, put_user_page, unpin_user_page

if TYPE_CHECKING:
    from hmmirror.mm.mm_struct import MMStruct

EINVAL, EFAULT = 22, 14

GUP_FAST_BENCHMARK = "GUP_FAST_BENCHMARK"
PIN_FAST_BENCHMARK = "PIN_FAST_BENCHMARK"
PIN_LONGTERM_BENCHMARK = "PIN_LONGTERM_BENCHMARK"
GUP_BASIC_TEST = "GUP_BASIC_TEST"
PIN_BASIC_TEST = "PIN_BASIC_TEST"
COMMANDS = (GUP_FAST_BENCHMARK, PIN_FAST_BENCHMARK, PIN_LONGTERM_BENCHMARK, GUP_BASIC_TEST, PIN_BASIC_TEST)


@dataclass
class GupTest:
    """``struct gup_test`` (the fields the model uses)."""

    addr: int
    size: int
    nr_pages_per_call: int = 1
    gup_flags: int = 0


def gup_test_ioctl(mm: "MMStruct", cmd: str, gup: GupTest) -> Gen[int]:
    """__gup_test_ioctl() (mm/gup_test.c): take and release the pages of ``[addr, addr + size)`` of ``mm`` in
    calls of ``nr_pages_per_call`` pages.  Returns 0, -EINVAL for an unknown command or an empty range, or
    -EFAULT when a call obtains no page (the C module stops there; hmm-tests asserts 0)."""
    if cmd not in COMMANDS or gup.size <= 0 or gup.nr_pages_per_call <= 0:
        return -EINVAL
    pin = cmd.startswith("PIN")
    flags = gup.gup_flags | (FOLL_PIN if pin else FOLL_GET)
    if cmd == PIN_LONGTERM_BENCHMARK:
        flags |= FOLL_LONGTERM
    nr_pages = gup.size // PAGE_SIZE
    addr = gup.addr
    done = 0
    machine = mm.machine
    while done < nr_pages:
        n = min(gup.nr_pages_per_call, nr_pages - done)
        yield from sched.down_read(mm.mmap_sem)
        got = yield from __get_user_pages(mm, addr, n, flags)
        sched.up_read(mm.mmap_sem)
        if isinstance(got, int) or not got:
            return -EFAULT
        for pfn in got:                                 # put_back_pages()
            if pin:
                unpin_user_page(mm, pfn)
            else:
                put_user_page(mm, pfn)
        done += len(got)
        addr += len(got) * PAGE_SIZE
    machine.log("gup_test", mm=mm.name, cmd=cmd, addr=gup.addr, npages=done, gup_flags=flags)
    return 0
