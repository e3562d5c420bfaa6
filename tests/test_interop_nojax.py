"""fnllm and fnllm.interop import without JAX; using interop then names the extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fnllm_imports_without_jax_and_interop_names_the_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["jax"] = None  # any `import jax` now raises ImportError
        import torch
        import fnllm
        from fnllm import interop
        assert "jax" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
        try:
            interop.to_jax({"w": torch.zeros(2)})
        except ImportError as err:
            print(err)
        else:
            raise SystemExit("no ImportError")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'fnllm[jax]'" in proc.stdout
