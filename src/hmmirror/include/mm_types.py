"""Flag enums of include/linux/mm.h, mm_types.h, mmu_notifier.h and the mmap/madvise UAPI."""

from __future__ import annotations

from enum import IntEnum, IntFlag


class Flags:
    """A namespace of bit constants as plain ints.

    ``VM``, ``FAULT_FLAG`` and ``VM_FAULT`` are tested on every fault; ``enum.IntFlag`` arithmetic costs
    about a microsecond per operation, so these are plain ints with a :meth:`names` helper for display.
    """

    @classmethod
    def members(cls) -> list[tuple[str, int]]:
        return [(k, v) for k, v in vars(cls).items() if k.isupper() and isinstance(v, int) and v]

    @classmethod
    def names(cls, value: int) -> str:
        """``VM.names(0x3)`` -> ``"READ|WRITE"``."""
        out = [k for k, v in cls.members() if value & v == v]
        return "|".join(out) if out else "0"


class VM(Flags):
    """vm_flags (include/linux/mm.h)."""

    NONE = 0
    READ = 0x1
    WRITE = 0x2
    EXEC = 0x4
    SHARED = 0x8
    MAYREAD = 0x10
    MAYWRITE = 0x20
    MAYEXEC = 0x40
    MAYSHARE = 0x80
    PFNMAP = 0x400
    LOCKED = 0x2000
    IO = 0x4000
    DONTCOPY = 0x20000
    DONTEXPAND = 0x40000
    HUGETLB = 0x400000
    SYNC = 0x800000
    WIPEONFORK = 0x2000000
    DONTDUMP = 0x4000000
    SOFTDIRTY = 0x8000000
    MIXEDMAP = 0x10000000
    HUGEPAGE = 0x20000000
    NOHUGEPAGE = 0x40000000


VM_READ, VM_WRITE, VM_EXEC, VM_SHARED = VM.READ, VM.WRITE, VM.EXEC, VM.SHARED
VM_MAYREAD, VM_MAYWRITE, VM_MAYEXEC, VM_MAYSHARE = VM.MAYREAD, VM.MAYWRITE, VM.MAYEXEC, VM.MAYSHARE
VM_PFNMAP, VM_IO, VM_MIXEDMAP, VM_HUGETLB = VM.PFNMAP, VM.IO, VM.MIXEDMAP, VM.HUGETLB
VM_HUGEPAGE, VM_NOHUGEPAGE, VM_DONTCOPY, VM_WIPEONFORK = VM.HUGEPAGE, VM.NOHUGEPAGE, VM.DONTCOPY, VM.WIPEONFORK
VM_LOCKED, VM_DONTEXPAND, VM_DONTDUMP = VM.LOCKED, VM.DONTEXPAND, VM.DONTDUMP

#: smaps "VmFlags" mnemonics (fs/proc/task_mmu.c)
VM_MNEMONICS = {
    VM.READ: "rd", VM.WRITE: "wr", VM.EXEC: "ex", VM.SHARED: "sh", VM.MAYREAD: "mr", VM.MAYWRITE: "mw",
    VM.MAYEXEC: "me", VM.MAYSHARE: "ms", VM.PFNMAP: "pf", VM.LOCKED: "lo", VM.IO: "io", VM.DONTCOPY: "dc",
    VM.DONTEXPAND: "de", VM.HUGETLB: "ht", VM.SYNC: "sf", VM.WIPEONFORK: "wf", VM.DONTDUMP: "dd",
    VM.SOFTDIRTY: "sd", VM.MIXEDMAP: "mm", VM.HUGEPAGE: "hg", VM.NOHUGEPAGE: "nh",
}


class FAULT_FLAG(Flags):
    """enum fault_flag."""

    NONE = 0
    WRITE = 1 << 0
    MKWRITE = 1 << 1
    ALLOW_RETRY = 1 << 2
    RETRY_NOWAIT = 1 << 3
    KILLABLE = 1 << 4
    TRIED = 1 << 5
    USER = 1 << 6
    REMOTE = 1 << 7


class VM_FAULT(Flags):
    """vm_fault_t bits."""

    NONE = 0
    OOM = 0x000001
    SIGBUS = 0x000002
    MAJOR = 0x000004
    HWPOISON = 0x000010
    HWPOISON_LARGE = 0x000020
    SIGSEGV = 0x000040
    NOPAGE = 0x000100
    LOCKED = 0x000200
    RETRY = 0x000400
    FALLBACK = 0x000800
    DONE_COW = 0x001000
    NEEDDSYNC = 0x002000
    WRITE = 0x010000     # model-visible marker of a write fault that changed an entry


VM_FAULT_ERROR = VM_FAULT.OOM | VM_FAULT.SIGBUS | VM_FAULT.SIGSEGV | VM_FAULT.HWPOISON | VM_FAULT.HWPOISON_LARGE \
    | VM_FAULT.FALLBACK


class MMU_NOTIFY(IntEnum):
    """enum mmu_notifier_event ([5.2] has UNMAP..SOFT_DIRTY only)."""

    UNMAP = 0
    CLEAR = 1
    PROTECTION_VMA = 2
    PROTECTION_PAGE = 3
    SOFT_DIRTY = 4
    RELEASE = 5
    MIGRATE = 6
    EXCLUSIVE = 7


MMU_NOTIFIER_RANGE_BLOCKABLE = 1 << 0


class PROT(IntFlag):
    """PROT_* of mmap(2)."""

    NONE = 0
    READ = 1
    WRITE = 2
    EXEC = 4


class MAP(IntFlag):
    """MAP_* of mmap(2) (x86 values)."""

    SHARED = 0x01
    PRIVATE = 0x02
    FIXED = 0x10
    ANONYMOUS = 0x20
    POPULATE = 0x8000
    HUGETLB = 0x40000
    HUGE_1GB = 30 << 26
    HUGE_2MB = 21 << 26


class MADV(IntEnum):
    """madvise(2) advice values."""

    NORMAL = 0
    DONTNEED = 4
    FREE = 8
    REMOVE = 9
    DONTFORK = 10
    DOFORK = 11
    HUGEPAGE = 14
    NOHUGEPAGE = 15
    WIPEONFORK = 18
    KEEPONFORK = 19
    COLD = 20
    PAGEOUT = 21
    POPULATE_READ = 22
    POPULATE_WRITE = 23
    COLLAPSE = 25
