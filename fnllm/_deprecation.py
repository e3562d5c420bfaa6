"""Deprecated names (private): one warning per old name per process, naming its replacement.

The policy (``docs/deprecation.md``): an old name keeps working for at least one minor
release after the one that renamed it, warns with :class:`DeprecationWarning` the first time
it is used in a process, the message names the replacement and the release that removes it,
and the release notes list it under *Deprecated*, then under *Removed*.
"""

from __future__ import annotations

import warnings

__all__ = ["REMOVAL", "deprecated"]

REMOVAL = "0.2"  # the release that removes the aliases of 0.1

# Old names that have warned in this process. Module state on purpose: a warning is a message
# to a person, not a result, and one per name keeps a training loop's log readable.
_warned: set[str] = set()


def deprecated(old: str, new: str, *, removal: str = REMOVAL, stacklevel: int = 2) -> None:
    """Warn (once per process) that ``old`` is deprecated in favour of ``new``.

    Example:
        >>> import warnings
        >>> from fnllm._deprecation import deprecated, _warned
        >>> _warned.discard("f(x=...)")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     deprecated("f(x=...)", "f(y=...)")
        ...     deprecated("f(x=...)", "f(y=...)")  # the second use is silent
        >>> [str(w.message) for w in caught]
        ['f(x=...) is deprecated and will be removed in fnllm 0.2: use f(y=...)']

    Args:
        old: the deprecated spelling, as the user wrote it (``"optim.step"``).
        new: what to write instead.
        removal: the release that removes ``old``.
        stacklevel: as for :func:`warnings.warn`, counted from the caller of this function
            (2: the line that called the function which calls ``deprecated``).
    """
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(
        f"{old} is deprecated and will be removed in fnllm {removal}: use {new}",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )
