"""The package's shape, as issue 10 set it: one traversal layer, small modules."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fnllm"
_PYTREE_IMPORT = re.compile(
    r"^\s*(import optree|from optree\b|import torch\.utils\._pytree|from torch\.utils\._pytree\b"
    r"|from torch\.utils import _pytree)",
    re.M,
)


def test_only_tree_imports_a_pytree_library() -> None:
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.name != "tree.py" and _PYTREE_IMPORT.search(p.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"optree/_pytree imported outside fnllm/tree.py: {offenders}"


def test_no_module_passes_500_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500
    }
    assert not long, f"modules over 500 lines (split by concern): {long}"
