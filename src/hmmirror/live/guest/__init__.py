"""A real HMM kernel as the oracle: a minimal Linux 6.12 guest with ``CONFIG_TEST_HMM`` under QEMU.

The host kernel has no ``test_hmm`` and no pmem, so :mod:`hmmirror.live` can check only the substrate.  This
package builds a small kernel that has both (Debian's ``linux-source-6.12``, a config fragment shipped here),
boots it under QEMU (KVM where usable, else TCG) and runs, inside it, the kernel's own ``hmm-tests`` and a
scenario player (``player.c``, a static C program compiled at build time):

- :mod:`.build`: prerequisites, the kernel build and the static helpers, all cached in the user's cache
  directory (``$XDG_CACHE_HOME/hmmirror/guest`` or ``~/.cache/hmmirror/guest``) under a key made of the
  source version, the fragment and the helpers' sources;
- :mod:`.initramfs`: the guest's initramfs (busybox, mkfs.ext4, the helpers, one job per boot);
- :mod:`.vm`: one boot = one job; results come back on a raw virtio disk, progress on the serial console;
  QEMU is always killed and temporary files removed;
- :mod:`.protocol`: scenario -> player script, player output -> per-op records and per-page states;
- :mod:`.selftest`: ``hmm-tests`` in the guest, one result per test;
- :mod:`.crosscheck`: the same scenarios in the guest and in the model, compared with
  :mod:`hmmirror.live.crosscheck`'s report.

Like the rest of :mod:`hmmirror.live`, nothing in the model imports this package.
"""

from __future__ import annotations

#: The model profile the guest is compared with: the guest runs 6.12.
GUEST_PROFILE = "6.12"
#: Used instead while the model has no 6.12 profile yet (reports name the profile they used).
FALLBACK_PROFILE = "6.18"


def model_profile() -> str:
    """The profile name the guest's results are compared with (:data:`GUEST_PROFILE` once it exists)."""
    from hmmirror.profiles import PROFILES

    return GUEST_PROFILE if GUEST_PROFILE in PROFILES else FALLBACK_PROFILE
