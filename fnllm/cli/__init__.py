"""The ``fnllm`` command line: one module per command, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# Each name is a module ``fnllm.cli.<name>`` whose ``register(sub)`` adds its subcommand and
# sets ``run(args, parser) -> int`` as the parser default. A new command is a module plus a name.
_COMMANDS = ("demo", "pretrain", "generate")


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
    """
    from fnllm import __version__

    parser = argparse.ArgumentParser(prog="fnllm", description="fnllm command line")
    parser.add_argument("--version", action="version", version=f"fnllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"fnllm.cli.{name}").register(sub)
    args = parser.parse_args(argv)
    return int(args.run(args, parser))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
