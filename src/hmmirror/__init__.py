"""hmmirror: an executable model of Linux HMM address-space mirroring.

Start with :class:`hmmirror.machine.Machine` and ``Machine.spawn()``; see README.md.
"""

import os

# numpy's OpenBLAS starts one thread per CPU for a matrix product (sim/fuzz.py's steering fit): on a shared
# machine its threads spin waiting for each other -- measured 5.9 of 27 CPU-seconds of a 5.2 campaign, 0.9
# with one thread -- and a threaded product's summation order varies from call to call (one campaign in
# three differed in a hit count).  One thread, unless the user chose; set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from hmmirror.errors import HmmirrorError, InputError, KernelError, ModelBug
from hmmirror.machine import Machine
from hmmirror.mirror import HmmRangeError, Mirror, MirrorResult

__all__ = ["Machine", "HmmirrorError", "HmmRangeError", "InputError", "KernelError", "Mirror", "MirrorResult",
           "ModelBug"]
__version__ = "0.1.0"
