"""inspect() names device-private and device-exclusive swap-format entries as the real pagemap does.

Expected from the 6.12 test guest: after HMM_DMIRROR_EXCLUSIVE of anonymous pages, pagemap reads a
swap-format entry (bit 62) of type SWP_DEVICE_EXCLUSIVE_WRITE for each; after MIGRATE_TO_DEV, type
SWP_DEVICE_WRITE; neither is present.
"""

from __future__ import annotations

from hmmirror import Machine
from hmmirror.drivers.test_hmm import HmmDmirrorCmd, hmm_open


def test_exclusive_and_device_private_entries_have_their_kind() -> None:
    m = Machine("6.18", ram=256 << 20)
    p = m.spawn("p")
    buf = p.mmap(8 << 12, "rw", ["private", "anonymous"])
    p.write_bytes(buf, bytes(range(256)) * 128)
    fd = hmm_open(p, 0)
    assert fd.ioctl("EXCLUSIVE", HmmDmirrorCmd(buf, bytearray(4 << 12), 4)) == 0
    assert fd.ioctl("MIGRATE_TO_DEV", HmmDmirrorCmd(buf + (4 << 12), bytearray(4 << 12), 4)) == 0
    pages = p.inspect(buf, 8 << 12)
    assert [(s.kind, s.present, s.swapped) for s in pages] == \
        [("device_exclusive", False, True)] * 4 + [("device_private", False, True)] * 4
    fd.close()
