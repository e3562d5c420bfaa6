"""JSON Lines reading shared by the labelled-text, instruction and preference readers (private)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any


def json_objects(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file.

    Raises ``ValueError`` naming ``path:line`` for a line that is not JSON or not an object.
    """
    where = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}:{lineno}: not valid JSON ({err})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}:{lineno}: expected a JSON object, got {obj!r:.60}")
            yield lineno, obj
