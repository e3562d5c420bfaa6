"""Release plumbing that needs no build: one version everywhere, the typing marker, the changelog.

tests/test_wheel.py checks the same things on the installed wheel."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fnllm
from fnllm.cli import main

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_cli_version_is_the_package_version() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert out.getvalue().strip() == f"fnllm {fnllm.__version__}"


def test_the_build_reads_the_version_from_the_package() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "fnllm.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", fnllm.__version__)


def test_py_typed_ships_with_the_package() -> None:
    assert (ROOT / "fnllm" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["fnllm"]
    assert "Typing :: Typed" in PYPROJECT["project"]["classifiers"]


def test_changelog_has_a_section_for_this_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert sections[0] == "Unreleased" and fnllm.__version__ in sections, sections


def test_every_extra_is_documented_on_the_install_page() -> None:
    page = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(\w+)` \|", page, flags=re.M))
    assert set(PYPROJECT["project"]["optional-dependencies"]) <= documented, documented


def test_every_public_module_is_an_attribute_of_the_package() -> None:
    # a fresh interpreter: `import fnllm` alone, then fnllm.<module> for each name in __all__;
    # the heavy ones are imported on first use, not by `import fnllm`
    code = (
        "import sys, fnllm\n"
        "late = [n for n in fnllm._ON_DEMAND if f'fnllm.{n}' in sys.modules]\n"
        "assert not late, late\n"
        "for n in fnllm.__all__:\n"
        "    assert getattr(fnllm, n) is not None, n\n"
        "assert fnllm.generate.sample and fnllm.plot.memory_plans\n"
        "assert set(fnllm._ON_DEMAND) <= set(dir(fnllm))\n"
        "try:\n"
        "    fnllm.no_such_module\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_module' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
