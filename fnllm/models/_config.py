"""A model config's JSON form (private): ``to_config``/``from_config`` and the fields that a
config keeps accepting under their old names (:func:`renamed_fields`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from fnllm._deprecation import deprecated

__all__ = ["from_config", "renamed_fields", "to_config"]


def to_config(model: Any, kind: str) -> dict[str, Any]:
    """``{"type": kind, field: value, ...}``."""
    return {"type": kind, **dataclasses.asdict(model)}


def from_config(cls: Any, kind: str, config: Mapping[str, Any]) -> Any:
    """Build dataclass ``cls`` from a dict, checking the ``"type"`` tag and field names.

    Fields renamed since a config was saved (``cls._renamed``: old name -> new name) are read
    under their new names, so old checkpoints keep loading.
    """
    values = dict(config)
    for old, new in getattr(cls, "_renamed", {}).items():  # see renamed_fields
        if old in values:
            value = values.pop(old)
            if values.setdefault(new, value) != value:
                raise ValueError(
                    f"{cls.__name__}.from_config: {old} (the old name of {new}) is {value!r} "
                    f"but {new} is {values[new]!r}"
                )
    tag = values.pop("type", kind)
    if tag != kind:
        raise ValueError(f"{cls.__name__}.from_config: type is {tag!r}, expected {kind!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_config: unknown fields {unknown}")
    return cls(**values)


def renamed_fields(**old_to_new: str) -> Any:
    """Class decorator: a model config keeps accepting fields under their old names.

    ``cls(old=v)`` and ``model.old`` keep working until 0.2 (the first use of each warns with
    a ``DeprecationWarning`` naming the new name) and :func:`from_config` reads saved configs
    that use the old names, silently and beyond 0.2 (files outlive code); ``to_config``
    writes the new ones.
    """

    def decorate(cls: Any) -> Any:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for old, new in old_to_new.items():
                if old in kwargs:
                    deprecated(f"{cls.__name__}({old}=...)", new)
                    value = kwargs.pop(old)
                    if kwargs.setdefault(new, value) != value:
                        raise ValueError(
                            f"{cls.__name__}: {old} (the old name of {new}) is {value!r} "
                            f"but {new} is {kwargs[new]!r}"
                        )
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        cls._renamed = {**getattr(cls, "_renamed", {}), **old_to_new}
        for old, new in old_to_new.items():
            setattr(cls, old, property(functools.partial(_old_name, old=old, new=new)))
        return cls

    return decorate


def _old_name(model: Any, *, old: str, new: str) -> Any:
    deprecated(f"{type(model).__name__}.{old}", new)
    return getattr(model, new)
