"""hmmirror: an executable model of Linux HMM address-space mirroring.

Start with :class:`hmmirror.machine.Machine` and ``Machine.spawn()``; see README.md.
"""

from hmmirror.errors import HmmirrorError, InputError, KernelError, ModelBug
from hmmirror.machine import Machine
from hmmirror.mirror import HmmRangeError, Mirror, MirrorResult

__all__ = ["Machine", "HmmirrorError", "HmmRangeError", "InputError", "KernelError", "Mirror", "MirrorResult",
           "ModelBug"]
__version__ = "0.1.0"
