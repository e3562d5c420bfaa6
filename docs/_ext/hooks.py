"""MkDocs hooks for fnllm's executed pages and its example gallery (see ``mkdocs.yml``).

Every ``python`` block of every page either runs at build time and shows what it printed, or
says why it does not run:

- ``python exec="on"`` blocks run (markdown-exec) with one torch thread, in a fresh scratch
  directory per page. A block that calls ``print`` but shows no output fails the strict build.
- ``python title="Not run here: <reason>"`` blocks are shown, not run; the title tells the
  reader why (needs a GPU, takes minutes, ...).
- ``python title="<name>.py"`` blocks are files: the hook writes them into the page's scratch
  directory, where a later block runs them (e.g. under ``torchrun``).
Any other ``python`` block fails the strict build.

Figures are files: a block saves ``fig.savefig("loss.png")`` like a script would, and the hook
puts every PNG the block wrote (or rewrote) under its output, so no HTML is in the code
readers copy. Each saved figure is also checked for legibility at the site's column width
(no text under 9 CSS pixels). A page that promises figures (``<!-- docs-figures: N -->``)
must show at least ``N``.

The example gallery is generated: each ``docs/examples/<name>.py`` script (jupytext "percent"
cells: ``# %% [markdown]`` prose, ``# %%`` code) becomes the page ``examples/<name>.md``
whose code cells run at build; the first figure of each becomes its thumbnail in the gallery
index (``<!-- fnllm-gallery: name name ... -->`` in ``docs/examples/index.md`` gives the order;
a script missing from the list, or listed but missing, fails the build). A script whose docstring
holds ``docs-run: torchrun N`` is shown whole and run under ``torchrun`` with ``N`` processes;
``docs-thumbnail: name.png`` picks another of its figures as the thumbnail.

Code blocks are kept out of the search index (``data-search-exclude``); instead the fnllm
names a page's code uses are listed in prose at its end, so that searching ``privatize`` finds
the pages that call it.

Set ``FNLLM_DOCS_REPORT=<file>`` to get a JSON report of every page's blocks (the tests count
blocks that print without showing output with it) and of the wall and CPU seconds its executed
blocks took (CPU seconds of the build process and of the processes it waited for, e.g. the
``torchrun`` launches; they move far less with the machine's load than wall time).
"""

from __future__ import annotations

import ast
import base64
import html as _html
import json
import logging
import os
import re
import resource
import struct
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.plugins.fnllm")

COLUMN_PX = 690  # the width of the text column at a 1280-pixel-wide window (CSS pixels)
MIN_TEXT_PX = 9.0
_PROMISE = re.compile(r"<!--\s*docs-figures:\s*(\d+)\s*-->")
_FIGURE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)" class="fnllm-figure"')
_MARKER = re.compile(r"(?:<p>)?<!-- fnllm-block:(\d+) -->(?:</p>)?")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
_EXEC = re.compile(r'\bexec="(?:on|1|true|yes)"')
_TITLE = re.compile(r'\btitle="([^"]*)"')
_PY_LANGS = ("python", "py", "pycon")
_GALLERY = re.compile(r"<!--\s*fnllm-gallery:\s*([^>]*?)\s*-->")
_TORCHRUN = re.compile(r"docs-run:\s*torchrun\s+(\d+)")
_THUMB = re.compile(r"docs-thumbnail:\s*(\S+\.png)")
_state: dict[str, Any] = {"thumbs": {}, "report": {}}


# ----------------------------------------------------------------------------- fenced blocks


def code_blocks(text: str) -> Iterator[dict[str, Any]]:
    """Yield each fenced block of a Markdown text: its line (1-based, of the first code line),
    indent, language, info string, kind and source.

    The kind of a python block is ``exec`` (runs at build), ``not-run`` (title says why),
    ``file`` (title names a ``.py`` file) or ``unmarked``; other languages have kind ``other``.
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
        title = _TITLE.search(info)
        if lang not in _PY_LANGS:
            kind = "other"
        elif _EXEC.search(info):
            kind = "exec"
        elif title and re.match(r"(?i)not run\b", title.group(1)):
            kind = "not-run"
        elif title and title.group(1).endswith(".py"):
            kind = "file"
        else:
            kind = "unmarked"
        yield {
            "line": i + 2,
            "end": j,  # index of the closing fence line (0-based)
            "indent": indent,
            "lang": lang,
            "info": info,
            "kind": kind,
            "title": title.group(1) if title else "",
            "source": "\n".join(body) + "\n",
        }
        i = j + 1


def calls_print(source: str) -> bool:
    """Whether Python ``source`` calls ``print`` anywhere (hidden lines included)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return "print(" in source
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
        for n in ast.walk(tree)
    )


def api_names(sources: list[str]) -> list[str]:
    """The fnllm names (``grads.privatize``, ``GPT``...) that Python ``sources`` use.

    Follows ``import fnllm``, ``from fnllm import x as y`` and ``from fnllm.m import f``;
    only names that exist in the package are kept, written ``module.name`` as in the guides.
    """
    import importlib

    found: dict[str, None] = {}
    trees = []
    for src in sources:
        try:
            trees.append(ast.parse(src))
        except SyntaxError:
            continue
    alias: dict[str, str] = {}  # local name -> dotted fnllm path (a page's blocks share them)
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "fnllm":
                        alias[a.asname or "fnllm"] = a.name if a.asname else "fnllm"
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fnllm":
                for a in node.names:
                    alias[a.asname or a.name] = f"{node.module}.{a.name}"
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                base = alias.get(node.value.id)
                if base:
                    found[f"{base}.{node.attr}"] = None
    for path in alias.values():
        found[path] = None
    names = []
    for path in found:
        parts = path.split(".")
        obj: Any = None
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
            break
        if obj is None or isinstance(obj, type(sys)) or parts[-1].startswith("_"):
            continue
        names.append(".".join(parts[1:]))
    return sorted({n for n in names if n})


# ----------------------------------------------------------------------------- gallery


def _script_title(text: str) -> tuple[str, str, str]:
    """``(title, summary, body)`` of an example script's module docstring."""
    doc = ast.get_docstring(ast.parse(text)) or ""
    lines = doc.strip().splitlines()
    title = lines[0].strip() if lines else "Example"
    body = "\n".join(
        ln for ln in lines[1:] if not (_TORCHRUN.search(ln) or _THUMB.search(ln))
    ).strip()
    summary = body.split("\n\n", 1)[0].replace("\n", " ")
    summary = re.split(r"(?<=[.:])\s+(?=[A-Z`])", summary, maxsplit=1)[0]  # the first sentence
    return title, summary, body


def script_to_markdown(name: str, text: str) -> str:
    """The gallery page of one example script (jupytext percent cells)."""
    title, _, body = _script_title(text)
    tree = ast.parse(text)
    start = tree.body[0].end_lineno if tree.body and isinstance(tree.body[0], ast.Expr) else 0
    lines = text.splitlines()[start or 0 :]
    session = "ex-" + Path(name).stem
    out = [f"# {title}", "", body, ""]
    nproc = _TORCHRUN.search(text)
    if not nproc:
        out += [
            f"This page is the script [`{name}`]({name}) (download it), cut into steps; "
            f"`python {name}` runs it and writes the figures shown here as PNG files. Every "
            "output below was printed by the step above it while the site was built.",
            "",
        ]
    else:
        out += [
            f"The script, [`{name}`]({name}) (download it):",
            "",
        ]
        script = "\n".join(lines).strip()
        out += [
            f'```python title="{name}"',
            script,
            "```",
            "",
            f"Run it in one process, and on {nproc.group(1)} (one machine, gloo on CPU):",
            "",
            "```bash",
            f"python {name}",
            f"torchrun --nproc-per-node {nproc.group(1)} {name}",
            "```",
            "",
            "While this page was built, both commands ran and printed:",
            "",
            f'```python exec="on" session="{session}" result="text"',
            "from fnllm_docs_tools import python, torchrun",
            f'print("$ python {name}")',
            f"print(python({name!r}))",
            f'print("$ torchrun --nproc-per-node {nproc.group(1)} {name}")',
            f"print(torchrun({name!r}, {nproc.group(1)}))",
            "```",
            "",
        ]
        return "\n".join(out)
    for kind, cell in _cells(lines):
        if kind == "markdown":
            out += [cell, ""]
        elif cell.strip():
            out += [
                f'```python exec="on" session="{session}" source="above" result="text"',
                cell,
                "```",
                "",
            ]
    return "\n".join(out)


def _cells(lines: list[str]) -> Iterator[tuple[str, str]]:
    kind, cell = "code", []
    for line in [*lines, "# %%"]:
        if line.startswith("# %%"):
            text = "\n".join(cell).strip("\n")
            if kind == "markdown":
                text = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in cell)
                text = text.strip()
            if text:
                yield kind, text
            kind = "markdown" if "[markdown]" in line else "code"
            cell = []
        else:
            cell.append(line)


def _gallery_html(order: list[str], scripts: list[Path], src: str) -> str:
    by_stem = {p.stem: p for p in scripts}
    for stem in sorted(set(by_stem) - set(order)):
        log.warning("%s: docs/examples/%s.py is not in the gallery's list", src, stem)
    cards = []
    for stem in order:
        if stem not in by_stem:
            if os.environ.get("FNLLM_DOCS_EXAMPLES") is None:
                log.warning(
                    "%s: the gallery lists %s, but docs/examples/%s.py is missing", src, stem, stem
                )
            continue
        title, summary, _ = _script_title(by_stem[stem].read_text(encoding="utf-8"))
        slug = stem.replace("_", "-")
        summary = re.sub(r"`([^`]+)`", r"<code>\1</code>", _html.escape(summary))
        cards.append(
            f'<a class="fnllm-card" href="{slug}/">'
            f'<img src="thumbs/{slug}.png" alt="" loading="lazy">'
            f"<strong>{_html.escape(title)}</strong>"
            f"<span>{summary}</span></a>"
        )
    return '<div class="fnllm-gallery">\n' + "\n".join(cards) + "\n</div>"


def _examples(config: Any) -> list[Path]:
    scripts = sorted((Path(config["docs_dir"]) / "examples").glob("*.py"))
    only = os.environ.get("FNLLM_DOCS_EXAMPLES")  # a comma-separated subset, while writing one
    if only is not None:
        scripts = [p for p in scripts if p.stem in only.split(",")]
    return scripts


# ----------------------------------------------------------------------------- mkdocs events


def on_config(config: Any) -> Any:
    import matplotlib
    import torch

    matplotlib.use("Agg")
    torch.set_num_threads(1)
    here = str(Path(__file__).parent)
    if here not in sys.path:
        sys.path.insert(0, here)  # fnllm_docs_tools, for the blocks that launch torchrun
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(config["config_file_path"]).parent), os.environ.get("PYTHONPATH")) if p
    )
    os.environ["FNLLM_DOCS_DIR"] = str(Path(config["docs_dir"]).resolve())  # for data files
    _patch_markdown_exec()
    _patch_savefig()
    _state["thumbs"] = {}
    _state["report"] = {}
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for path in _examples(config):
        slug = path.stem.replace("_", "-")
        md = script_to_markdown(path.name, path.read_text(encoding="utf-8"))
        files.append(File.generated(config, f"examples/{slug}.md", content=md))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    del files
    src = page.file.src_uri
    gallery = _GALLERY.search(markdown)
    if gallery:
        html = _gallery_html(gallery.group(1).split(), _examples(config), src)
        markdown = markdown[: gallery.start()] + html + markdown[gallery.end() :]
    blocks = list(code_blocks(markdown))
    if any(b["kind"] in ("exec", "file") for b in blocks):
        _state["start"] = time.perf_counter()
        _state["cpu"] = _cpu_seconds()
        _state["cwd"] = os.getcwd()
        _state["tmp"] = tempfile.TemporaryDirectory(prefix="fnllm-docs-")
        os.chdir(_state["tmp"].name)
    _state["runs"] = []
    _state["expected"] = []
    lines = markdown.splitlines()
    inserts: list[tuple[int, str]] = []
    for b in blocks:
        if b["kind"] == "unmarked":
            log.warning(
                '%s:%d: a python block that neither runs (exec="on") nor says why '
                '(title="Not run here: <reason>")',
                src,
                b["line"],
            )
        elif b["kind"] == "file":
            Path(b["title"]).write_text(b["source"], encoding="utf-8")
        elif b["kind"] == "exec" and b["lang"] != "pycon":
            k = len(_state["expected"])
            _state["expected"].append(b)
            inserts.append((b["end"] + 1, f"\n{b['indent']}<!-- fnllm-block:{k} -->\n"))
    for at, text in reversed(inserts):
        lines.insert(at, text)
    markdown = "\n".join(lines) + "\n"
    names = api_names([b["source"] for b in blocks if b["lang"] in _PY_LANGS])
    if names:
        shown = ", ".join(f"`{n}`" for n in names)
        markdown += (
            f'\n<p class="fnllm-names" markdown="1">fnllm names in this page\'s code: {shown}</p>\n'
        )
    m = _PROMISE.search(markdown)
    _state["promised"] = int(m.group(1)) if m else 0
    return markdown


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    del config, files
    src = page.file.src_uri
    if "tmp" in _state:
        os.chdir(_state.pop("cwd"))
        _state.pop("tmp").cleanup()
        seconds = time.perf_counter() - _state.pop("start")
        cpu = _cpu_seconds() - _state.pop("cpu")
        log.info("%s: executed blocks ran in %.1f s (%.1f CPU s)", src, seconds, cpu)
    else:
        seconds = cpu = 0.0
    runs, expected = _state.pop("runs", []), _state.pop("expected", [])
    if len(runs) != len(expected):
        log.warning("%s: %d python blocks ran, %d expected", src, len(runs), len(expected))
    silent = []
    for b, run in zip(expected, runs):
        if run["code"].strip() != b["source"].strip():
            log.warning("%s:%d: blocks ran out of order", src, b["line"])
        if run["output"] is not None and not run["output"].strip() and calls_print(b["source"]):
            silent.append(b["line"])
            log.warning("%s:%d: the block calls print() but shows no output", src, b["line"])
        shown = "\n".join(ln for ln in b["source"].splitlines() if "markdown-exec: hide" not in ln)
        if "source=" in b["info"] and ("to_html(" in shown or re.search(r"print\(f?['\"]<", shown)):
            log.warning("%s:%d: HTML in the code readers copy", src, b["line"])
    figures = {k: run["pngs"] for k, run in enumerate(runs)}
    html = _MARKER.sub(lambda m: _figures_html(figures.get(int(m.group(1)), [])), html)
    pngs = [base64.b64decode(m.group(1)) for m in _FIGURE.finditer(html)]
    bad = [i for i, raw in enumerate(pngs) if _png_size(raw) in (None,) or 0 in _png_size(raw)]
    if bad:
        log.warning("%s: figure(s) %s are not valid, non-empty PNGs", src, bad)
    promised = _state.pop("promised", 0)
    if len(pngs) < promised:
        log.warning("%s: promises %d figures (docs-figures), drew %d", src, promised, len(pngs))
    if src.startswith("examples/") and src != "examples/index.md":
        named = [png for run in runs for png in run["pngs"]]
        if named:
            _state["thumbs"][Path(src).stem] = named
    _state["report"][src] = {
        "blocks": len([b for b in code_blocks(page.markdown or "") if b["lang"] in _PY_LANGS]),
        "executed": len(runs),
        "printing_without_output": len(silent),
        "figures": len(pngs),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
    }
    # a block that printed nothing leaves no empty output box under its code
    html = re.sub(
        r'<div class="language-text highlight"><pre><span></span><code>\s*</code></pre></div>',
        "",
        html,
    )
    html = re.sub(r"<pre\b", "<pre data-search-exclude", html)
    return re.sub(r'<details class="quote"', '<details data-search-exclude class="quote"', html)


def on_post_build(config: Any) -> None:
    thumbs = Path(config["site_dir"]) / "examples" / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    for path in _examples(config):
        slug = path.stem.replace("_", "-")
        figures = dict(_state["thumbs"].get(slug, []))
        hint = _THUMB.search(path.read_text(encoding="utf-8"))
        name = hint.group(1) if hint else next(iter(figures), None)
        if name not in figures:
            log.warning("examples/%s: no figure %s for the gallery thumbnail", path.name, name)
            continue
        (thumbs / f"{slug}.png").write_bytes(figures[name])
    report = os.environ.get("FNLLM_DOCS_REPORT")
    if report:
        Path(report).write_text(json.dumps(_state["report"], indent=1), encoding="utf-8")


# ----------------------------------------------------------------------------- helpers


def _figures_html(pngs: list[tuple[str, bytes]]) -> str:
    parts = []
    for name, raw in pngs:
        data = base64.b64encode(raw).decode("ascii")
        size = _png_size(raw) or (0, 0)
        parts.append(
            f'<figure class="fnllm-figure-box"><img alt="{_html.escape(name)}" '
            f'src="data:image/png;base64,{data}" class="fnllm-figure" '
            f'width="{size[0]}" style="max-width:100%;height:auto">'
            f"<figcaption>{_html.escape(name)}</figcaption></figure>"
        )
    return "\n".join(parts)


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of the children it waited for (a
    ``torchrun`` launch): a page's cost that, unlike wall time, does not grow with the load."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _snapshot() -> dict[str, tuple[int, int]]:
    out = {}
    for p in Path(".").rglob("*.png"):
        st = p.stat()
        out[p.as_posix()] = (st.st_mtime_ns, st.st_size)
    return out


class _SessionModule(types.ModuleType):
    """The module markdown-exec registers for a block, reading the session's namespace.

    markdown-exec runs a block in its session's globals dict but registers an *empty* module
    under the globals' ``__name__``. TorchDynamo, compiling a function of another module that
    calls a function defined on the page, reaches that function's globals through the module
    (``sys.modules[__name__].name``) and failed with "module has no attribute". This module
    answers from the live namespace.
    """

    def __init__(self, name: str, namespace: dict[str, Any]) -> None:
        super().__init__(name)
        object.__setattr__(self, "_fnllm_namespace", namespace)

    def __getattr__(self, attr: str) -> Any:
        try:
            return object.__getattribute__(self, "_fnllm_namespace")[attr]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}") from None


def _patch_markdown_exec() -> None:
    """Wrap markdown-exec's python runner: record each block's output and the PNGs it wrote;
    register each block's module as a view of its session's namespace."""
    from markdown_exec._internal.formatters import python as mx

    if getattr(mx._run_python, "_fnllm", False):
        return
    original = mx._run_python

    def module_for(name: str) -> types.ModuleType:
        session = _state.get("session")
        if session:
            return _SessionModule(name, mx._sessions_globals[session])
        return types.ModuleType(name)

    mx.ModuleType = module_for  # the name markdown-exec builds each block's module with

    def run(code: str, *args: Any, **kwargs: Any) -> str:
        _state["session"] = kwargs.get("session")
        before = _snapshot()
        record: dict[str, Any] = {"code": code, "output": None, "pngs": []}
        _state.setdefault("runs", []).append(record)
        output = original(code, *args, **kwargs)
        record["output"] = output
        after = _snapshot()
        record["pngs"] = [
            (name, Path(name).read_bytes()) for name in after if before.get(name) != after[name]
        ]
        return output

    run._fnllm = True  # type: ignore[attr-defined]
    mx._run_python = run


def _patch_savefig() -> None:
    """Check every figure saved during the build for text too small at column width."""
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    if getattr(Figure.savefig, "_fnllm", False):
        return
    original = Figure.savefig

    def savefig(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> Any:
        dpi = kwargs.get("dpi") or self.dpi
        if dpi == "figure":
            dpi = self.dpi
        scale = min(float(dpi), COLUMN_PX / self.get_figwidth()) / 72
        texts = [t for t in self.findobj(Text) if t.get_visible() and t.get_text().strip()]
        small = [t for t in texts if t.get_fontsize() * scale < MIN_TEXT_PX - 1e-6]
        if small:
            t = min(small, key=lambda t: t.get_fontsize())
            log.warning(
                "figure %s: text %r is %.1f px at column width (%d px); at least %g px wanted",
                fname if isinstance(fname, (str, os.PathLike)) else "<buffer>",
                t.get_text()[:30],
                t.get_fontsize() * scale,
                COLUMN_PX,
                MIN_TEXT_PX,
            )
        return original(self, fname, *args, **kwargs)

    savefig._fnllm = True  # type: ignore[attr-defined]
    Figure.savefig = savefig  # type: ignore[method-assign]


def _png_size(raw: bytes) -> tuple[int, int] | None:
    if raw[:8] != b"\x89PNG\r\n\x1a\n" or raw[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", raw[16:24])
