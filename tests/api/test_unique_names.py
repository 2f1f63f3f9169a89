"""Public class names are unique across the package (a user importing one never gets its namesake).

The only repeats allowed are kernel structs that exist once per kernel profile module, under the kernel's
own name (design.md: a model of a kernel object carries its name): ``struct hmm_range`` and
``struct hmm_vma_walk`` (mm/hmm/v5_2.py and mm/hmm/modern.py), ``struct mm_walk`` (mm/pagewalk.py and
mm/pagewalk_v5_2.py).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import hmmirror

KERNEL_STRUCTS_PER_PROFILE = {"HmmRange", "HmmVmaWalk", "MmWalk"}


def test_public_class_names_are_unique() -> None:
    root = Path(hmmirror.__file__).parent
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:                          # module-level classes: what a user can import
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(str(path.relative_to(root)))
    dups = {n: p for n, p in where.items() if len(p) > 1 and n not in KERNEL_STRUCTS_PER_PROFILE}
    assert dups == {}
    for name in KERNEL_STRUCTS_PER_PROFILE:             # the allowed repeats are still what they claim
        assert len(where[name]) == 2, (name, where[name])
