"""Tests for the docs site (``docs/``, ``mkdocs.yml``).

- the site builds with ``mkdocs build --strict`` and references nothing online;
- the docs build's griffe extension really reports undocumented public objects;
- every ``python`` code block of every page runs (blocks on one page share a namespace, in order):
  executed blocks (``python exec="on"``) run inside the strict build (markdown-exec), where a
  failing block or a promised figure that was not drawn fails the build; the others run here;
- every public function and class of the package has a docstring with an example;
- headless Chromium renders the home page, an API page, a guide and an example with figures,
  the figures' ``<img>`` load, and the copy button leaves out ``>>>`` prompts and outputs
  (skipped without ``chromium``).
"""

from __future__ import annotations

import functools
import http.server
import importlib
import importlib.util
import inspect
import logging
import os
import pkgutil
import re
import socketserver
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG = ROOT / "mkdocs.yml"
ARTIFACTS = ROOT / "artifacts"
_MKDOCS = (sys.executable, "-m", "mkdocs")
# The package root only re-exports; the command line is documented by ``fnllm --help``.
_NO_API_PAGE = {"fnllm", "fnllm.cli"}
CHROMIUM = os.environ.get("FNLLM_CHROMIUM", "/usr/bin/chromium")

PAGES = sorted(p for p in DOCS.rglob("*.md") if "_ext" not in p.relative_to(DOCS).parts)


# ----------------------------------------------------------------------------- (a) strict build


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the site once per test module with ``--strict`` into a temporary directory."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*_MKDOCS, "build", "--strict", "--config-file", str(CONFIG), "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    problems = [ln for ln in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", ln)]
    if proc.returncode != 0 or problems:
        pytest.fail(
            f"mkdocs build --strict failed (exit {proc.returncode}):\n"
            + "\n".join(problems or log.splitlines()[-40:])
        )
    return out


def test_site_builds_strict(site: Path) -> None:
    assert (site / "index.html").is_file()
    for page in PAGES:
        rel = page.relative_to(DOCS).with_suffix("")
        html = site / (rel.parent if rel.name == "index" else rel) / "index.html"
        assert html.is_file(), f"{page.relative_to(ROOT)} was not built to {html}"


def test_site_is_offline(site: Path) -> None:
    """No page loads a font, script, stylesheet or image from the network."""
    remote = re.compile(
        r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=["']?(?:https?:)?//""", re.I
    )
    offenders = []
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        offenders += [f"{html.relative_to(site)}: {m.group(0)}" for m in remote.finditer(text)]
        if "fonts.googleapis" in text or "fonts.gstatic" in text:
            offenders.append(f"{html.relative_to(site)}: Google Fonts")
    for css in site.rglob("*.css"):
        if re.search(r"@import\s+url\(\s*['\"]?https?:", css.read_text(encoding="utf-8")):
            offenders.append(f"{css.relative_to(site)}: remote @import")
    assert not offenders, "remote assets in the built site:\n" + "\n".join(offenders[:20])


def test_search_index_holds_prose_not_code(site: Path) -> None:
    """Code blocks and API source listings are left out of the search index (and previews)."""
    import json

    docs = json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))["docs"]
    text = "\n".join(d["text"] for d in docs)
    assert "pure functions on trees" in text  # prose of the training guide is indexed
    for code in ("jr.fold_in(key, 1)", "def next_token_loss", "&gt;&gt;&gt;", "import torch"):
        assert code not in text, f"code {code!r} is in the search index"


def test_site_has_theme_features(site: Path) -> None:
    """Repository link, previous/next footer, light/dark toggle, copy script on every page."""
    html = (site / "guides" / "training" / "index.html").read_text(encoding="utf-8")
    assert 'class="md-source"' in html  # the repository link in the header
    assert "md-footer__link--prev" in html and "md-footer__link--next" in html
    assert 'data-md-color-scheme="slate"' in html  # the dark palette, with its toggle
    assert "assets/copy.js" in html


def test_api_pages_render_every_public_name(site: Path) -> None:
    """Each public module's reference page holds an anchor for every name it exports."""
    missing = []
    for modname, names in _public_api().items():
        if modname in _NO_API_PAGE:
            continue
        found = _api_page_for(modname)
        if found is None:
            missing.append(f"{modname}: no page under docs/api/ with '::: {modname}'")
            continue
        page, shown = found
        html = (site / "api" / page.stem / "index.html").read_text(encoding="utf-8")
        for name, obj in names.items():
            homes = {modname, shown, getattr(obj, "__module__", "")}
            if not any(f'id="{home}.{name}"' in html for home in homes):
                missing.append(f"{modname}.{name}: not rendered on docs/api/{page.name}")
    assert not missing, "API reference incomplete:\n" + "\n".join(missing)


# ----------------------------------------------------------------------------- griffe extension


def _load_with_extension(tmp_path: Path, source: str) -> list[str]:
    griffe = pytest.importorskip("griffe")
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""Fake root."""\n')
    (pkg / "mod.py").write_text(textwrap.dedent(source))
    (pkg / "_impl.py").write_text("def reexported():\n    pass\n\ndef internal():\n    pass\n")
    spec = importlib.util.spec_from_file_location("_griffe_fnllm", DOCS / "_ext/griffe_fnllm.py")
    assert spec is not None and spec.loader is not None
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = _Collect()
    log = logging.getLogger("fnllm_docs")
    log.addHandler(handler)
    try:
        loaded = griffe.load(
            "fakepkg",
            search_paths=[str(tmp_path)],
            extensions=griffe.load_extensions(ext.FnllmDocstrings(root="fakepkg")),
        )
    finally:
        log.removeHandler(handler)
    records.append("DOC:" + (loaded["mod"].members["documented"].docstring.value))
    return records


def test_docs_build_reports_undocumented_public_objects(tmp_path: Path) -> None:
    records = _load_with_extension(
        tmp_path,
        '''
        """A module."""
        from fakepkg._impl import internal, reexported

        __all__ = ["documented", "bare", "Model", "reexported"]

        def documented():
            """Does things; see :func:`bare` and :func:`torch.func.grad`.

            Example:
                >>> 1
                1
            """

        def bare():
            pass

        def _private():
            pass

        def not_exported():
            pass

        class Model:
            """A model."""
            def apply(self):
                pass
            def _helper(self):
                pass
        ''',
    )
    warnings = [r for r in records if not r.startswith("DOC:")]
    assert any("fakepkg.mod.bare" in r for r in warnings), warnings
    assert any("fakepkg.mod.Model.apply" in r for r in warnings), warnings
    assert any("fakepkg._impl.reexported" in r for r in warnings), warnings  # via __all__
    for quiet in ("documented", "_private", "not_exported", "_helper", "internal"):
        assert not any(f".{quiet} has" in r for r in warnings), warnings
    doc = records[-1]
    assert "[`bare`][fakepkg.mod.bare]" in doc  # a role becomes an autorefs link
    assert "`torch.func.grad`" in doc and "[`torch.func.grad`]" not in doc
    assert "Examples:" in doc  # Google-style section griffe understands


# ----------------------------------------------------------------------------- (b) code blocks

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
_REQUIRES = re.compile(r"^<!--\s*docs-test:\s*requires\s+(?P<mods>[^>]*?)\s*-->", re.M)


def _code_blocks(text: str) -> Iterator[tuple[int, str]]:
    """Yield ``(first_line_number, source)`` for each fenced ``python`` block (1-based lines).

    Only blocks whose info string starts with ``python`` (or ``py``) run; ``pycon``, ``text``,
    ``bash`` etc. are shown, not executed. ``python {.no-run}`` opts a block out explicitly.
    """
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group("indent"), m.group("fence"), m.group("info").strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if (
                close
                and close.group("fence")[0] == fence[0]
                and len(close.group("fence")) >= len(fence)
                and not close.group("info").strip()
            ):
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        lang = info.split()[0].lower() if info else ""
        if lang in ("python", "py") and "no-run" not in info:
            yield i + 2, "\n".join(body) + "\n"
        i = j + 1


CODE_PAGES = [p for p in PAGES if any(_code_blocks(p.read_text(encoding="utf-8")))]


def test_guides_have_code_to_run() -> None:
    """The parametrised code-block test is not vacuous: the guides do hold python blocks."""
    names = {p.relative_to(DOCS).as_posix() for p in CODE_PAGES}
    assert {"index.md", "guides/getting-started.md", "guides/training.md"} <= names, names


def _executed_blocks(text: str) -> list[tuple[int, str]]:
    """The python blocks markdown-exec runs during the build (info string ``exec="on"``)."""
    lines = text.splitlines()
    return [
        (n, src)
        for n, src in _code_blocks(text)
        if re.search(r'\bexec="(on|1|true|yes)"', lines[n - 2])
    ]


def _requirements(text: str) -> list[str]:
    return [mod for m in _REQUIRES.finditer(text) for mod in m.group("mods").split()]


def _module_exists(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return False
    # A folder without __init__.py yet is a namespace package: not a module that exists.
    return spec is not None and spec.origin not in (None, "namespace")


@pytest.mark.parametrize("page", CODE_PAGES, ids=[str(p.relative_to(DOCS)) for p in CODE_PAGES])
def test_page_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a page's python blocks top to bottom in one namespace, in a scratch directory.

    A page may declare the modules it needs with ``<!-- docs-test: requires fnllm.x -->``:
    while one of them does not exist yet the page is skipped; once it exists the page runs.
    """
    text = page.read_text(encoding="utf-8")
    blocks = [(n, src) for n, src in _code_blocks(text) if (n, src) not in _executed_blocks(text)]
    if not blocks:
        pytest.skip("every block is executed by the strict build (markdown-exec)")
    missing = [m for m in _requirements(text) if not _module_exists(m)]
    if missing:
        pytest.skip(f"needs modules that do not exist yet: {missing}")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    rel = page.relative_to(ROOT)
    # The pages use tiny models: one intra-op thread is as fast, and on a loaded 2-core
    # machine two spinning OpenMP threads made a tiny train step 40x slower (2.4 s vs 60 ms).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for lineno, source in blocks:
            # Pad with newlines so tracebacks point at the line in the Markdown file.
            code = compile("\n" * (lineno - 1) + source, str(rel), "exec")
            try:
                exec(code, namespace)
            except Exception as err:
                raise AssertionError(
                    f"{rel}: the code block at line {lineno} raised {err!r}"
                ) from err
    finally:
        torch.set_num_threads(threads)


def test_code_block_parser_finds_blocks_and_line_numbers() -> None:
    text = textwrap.dedent(
        """\
        # Title
        ```python
        x = 1
        ```
        text
        ```pycon
        >>> skipped
        ```
        !!! note
            ```python
            y = x + 1
            ```
        ````markdown
        ```python
        not_run = True
        ```
        ````
        ```python {.no-run}
        also_not_run = True
        ```
        """
    )
    blocks = list(_code_blocks(text))
    assert blocks == [(3, "x = 1\n"), (11, "y = x + 1\n")]
    marked = "<!-- docs-test: requires fnllm.a b -->\nsee `<!-- docs-test: requires c -->`\n"
    assert _requirements(marked) == ["fnllm.a", "b"]


def test_pages_do_not_mix_executed_and_plain_blocks() -> None:
    """A page's blocks share one namespace: either the build runs them all or this suite does."""
    mixed = []
    for page in CODE_PAGES:
        text = page.read_text(encoding="utf-8")
        n_exec, n_all = len(_executed_blocks(text)), len(list(_code_blocks(text)))
        if 0 < n_exec < n_all:
            mixed.append(f"{page.relative_to(DOCS)}: {n_exec} of {n_all} blocks executed")
    assert not mixed, "\n".join(mixed)


def test_executed_pages_show_their_output(site: Path) -> None:
    """Every executed block left its source and, where it prints, its output in the page."""
    problems = []
    for page in CODE_PAGES:
        text = page.read_text(encoding="utf-8")
        executed = _executed_blocks(text)
        if not executed:
            continue
        rel = page.relative_to(DOCS).with_suffix("")
        html = (site / (rel.parent if rel.name == "index" else rel) / "index.html").read_text(
            encoding="utf-8"
        )
        promised = re.search(r"<!--\s*docs-figures:\s*(\d+)\s*-->", text)
        n_fig = html.count('class="fnllm-figure"')
        if promised and n_fig < int(promised.group(1)):
            problems.append(f"{rel}: {n_fig} figures, {promised.group(1)} promised")
        if "Traceback (most recent call last)" in html:
            problems.append(f"{rel}: a traceback is shown")
        printing = [src for n, src in executed if "print(" in src]
        n_out = html.count('class="language-text highlight"') + n_fig
        if printing and n_out == 0:
            problems.append(f"{rel}: {len(printing)} printing blocks but no output shown")
    assert not problems, "\n".join(problems)


_MINI_CONFIG = """\
site_name: mini
docs_dir: docs
theme: {name: mkdocs}
plugins: [markdown-exec]
hooks: [%s]
markdown_extensions: [pymdownx.superfences]
"""


def _mini_build(tmp_path: Path, page: str) -> tuple[int, str]:
    """Build a one-page site with the real hooks and markdown-exec, strictly."""
    (tmp_path / "docs").mkdir(parents=True)
    (tmp_path / "docs" / "index.md").write_text(textwrap.dedent(page), encoding="utf-8")
    (tmp_path / "mkdocs.yml").write_text(_MINI_CONFIG % (DOCS / "_ext" / "hooks.py"))
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*_MKDOCS, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


_FIGURE_PAGE = """\
    # Page
    <!-- docs-figures: 1 -->

    ```python exec="on" session="mini" source="above" html="1"
    from fnllm import plot
    open("written.txt", "w").write("scratch")  # lands in the page's scratch directory
    print(plot.to_html(plot.loss_curve([3.0, 2.0, 1.0])))
    ```
    """


def test_strict_build_runs_executed_blocks_and_checks_figures(tmp_path: Path) -> None:
    code, log = _mini_build(tmp_path / "ok", _FIGURE_PAGE)
    assert code == 0, log[-3000:]
    html = (tmp_path / "ok" / "site" / "index.html").read_text(encoding="utf-8")
    assert html.count('class="fnllm-figure"') == 1
    assert not (tmp_path / "ok" / "written.txt").exists()  # not in the project directory

    code, log = _mini_build(tmp_path / "failing", _FIGURE_PAGE.replace("[3.0, 2.0, 1.0]", "[]"))
    assert code != 0 and "runs: no values" in log, log[-3000:]

    code, log = _mini_build(
        tmp_path / "no-figure", _FIGURE_PAGE.replace("print(plot.to_html", "(plot.to_html")
    )
    assert code != 0 and "promises 1 figures" in log, log[-3000:]


# ----------------------------------------------------------------------------- (c) public API


def _public_modules() -> list[str]:
    import fnllm

    names = ["fnllm"]
    for info in pkgutil.walk_packages(fnllm.__path__, prefix="fnllm."):
        # the command line's modules are documented by ``fnllm --help``, not the API reference
        private = any(part.startswith("_") for part in info.name.split("."))
        if not private and not info.name.startswith("fnllm.cli."):
            names.append(info.name)
    return sorted(names)


def _is_api_object(obj: object) -> bool:
    return (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(
        obj, "__module__", ""
    ).startswith("fnllm")


@functools.cache
def _public_api() -> dict[str, dict[str, object]]:
    """Map each public module to its public functions and classes.

    The public names are ``__all__`` when a module defines it, else every non-underscore
    function or class defined in that module. Type aliases and constants are not checked.
    """
    api: dict[str, dict[str, object]] = {}
    for modname in _public_modules():
        mod = importlib.import_module(modname)
        exported = getattr(mod, "__all__", None)
        if exported is None:
            exported = [
                n
                for n, v in vars(mod).items()
                if not n.startswith("_") and getattr(v, "__module__", None) == modname
            ]
        api[modname] = {
            n: getattr(mod, n)
            for n in exported
            if hasattr(mod, n) and _is_api_object(getattr(mod, n))
        }
    return api


def _has_example(doc: str | None) -> bool:
    return bool(doc) and (">>>" in doc or "```" in doc)


def _public_methods(cls: type) -> dict[str, object]:
    out = {}
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if isinstance(func, property):
            func = func.fget
        if inspect.isfunction(func):
            out[name] = func
    return out


def test_every_public_function_has_a_docstring_with_an_example() -> None:
    """Walk the package: each public function/class needs a docstring with a ``>>>`` example;
    each public method of a public class needs a docstring."""
    seen: set[int] = set()
    lacking: list[str] = []
    for names in _public_api().values():
        for name, obj in names.items():
            if id(obj) in seen:
                continue  # re-exported: checked once
            seen.add(id(obj))
            doc = inspect.getdoc(obj) if obj.__doc__ else None
            where = f"{obj.__module__}.{getattr(obj, '__qualname__', name)}"
            if not doc:
                lacking.append(f"{where}: no docstring")
            elif not _has_example(doc):
                lacking.append(f"{where}: docstring has no example (>>> or fenced block)")
            if inspect.isclass(obj):
                for mname, meth in _public_methods(obj).items():
                    if not meth.__doc__ or not meth.__doc__.strip():
                        lacking.append(f"{where}.{mname}: no docstring")
    report = "\n".join(sorted(lacking))
    assert not lacking, f"{len(lacking)} public names lack a documented example:\n{report}"


def _api_page_for(modname: str) -> tuple[Path, str] | None:
    """The ``docs/api`` page rendering ``modname`` and the module its ``:::`` directive names:
    its own page, else the page of its nearest ancestor package (which shows its exports)."""
    parts = modname.split(".")
    for n in range(len(parts), 1, -1):
        shown = ".".join(parts[:n])
        for page in sorted((DOCS / "api").glob("*.md")):
            text = page.read_text(encoding="utf-8")
            if re.search(rf"^:::\s+{re.escape(shown)}\s*$", text, re.M):
                return page, shown
    return None


def test_every_public_module_has_an_api_page() -> None:
    missing = [m for m in _public_modules() if m not in _NO_API_PAGE and _api_page_for(m) is None]
    nav = CONFIG.read_text(encoding="utf-8")
    unlisted = [f"api/{p.name}" for p in (DOCS / "api").glob("*.md") if f"api/{p.name}" not in nav]
    assert not missing, f"public modules without a docs/api page: {missing}"
    assert not unlisted, f"API pages missing from mkdocs.yml nav: {unlisted}"


# ----------------------------------------------------------------------------- (d) Chromium


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """Serve the built site on a free localhost port for the browser."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}"
        finally:
            httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        del format, args


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="fnllm-chromium-") as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=4000",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )


_ERROR_TEXT = (
    "Traceback (most recent call last)",
    "404 - Not found",
    "Page not found",
    "could not be found",
    "Could not collect",
    "::: fnllm",  # an API directive that was not rendered
)


@pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and os.access(CHROMIUM, os.X_OK)),
    reason=f"headless Chromium not installed at {CHROMIUM}",
)
@pytest.mark.parametrize(
    ("url_path", "title", "must_contain", "shot"),
    [
        ("/", "fnllm", ["Getting started", "API reference"], "docs-home.png"),
        (
            "/api/tree/",
            "fnllm.tree",
            ["fnllm.tree.partition", "Getting started", "Parameters"],
            "docs-api-tree.png",
        ),
        (
            "/guides/training/",
            "Training",
            ["Freezing is a partition", 'class="fnllm-figure"'],
            "docs-guide-training.png",
        ),
        (
            "/examples/pretrain-gpt/",
            "Pretrain a GPT",
            ["Examples", 'class="fnllm-figure"', "Next"],
            "docs-example-pretrain-gpt.png",
        ),
    ],
    ids=["home", "api-tree", "guide-training", "example-gpt"],
)
def test_chromium_renders_page(
    served: str, url_path: str, title: str, must_contain: list[str], shot: str
) -> None:
    url = served + url_path
    dom = _chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    m = re.search(r"<title>(.*?)</title>", html, re.S)
    assert m and title in m.group(1), f"title {m.group(1) if m else None!r} lacks {title!r}"
    assert 'class="md-nav' in html, "no Material navigation in the rendered DOM"
    assert "md-header" in html and "md-content" in html
    for text in must_contain:
        assert text in html, f"{url}: {text!r} not in the rendered page"
    for bad in _ERROR_TEXT:
        assert bad not in html, f"{url}: error text {bad!r} in the rendered page"

    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / shot
    target.unlink(missing_ok=True)
    # pages with figures are shot tall enough to hold the first one
    height = 1600 if shot in ("docs-home.png", "docs-api-tree.png") else 3000
    proc = _chromium(f"--window-size=1280,{height}", f"--screenshot={target}", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "screenshot is not a PNG"
    assert len(data) > 20_000, f"screenshot is suspiciously small ({len(data)} bytes): blank page?"


# ----------------------------------------------------------------------------- design page


def _fnllm_imports() -> dict[str, set[str]]:
    """For each top-level fnllm module or package, the other top-level ones it imports."""
    import ast

    deps: dict[str, set[str]] = {}
    for path in (ROOT / "fnllm").rglob("*.py"):
        parts = path.relative_to(ROOT / "fnllm").with_suffix("").parts
        if parts[0] == "__init__":
            continue
        top = parts[0]
        found = deps.setdefault(top, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fnllm"):
                mod = (node.module or "").split(".")
                names = [a.name for a in node.names] if len(mod) == 1 else [mod[1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("fnllm.")]
            found.update(n for n in names if n != top)
    return deps


def test_design_page_import_table_matches_the_code() -> None:
    text = (DOCS / "design.md").read_text(encoding="utf-8")
    table = text.split("<!-- docs-test: import-table -->", 1)[1].strip().split("\n\n", 1)[0]
    documented = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        documented[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", cells[1]))
    actual = {m: d for m, d in _fnllm_imports().items() if m != "cli"}
    wrong = [
        f"{m}: page says {sorted(documented.get(m, ()))}, code imports {sorted(actual.get(m, ()))}"
        for m in sorted(set(documented) | set(actual))
        if documented.get(m) != actual.get(m)
    ]
    assert not wrong, "docs/design.md import table is out of date:\n" + "\n".join(wrong)


# A same-origin page that loads a built page in an iframe, waits for its figures to decode,
# and writes what it found (and what the copy button would copy) into its own DOM, which
# ``chromium --dump-dom`` then prints.
_CHECK_PAGE = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="page" src="%s" width="1280" height="900"></iframe>
<script>
const frame = document.getElementById("page");
frame.addEventListener("load", async () => {
  const doc = frame.contentDocument, win = frame.contentWindow;
  const imgs = [...doc.querySelectorAll("img.fnllm-figure")];
  await Promise.all(imgs.map((img) => img.decode().catch(() => null)));
  const code = doc.querySelector(".language-pycon code");
  const out = {
    images: imgs.map((img) => [img.complete, img.naturalWidth, img.naturalHeight]),
    copied: code && win.fnllmCodeText ? win.fnllmCodeText(code) : null,
  };
  document.getElementById("result").textContent = "RESULT" + JSON.stringify(out) + "END";
});
</script></body></html>"""


def _inspect_in_chromium(site: Path, served: str, url_path: str) -> dict[str, object]:
    import html
    import json

    name = "_fnllm_check_" + re.sub(r"\W", "_", url_path) + ".html"
    (site / name).write_text(_CHECK_PAGE % url_path, encoding="utf-8")
    dom = _chromium("--dump-dom", f"{served}/{name}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r"RESULT(.*?)END", dom.stdout, re.S)
    assert m, f"the check page did not report for {url_path}: {dom.stdout[-1500:]}"
    return json.loads(html.unescape(m.group(1)))


@pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and os.access(CHROMIUM, os.X_OK)),
    reason=f"headless Chromium not installed at {CHROMIUM}",
)
@pytest.mark.parametrize("url_path", ["/", "/guides/training/", "/examples/pretrain-gpt/"])
def test_chromium_figures_load(site: Path, served: str, url_path: str) -> None:
    """Each figure on the page is an ``<img>`` the browser decodes to a non-empty picture."""
    found = _inspect_in_chromium(site, served, url_path)
    images = found["images"]
    assert isinstance(images, list) and images, f"{url_path}: no fnllm figure in the page"
    for complete, width, height in images:
        assert complete and width > 0 and height > 0, f"{url_path}: figure failed: {images}"


@pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and os.access(CHROMIUM, os.X_OK)),
    reason=f"headless Chromium not installed at {CHROMIUM}",
)
def test_chromium_copy_leaves_out_prompts_and_outputs(site: Path, served: str) -> None:
    """The copy button's text of a ``>>>`` example is its code lines without prompts."""
    import html

    copied = _inspect_in_chromium(site, served, "/api/tree/")["copied"]
    page = (site / "api" / "tree" / "index.html").read_text(encoding="utf-8")
    block = re.search(r'class="language-pycon highlight">(.*?)</code>', page, re.S)
    assert block is not None
    shown = html.unescape(re.sub(r"<[^>]+>", "", block.group(1))).splitlines()
    code = [ln[4:] for ln in shown if ln.startswith((">>> ", "... "))]
    outputs = [ln for ln in shown if ln and not ln.startswith((">>>", "..."))]
    assert code and outputs, shown  # the example does print something
    assert copied == "\n".join(code) + "\n"
