"""JSON Lines reading shared by the labelled-text, instruction and preference readers (private)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any


def json_objects(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file.

    Raises ``ValueError`` naming ``path:line`` for a line that is not UTF-8, not JSON or not
    an object (a UTF-8 byte-order mark at the start is skipped).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected a file path (str or os.PathLike), got {path!r:.60}")
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise FileNotFoundError(f"no such file {where}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{where}:{lineno}: bytes that are not UTF-8 ({err.reason} at byte "
                    f"{err.start} of the line); re-save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}:{lineno}: not valid JSON ({err})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}:{lineno}: expected a JSON object, got {obj!r:.60}")
            yield lineno, obj
