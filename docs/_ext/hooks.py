"""MkDocs hooks for fnllm's executed pages (see ``mkdocs.yml``).

- Executed blocks (``python exec="on"``, run by markdown-exec) run with one torch thread (the
  pages use tiny models; on a loaded machine spinning OpenMP threads make them much slower) and
  in a fresh scratch directory per page, so checkpoints and tokenizers they write never land
  in the repository.
- A page that promises figures (``<!-- docs-figures: N -->``) must contain at least ``N``
  ``fnllm.plot.to_html`` images, each a PNG with a non-zero size; otherwise the build warns,
  which fails ``mkdocs build --strict``.
- Code blocks (``<pre>`` and the API pages' source listings) are marked
  ``data-search-exclude``, so the search index and its previews hold prose, not code.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import struct
import tempfile
import time
from typing import Any

log = logging.getLogger("mkdocs.plugins.fnllm")

_PROMISE = re.compile(r"<!--\s*docs-figures:\s*(\d+)\s*-->")
_FIGURE = re.compile(
    r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)" class="fnllm-figure"'
)
_state: dict[str, Any] = {}


def on_config(config: Any) -> Any:
    import matplotlib
    import torch

    matplotlib.use("Agg")
    torch.set_num_threads(1)
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    del config, files
    if 'exec="on"' in markdown:
        _state["start"] = time.perf_counter()
        _state["cwd"] = os.getcwd()
        _state["tmp"] = tempfile.TemporaryDirectory(prefix="fnllm-docs-")
        os.chdir(_state["tmp"].name)
    m = _PROMISE.search(markdown)
    _state["promised"] = (page.file.src_uri, int(m.group(1))) if m else None
    return markdown


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    del config, files
    if "tmp" in _state:
        os.chdir(_state.pop("cwd"))
        _state.pop("tmp").cleanup()
        seconds = time.perf_counter() - _state.pop("start")
        log.info("%s: executed blocks ran in %.1f s", page.file.src_uri, seconds)
    promised = _state.pop("promised", None)
    figures = [_png_size(m.group(1)) for m in _FIGURE.finditer(html)]
    bad = [i for i, size in enumerate(figures) if size is None or 0 in size]
    if bad:
        log.warning("%s: figure(s) %s are not valid, non-empty PNGs", page.file.src_uri, bad)
    if promised and len(figures) < promised[1]:
        log.warning(
            "%s: promises %d figures (docs-figures), drew %d",
            promised[0],
            promised[1],
            len(figures),
        )
    html = re.sub(r"<pre\b", "<pre data-search-exclude", html)
    return re.sub(r'<details class="quote"', '<details data-search-exclude class="quote"', html)


def _png_size(data: str) -> tuple[int, int] | None:
    raw = base64.b64decode(data)
    if raw[:8] != b"\x89PNG\r\n\x1a\n" or raw[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", raw[16:24])
