"""The gallery's scripts run as scripts: ``python docs/examples/<name>.py`` in an empty folder
writes the PNG files it names, each a valid, non-empty image (``torchrun`` for the scripts whose
docstring says ``docs-run: torchrun N``)."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))
_NEEDS = {"jax_optax_loop": ("jax", "optax")}


def _saved_pngs(text: str) -> list[str]:
    """The PNG names a script saves: literal ``savefig("name.png")`` calls (f-strings with
    ``{world}`` are expanded for the process count the test runs)."""
    return re.findall(r'savefig\(\s*f?"([^"]+\.png)"', text)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_script_runs_and_writes_its_figures(script: Path, tmp_path: Path) -> None:
    for mod in _NEEDS.get(script.stem, ()):
        pytest.importorskip(mod)
    text = script.read_text(encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    nproc = re.search(r"docs-run:\s*torchrun\s+(\d+)", text)
    cmd = [sys.executable, str(script)]
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc.group(1)}",
            str(script),
        ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), f"{script.name} printed nothing"
    names = [n.replace("{world}", nproc.group(1) if nproc else "1") for n in _saved_pngs(text)]
    assert names, f"{script.name} saves no figure"
    for name in names:
        png = tmp_path / name
        assert png.is_file(), f"{script.name} did not write {name}"
        raw = png.read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", raw[16:24])
        assert width > 200 and height > 100, (name, width, height)


def test_example_scripts_hold_no_html() -> None:
    """The code a reader copies draws PNG files; embedding them is the site's business."""
    for script in EXAMPLES:
        text = script.read_text(encoding="utf-8")
        assert "to_html" not in text and "<img" not in text and "<p>" not in text, script.name
