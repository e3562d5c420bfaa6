"""Griffe extension for the fnllm docs build (loaded by mkdocstrings, see ``mkdocs.yml``).

It does two things once the ``fnllm`` package has been loaded:

1. **Missing docstrings fail the build.** mkdocstrings only *hides* an undocumented object
   (``show_if_no_docstring: false``); it does not complain. This extension logs a warning for
   every public function, class and public method in a public ``fnllm`` module that has no
   docstring, and ``mkdocs build --strict`` turns warnings into a failed build.
2. **Sphinx roles become cross-references.** Docstrings are also read with ``help()`` and
   doctest, so they may use roles like :func:`partition` or :class:`fnllm.models.gpt.GPT`.
   These are rewritten into mkdocstrings/autorefs links, resolved against the object's own
   scope, then its module, then the ``fnllm`` package. A link to an ``fnllm`` object that does
   not exist is kept as a link, so autorefs reports it and ``--strict`` fails the build;
   targets outside fnllm (``torch.func.grad``) render as plain code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_logger = griffe.get_logger("fnllm_docs")

_ROLE = re.compile(
    r":(?:py:)?(?P<role>func|meth|class|mod|attr|data|obj|exc|const|type):`(?P<target>[^`]+)`"
)
# The project writes ``Example:`` (singular); Google style as griffe parses it only knows
# ``Examples:``, and would otherwise render the doctest as an admonition of Markdown text.
_EXAMPLE_HEADER = re.compile(r"^Example:[ \t]*$", re.MULTILINE)
_ARGS_HEADER = re.compile(r"^(?:Args|Arguments):[ \t]*$", re.MULTILINE)


class FnllmDocstrings(griffe.Extension):
    """Check that public fnllm objects are documented, and link Sphinx-role references."""

    def __init__(self, root: str = "fnllm") -> None:
        """Act on the package named ``root`` (the tests point it at a scratch package)."""
        super().__init__()
        self.root = root

    def on_package(self, *, pkg: griffe.Module, loader: Any, **kwargs: Any) -> None:
        """Walk the loaded package once its object tree is complete."""
        del loader, kwargs
        if pkg.name != self.root:
            return
        _rewrite_all(pkg, pkg)
        checked: set[str] = set()
        for obj in _public_api(pkg):
            if obj.path not in checked:
                checked.add(obj.path)
                _check_documented(obj)


def _rewrite_all(obj: griffe.Object, pkg: griffe.Module) -> None:
    """Rewrite every docstring of the package, private modules included (their objects may be
    re-exported by a public module and rendered there)."""
    _rewrite(obj, pkg)
    for member in list(obj.members.values()):
        if not member.is_alias:
            _rewrite_all(member, pkg)


def _public_api(module: griffe.Object) -> list[griffe.Object]:
    """Public functions and classes: those defined in public modules, and those a public
    module exports (``__all__``) from a private one."""
    found: list[griffe.Object] = []
    for member in list(module.members.values()):
        if member.is_alias:
            if member.is_exported and not member.name.startswith("_"):
                try:
                    target = member.final_target
                except Exception:  # an alias into a package that is not loaded (torch, ...)
                    continue
                if (target.is_function or target.is_class) and target.path.startswith(
                    module.package.name + "."
                ):
                    found.append(target)
            continue
        if member.is_module:
            if not member.name.startswith("_"):
                found.extend(_public_api(member))
            continue
        if (member.is_function or member.is_class) and _is_public(member):
            found.append(member)
    return found


def _check_documented(obj: griffe.Object) -> None:
    if obj.docstring is None or not obj.docstring.value.strip():
        _logger.warning(
            "%s:%s: public %s %s has no docstring",
            obj.relative_filepath,
            obj.lineno,
            obj.kind.value,
            obj.path,
        )
    if obj.is_class:
        for member in list(obj.members.values()):
            is_api = member.is_function or member.is_class
            if not member.is_alias and is_api and not member.name.startswith("_"):
                _check_documented(member)


def _rewrite(obj: griffe.Object, pkg: griffe.Module) -> None:
    if obj.docstring is None:
        return
    text = _EXAMPLE_HEADER.sub("Examples:", obj.docstring.value)
    if obj.is_class and _is_namedtuple(obj):
        # A NamedTuple's fields are its constructor's arguments, but griffe does not synthesise
        # that ``__init__`` and would report every ``Args:`` entry as unknown: list them as the
        # attributes they are.
        text = _ARGS_HEADER.sub("Attributes:", text)
    obj.docstring.value = _ROLE.sub(lambda m: _link(m, obj, pkg), text)


def _is_namedtuple(cls: griffe.Object) -> bool:
    bases = [str(b) for b in getattr(cls, "bases", ())]
    return (
        any(b.rsplit(".", 1)[-1] == "NamedTuple" for b in bases) and "__init__" not in cls.members
    )


def _is_public(obj: griffe.Object) -> bool:
    if obj.name.startswith("_"):
        return False
    parent = obj.parent
    if parent is not None and parent.is_module:
        return obj.is_public
    return True  # a non-underscore method/nested class of a public class


def _link(match: re.Match[str], obj: griffe.Object, pkg: griffe.Module) -> str:
    raw = match.group("target").strip()
    short = raw.startswith("~")
    target = raw.lstrip("~.").removesuffix("()")
    shown = target.rsplit(".", 1)[-1] if short else target
    resolved = _resolve(match.group("role"), target, obj, pkg)
    if resolved is not None:
        return f"[`{shown}`][{resolved}]"
    if target.startswith(pkg.name + "."):
        return f"[`{shown}`][{target}]"  # unresolved fnllm target: let autorefs report it
    return f"`{shown}`"


def _resolve(role: str, target: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
    scopes: list[str] = []
    node: griffe.Object | None = obj
    while node is not None:
        scopes.append(node.path)
        node = node.parent
    candidates = [f"{scope}.{target}" for scope in scopes]
    if _inside(target, pkg.name):
        candidates.insert(0, target)
    collection = pkg.modules_collection
    for path in candidates:
        try:
            found = collection[path]
        except Exception:  # KeyError, or an alias into a package that is not loaded
            continue
        if found.is_alias:
            try:
                found = found.final_target
            except Exception:  # an alias to something outside the loaded packages
                return None
        name = target.rsplit(".", 1)[-1]
        if found.is_module and role != "mod" and name in found.members:
            # ``fnllm.train.fit`` is both a submodule and, re-exported, the function ``fit``
            # inside it: a :func: role means the function.
            return _resolve(role, f"{found.path}.{name}", obj, pkg)
        if found.is_attribute and found.docstring is None and found.parent is not None:
            # Undocumented attributes (e.g. dataclass fields) are not rendered: link the class.
            found = found.parent
        if found.is_module:
            # The API reference has one page per top-level module (``fnllm.optim``); a
            # submodule (``fnllm.optim.schedules``) is shown on its package's page.
            while found.parent is not None and found.parent.path != pkg.name:
                found = found.parent
            if found.path == pkg.name:
                return None  # the package root has no page of its own
        if _inside(found.path, pkg.name):
            return found.path
        return None  # e.g. ``fnmatch`` imported into an fnllm module: not ours to link
    return None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")
