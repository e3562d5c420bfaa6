"""A native threefry kernel for :mod:`fnllm.random` (private): plain C, built once per machine.

The eager fast path and the compiled dropout mask (``fnllm::keep_mask``, see ``_ops``) need
the threefry hash of many counters. Run as ~150 tensor ops it is slow; compiled by inductor it
costs tens of seconds the first time (and, fused into every kernel that reads a dropout mask,
minutes of compile). This file holds the hash as ~60 lines of C, compiled with the system C
compiler (the one inductor uses: ``$CC``, else ``cc``/``gcc``/``clang``) in well under a
second, into a shared library cached in fnllm's cache folder (:func:`cache_dir`), and called
through :mod:`ctypes`. No torch headers, no Python extension: the library only reads two key
words and writes an output buffer.

Bits are those of ``_keys._threefry`` (counters ``0 .. n-1`` with a zero high word), so every
path gives the same numbers; ``tests/test_random.py`` and ``tests/test_compile.py`` check it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Bumped with any change of the C source or of the build flags (part of the library's name).
_SOURCE = r"""
#include <stdint.h>

static inline uint32_t rotl(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

#define ROUND(r) x0 += x1; x1 = rotl(x1, r) ^ x0;

/* threefry2x32, 20 rounds, of the counter (0, c) under key (k0, k1) */
static inline void threefry(uint32_t k0, uint32_t k1, uint32_t k2, uint32_t c, uint32_t *y0,
                            uint32_t *y1) {
    uint32_t x0 = k0, x1 = c + k1;
    ROUND(13) ROUND(15) ROUND(26) ROUND(6)  x0 += k1; x1 += k2 + 1u;
    ROUND(17) ROUND(29) ROUND(16) ROUND(24) x0 += k2; x1 += k0 + 2u;
    ROUND(13) ROUND(15) ROUND(26) ROUND(6)  x0 += k0; x1 += k1 + 3u;
    ROUND(17) ROUND(29) ROUND(16) ROUND(24) x0 += k1; x1 += k2 + 4u;
    ROUND(13) ROUND(15) ROUND(26) ROUND(6)  x0 += k2; x1 += k0 + 5u;
    *y0 = x0;
    *y1 = x1;
}

static inline uint32_t threefry_bits(uint32_t k0, uint32_t k1, uint32_t k2, uint32_t c) {
    uint32_t x0, x1;
    threefry(k0, k1, k2, c, &x0, &x1);
    return x0 ^ x1;
}

#define KEYS uint32_t k2 = k0 ^ k1 ^ 0x1BD11BDAu;

/* 32 random bits per counter, as int64 (fnllm's default layout of random.bits) */
void fnllm_bits_i64(uint32_t k0, uint32_t k1, int64_t start, int64_t n, int64_t *out) {
    KEYS
    for (int64_t i = 0; i < n; i++)
        out[i] = (int64_t)threefry_bits(k0, k1, k2, (uint32_t)(start + i));
}

/* float32 in [0, 1) from the top 23 bits, as JAX builds them */
void fnllm_unit_f32(uint32_t k0, uint32_t k1, int64_t start, int64_t n, float *out) {
    KEYS
    for (int64_t i = 0; i < n; i++)
        out[i] = (float)(threefry_bits(k0, k1, k2, (uint32_t)(start + i)) >> 9) * 0x1p-23f;
}

/* both words per counter (new keys: split, fold_in), as int64 pairs */
void fnllm_pairs_i64(uint32_t k0, uint32_t k1, int64_t start, int64_t n, int64_t *out) {
    KEYS
    for (int64_t i = 0; i < n; i++) {
        uint32_t x0, x1;
        threefry(k0, k1, k2, (uint32_t)(start + i), &x0, &x1);
        out[2 * i] = (int64_t)x0;
        out[2 * i + 1] = (int64_t)x1;
    }
}

/* uniform < p for a float32 p: (bits >> 9) < threshold, threshold = ceil(p * 2**23) */
void fnllm_below_u8(uint32_t k0, uint32_t k1, int64_t start, int64_t n, uint32_t threshold,
                    uint8_t *out) {
    KEYS
    for (int64_t i = 0; i < n; i++)
        out[i] = (threefry_bits(k0, k1, k2, (uint32_t)(start + i)) >> 9) < threshold;
}
"""
_VERSION = "2"
# Work is split into chunks of this many values, run on up to torch.get_num_threads() threads.
_CHUNK = 1 << 16
_CACHE_VARIABLE = "FNLLM_CACHE_DIR"

_STATE: dict[str, Any] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """fnllm's cache folder: ``$FNLLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fnllm``, else
    ``~/.cache/fnllm``.

    It holds the native random kernel (``native/``) and, where :func:`fnllm.train.fit` or
    :func:`fnllm.train.enable_compile_cache` puts them, torch's compile caches (``inductor/``).
    Deleting it is always safe: everything in it is rebuilt on demand.

    Example:
        >>> from fnllm.random._native import cache_dir
        >>> cache_dir().name != ""
        True

    Returns:
        The folder (not created here).
    """
    env = os.environ.get(_CACHE_VARIABLE, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fnllm"


def _compiler() -> str | None:
    cc = os.environ.get("CC", "").split()
    if cc and shutil.which(cc[0]):
        return cc[0]
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-std=c99"]
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        flags.append("-march=native")  # the library is built on, and for, this machine
    return flags


def _cpu_id() -> str:
    try:  # -march=native: a library built on another CPU (a shared home folder) is not reused
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    return line
    except OSError:
        pass
    return platform.processor()


def library_path(compiler: str) -> Path:
    """Where the library for this source, compiler, flags and CPU lives in the cache."""
    tag = "\0".join([_VERSION, _SOURCE, compiler, " ".join(_flags()), _cpu_id(), sys.platform])
    digest = hashlib.sha256(tag.encode()).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return cache_dir() / "native" / f"threefry-{digest}{suffix}"


def is_built() -> bool:
    """Whether the library is already loaded or on disk (so loading it costs milliseconds)."""
    if "lib" in _STATE:
        return True
    cc = _compiler()
    return cc is not None and library_path(cc).is_file()


def load() -> ctypes.CDLL:
    """Load the library, building it first if the cache has none (raises if that fails)."""
    lib = _STATE.get("lib")
    if lib is not None:
        return lib
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]
        if "error" in _STATE:
            raise RuntimeError(_STATE["error"])
        try:
            lib = _load_or_build()
        except Exception as e:
            _STATE["error"] = f"{type(e).__name__}: {e}"
            raise
        _STATE["lib"] = lib
        return lib


def _load_or_build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
    path = library_path(cc)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src = Path(tmp) / "threefry.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / path.name
            cmd = [cc, *_flags(), str(src), "-o", str(out)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
            os.replace(out, path)  # atomic: a concurrent process sees all of it or nothing
    lib = ctypes.CDLL(str(path))
    u32, i64, ptr = ctypes.c_uint32, ctypes.c_int64, ctypes.c_void_p
    lib.fnllm_bits_i64.argtypes = [u32, u32, i64, i64, ptr]
    lib.fnllm_unit_f32.argtypes = [u32, u32, i64, i64, ptr]
    lib.fnllm_below_u8.argtypes = [u32, u32, i64, i64, u32, ptr]
    lib.fnllm_pairs_i64.argtypes = [u32, u32, i64, i64, ptr]
    for f in (lib.fnllm_bits_i64, lib.fnllm_unit_f32, lib.fnllm_below_u8, lib.fnllm_pairs_i64):
        f.restype = None
    return lib


def _pool(threads: int) -> ThreadPoolExecutor:
    pool = _STATE.get("pool")
    owner = (os.getpid(), threads)  # a forked child (a data-loader worker) has no pool threads
    if pool is None or _STATE.get("pool_owner") != owner:
        if pool is not None and _STATE.get("pool_owner", (None,))[0] == os.getpid():
            pool.shutdown(wait=False)
        pool = _STATE["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="fnllm-threefry")
        _STATE["pool_owner"] = owner
    return pool


def pairs(k0: int, k1: int, start: int, n: int) -> Tensor:
    """Both threefry words of the counters ``start .. start + n - 1``: int64 ``[n, 2]``."""
    out = torch.empty(n, 2, dtype=torch.int64)
    load().fnllm_pairs_i64(k0, k1, start, n, out.data_ptr())
    return out


def draw(kind: str, k0: int, k1: int, n: int, threshold: int = 0) -> Tensor:
    """``n`` values of ``kind`` for the key words ``(k0, k1)``, on the CPU, flat.

    Kinds: ``"bits"`` (int64 holding uint32), ``"unit"`` (float32 in [0, 1)), ``"below"``
    (bool: ``(bits >> 9) < threshold``, i.e. a float32 uniform below ``threshold * 2**-23``).
    ctypes releases the GIL, so chunks run in parallel on ``torch.get_num_threads()`` threads.
    """
    lib = load()
    dtype = {"bits": torch.int64, "unit": torch.float32, "below": torch.bool}[kind]
    out = torch.empty(n, dtype=dtype)
    fn = {"bits": lib.fnllm_bits_i64, "unit": lib.fnllm_unit_f32, "below": lib.fnllm_below_u8}[kind]
    extra = (threshold,) if kind == "below" else ()
    base, size = out.data_ptr(), out.element_size()

    def run(start: int, stop: int) -> None:
        fn(k0, k1, start, stop - start, *extra, base + start * size)

    threads = max(1, min(torch.get_num_threads(), (n + _CHUNK - 1) // _CHUNK))
    if threads == 1:
        run(0, n)
        return out
    step = (n + threads - 1) // threads
    futures = [_pool(threads).submit(run, s, min(n, s + step)) for s in range(0, n, step)]
    for f in futures:
        f.result()
    return out
