"""The ``fnllm`` command line: one module per command, each with ``register(subparsers)``.

Every user mistake (a bad flag, a missing or malformed file) ends the same way: one line on
stderr, ``fnllm <command>: error: <what is wrong>``, and exit status 2, with no traceback. A
command reports one by calling ``parser.error(message)`` or raising :class:`UsageError`;
``ValueError``, ``TypeError``, ``KeyError`` and ``OSError`` escaping a command (the library's
named errors about its inputs) are reported the same way. ``FNLLM_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["UsageError", "main"]

# Each name is a module ``fnllm.cli.<name>`` whose ``register(sub)`` adds its subcommand and
# sets ``run(args, parser) -> int`` as the parser default. A new command is a module plus a name.
_COMMANDS = ("demo", "pretrain", "generate")

# what the library raises about bad inputs: reported as a user mistake, not a crash
_USER_ERRORS = (ValueError, TypeError, KeyError, OSError)


class UsageError(Exception):
    """A user mistake: :func:`main` prints ``fnllm <command>: error: <message>`` and exits 2.

    Example:
        >>> from fnllm.cli import UsageError
        >>> str(UsageError("--steps must be >= 1, got 0"))
        '--steps must be >= 1, got 0'

    Args:
        message: what is wrong, naming the flag or file.
        prog: the command's name (``"fnllm demo"``); ``main`` fills it in when omitted.
    """

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``error`` raises :class:`UsageError` (one line, not usage)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fnllm`` command line.

    ``fnllm demo`` compares the ways of adapting a pretrained model (feature-based probes,
    ``head``, ``bitfit``, ``last:N``, ``full``, ``lora``) on real labelled text and prints one
    table; ``fnllm demo --pretrain`` pretrains a small GPT on the built-in corpus instead.

    Example:
        >>> import contextlib, io
        >>> out = io.StringIO()
        >>> with contextlib.redirect_stdout(out):
        ...     argv = ["demo", "--pretrain", "--steps", "2", "--no-progress", "--no-minilm"]
        ...     status = main(argv)
        >>> status, "params" in out.getvalue()
        (0, True)

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit status.

    Raises:
        SystemExit: status 2 after printing ``fnllm <command>: error: ...`` for a user
            mistake (status 0 for ``--help``).
    """
    from fnllm import __version__

    parser = _Parser(prog="fnllm", description="fnllm command line")
    parser.add_argument("--version", action="version", version=f"fnllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"fnllm.cli.{name}").register(sub)
    command = None
    try:
        args = parser.parse_args(argv)
        command = args.command
        return int(args.run(args, parser))
    except UsageError as err:
        prog = err.prog if err.prog and err.prog != "fnllm" else _prog(command)
        _fail(prog, str(err))
    except _USER_ERRORS as err:
        if os.environ.get("FNLLM_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        _fail(_prog(command), f"{message} ({type(err).__name__}; FNLLM_DEBUG=1 shows where)")
    except KeyboardInterrupt:
        print(f"\n{_prog(command)}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _prog(command: str | None) -> str:
    return f"fnllm {command}" if command else "fnllm"


def _fail(prog: str, message: str) -> NoReturn:
    """Print the one-line error and exit 2 (as argparse does, without the usage block)."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{prog}: error: {line}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
