"""The ``fnllm`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fnllm`` command line.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        SystemExit: 0

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(prog="fnllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="init a small GPT, run it, print shapes and counts")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args.seed)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _demo(seed: int) -> int:
    import torch

    from fnllm import tree

    print(f"fnllm demo (torch {torch.__version__}, seed {seed})")
    print("params:", tree.count({"w": torch.zeros(2)}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
