"""Helpers that the docs' executed blocks call (importable while the site builds)."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun(
    script: str, nproc: int, *args: str, cwd: str | None = None, timeout: float = 240
) -> str:
    """Run ``torchrun --standalone --nproc-per-node nproc script args...`` in ``cwd``; its stdout.

    One OpenMP thread per process (the docs use tiny models); a failure raises with the
    processes' stderr, which fails the strict build.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[3:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc.stdout.rstrip()


def python(script: str, *args: str, cwd: str | None = None, timeout: float = 240) -> str:
    """Run ``python script args...`` in ``cwd`` (one OpenMP thread); its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"python {script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout.rstrip()
