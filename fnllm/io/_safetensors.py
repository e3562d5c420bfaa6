"""Safetensors files for :mod:`fnllm.io` (private): atomic writes, header reading without
loading the tensors, metadata encoding and the check of a model's leaves.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import socket
import struct
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import safetensors
import safetensors.torch
import torch

from fnllm import _checks
from fnllm import tree as _tree

PathLike = str | os.PathLike

# Metadata keys fnllm writes itself; user ``meta`` may not use them.
FORMAT_KEY = "format"
STRUCTURE_KEY = "fnllm.structure"
ALIASES_KEY = "fnllm.aliases"
CONFIG_KEY = "fnllm.config"
CHECKSUMS_KEY = "fnllm.crc32"  # JSON {tensor name: CRC-32 of its bytes}
RESERVED_PREFIX = "fnllm."

# safetensors dtype names -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
MAX_HEADER = 100_000_000  # the limit safetensors itself enforces


def flat_tensors(params: Any, what: str) -> dict[str, torch.Tensor]:
    flat = _tree.flatten(params)
    for p, x in flat.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what}: leaf {p} is a {type(x).__name__}, not a tensor")
    return flat


def check_params(model: Any, flat: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Check leaves against ``model.param_shapes()``: KeyError missing/extra, ValueError shape."""
    expected = {p: tuple(s) for p, s in model.param_shapes().items()}
    missing = sorted(set(expected) - set(flat), key=natural)
    unexpected = sorted(set(flat) - set(expected), key=natural)
    desc = describe(model)
    _checks.check_keys(f"{where} do not match {desc}: ", missing, unexpected)
    wrong = [
        f"{p} has shape {tuple(flat[p].shape)}, expected {expected[p]}"
        for p in expected  # model order: embeddings first, then layer by layer
        if tuple(flat[p].shape) != expected[p]
    ]
    if wrong:
        more = f"; ... ({len(wrong)} leaves differ)" if len(wrong) > 6 else ""
        raise ValueError(f"{where} do not match {desc}: " + "; ".join(wrong[:6]) + more)


def describe(model: Any) -> str:
    try:
        cfg = model.to_config()
        return f"{type(model).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in cfg.items()) + ")"
    except Exception:  # pragma: no cover - only for odd user objects
        return repr(model)


def natural(path: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in path.split(".")]


def encode_meta(meta: Mapping[str, Any] | None) -> dict[str, str]:
    out = {FORMAT_KEY: "pt"}
    for k, v in (meta or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"save: meta key {k!r} is not a string")
        if k == FORMAT_KEY or k.startswith(RESERVED_PREFIX):
            raise ValueError(f"save: meta key {k!r} is reserved ('format' and 'fnllm.*')")
        try:
            out[k] = json.dumps(v)
        except (TypeError, ValueError) as e:
            raise TypeError(f"save: meta[{k!r}] is not JSON-serialisable: {e}") from None
    return out


def decode_meta(metadata: Mapping[str, str]) -> dict[str, Any]:
    # safetensors keeps metadata in a hash map: sort the keys so the result is deterministic
    if STRUCTURE_KEY not in metadata:  # a foreign file: hand back the raw strings
        return dict(sorted(metadata.items()))
    out = {}
    for k, v in sorted(metadata.items()):
        if k == FORMAT_KEY or k.startswith(RESERVED_PREFIX):
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# A temp file is ``.<target name>.<host>.<pid>.<8 hex>.tmp``: whoever finds it later can tell
# whether its writer may still be alive (same host, pid running) before removing it.
_TEMP = re.compile(r"^\.(?P<base>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
# Older writers named temp files ``.<target>.<pid>.<8 hex>.tmp`` (no host): removed by age only.
_OLD_TEMP = re.compile(r"^\.(?P<base>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
STALE_AFTER_S = 24 * 3600.0  # a temp file this old is a leftover whoever wrote it


def write_safetensors(
    path: PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    checksums: bool = True,
) -> None:
    """Write a flat dict of CPU contiguous unshared tensors atomically (with CRC-32s)."""
    if checksums:
        metadata = dict(metadata)
        metadata[CHECKSUMS_KEY] = json.dumps(
            {k: crc32(x) for k, x in tensors.items()}, separators=(",", ":"), sort_keys=True
        )
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def crc32(x: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (row-major, as safetensors stores them)."""
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    flat = x.contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    # numpy's stubs declare the buffer protocol (__buffer__) only for Python >= 3.12
    return zlib.crc32(memoryview(flat.view(torch.uint8).numpy()))  # type: ignore[arg-type]


def verify_checksums(
    name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Raise ValueError naming the first tensor whose bytes differ from the stored CRC-32."""
    raw = metadata.get(CHECKSUMS_KEY)
    if raw is None:  # written before checksums existed, or by another tool
        return
    try:
        stored = json.loads(raw)
        if not isinstance(stored, dict):
            raise ValueError
    except ValueError:
        raise ValueError(f"{name}: corrupt checksum metadata {CHECKSUMS_KEY!r}") from None
    for k, x in tensors.items():
        want = stored.get(k)
        if want is None:
            raise ValueError(f"{name}: tensor {k!r} has no stored checksum (corrupt header)")
        got = crc32(x)
        if got != want:
            raise ValueError(
                f"{name}: tensor {k!r} is corrupt: its CRC-32 is {got:#010x}, the file recorded "
                f"{want:#010x} when it was written (pass verify=False to load it anyway)"
            )


def temp_name(final: str) -> str:
    """A fresh temp file name next to ``final`` that records this writer's host and pid."""
    directory, base = os.path.split(final)
    return os.path.join(directory, f".{base}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def clean_temp_files(directory: PathLike, *, max_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove leftovers of interrupted atomic writes in ``directory``; return their paths.

    A temp file is removed when its writer, named in the file name, was a process on this host
    that is no longer running, or when it is older than ``max_age_s`` (a writer on another host,
    or an older fnllm). A file a live process may still be writing is never touched.
    """
    d = os.fspath(directory)
    try:
        names = os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):
        return []
    host, now, removed = _host(), time.time(), []
    for n in names:
        m = _TEMP.match(n)
        old = None if m else _OLD_TEMP.match(n)
        if not m and not old:
            continue
        p = os.path.join(d, n)
        try:
            age = now - os.stat(p, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        dead = m is not None and m.group("host") == host and not _alive(int(m.group("pid")))
        if dead or age > max_age_s:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
                removed.append(p)
    return removed


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process (or a pid we cannot ask about): assume alive
    return True


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a fresh temp file next to ``path``, fsync it, rename onto ``path``."""
    final = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(final)
    if os.path.isdir(final):
        raise IsADirectoryError(f"save: {final} is a directory")
    clean_temp_files(directory)  # leftovers of writers killed mid-save
    tmp = temp_name(final)
    # O_EXCL: never clobber; default mode 0o666 so the final file gets the usual umask'd mode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # writers such as safetensors may recreate the file as 0o600
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(path: PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate a safetensors file's layout; return ``(tensor entries, metadata)``.

    Checks everything safetensors would otherwise report as an opaque error (or not at all):
    the header length, JSON, dtypes, shapes, offsets, and that the data section is complete.
    """
    name = os.fspath(path)
    size = os.path.getsize(name)  # FileNotFoundError for a missing file
    if os.path.isdir(name):
        raise ValueError(f"{name}: is a directory, not a safetensors file")
    bad = f"{name}: not a valid safetensors file"
    if size < 8:
        raise ValueError(f"{bad} (truncated: {size} bytes, the header length alone needs 8)")
    with open(name, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, MAX_HEADER):
            raise ValueError(
                f"{bad} (truncated or corrupt: header length {n} but the file has {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{bad} (corrupt header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad} (corrupt header: not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{bad} (corrupt header: __metadata__ must map strings to strings)")
    data_len = size - 8 - n
    end_max = 0
    for key, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = entry["shape"]
            begin, end = entry["data_offsets"]
            itemsize = DTYPES[dtype][1]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{bad} (corrupt header entry for tensor {key!r}: {entry!r})"
            ) from None
        if end - begin != math.prod(shape) * itemsize:
            raise ValueError(
                f"{bad} (corrupt header: tensor {key!r} {dtype}{shape} needs "
                f"{math.prod(shape) * itemsize} bytes, offsets give {end - begin})"
            )
        if end > data_len:
            raise ValueError(
                f"{bad} (truncated: tensor {key!r} ends at byte {end} of the data section, "
                f"which has only {data_len} bytes)"
            )
        end_max = max(end_max, end)
    if end_max != data_len:
        raise ValueError(
            f"{bad} (corrupt: the data section has {data_len} bytes, tensors use {end_max})"
        )
    return header, metadata


def read_safetensors(
    path: PathLike, *, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor of a safetensors file after validating it; errors name the file.

    With ``verify``, tensors are checked against the CRC-32s fnllm stores in the metadata
    (files without them load unchecked).
    """
    name = os.fspath(path)
    header, metadata = read_header(name)
    dev = torch.device(device)
    try:
        with safetensors.safe_open(name, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in header}
    except Exception as e:  # safetensors raises its own error types for anything it dislikes
        raise ValueError(f"{name}: could not read the safetensors file: {e}") from None
    if verify:
        verify_checksums(name, tensors, metadata)
    if dev.type != "cpu":
        tensors = {k: v.to(dev) for k, v in tensors.items()}
    return tensors, metadata


class TensorStager:
    """Collect tensors for safetensors: detached, on the CPU, contiguous, sharing no memory.

    With ``dedupe``, a leaf that is exactly the same view as an earlier one (a tied weight) is
    recorded in ``aliases`` instead of being stored twice; otherwise it is copied.
    """

    def __init__(self, *, dedupe: bool) -> None:
        self.dedupe = dedupe
        self.tensors: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        self._views: dict[tuple, str] = {}  # (storage, offset, shape, stride, dtype) -> path
        self._storages: set[tuple] = set()

    def add(self, path: str, x: torch.Tensor) -> None:
        where = path or "<root>"
        if x.layout != torch.strided:
            raise TypeError(f"save: leaf {where} is a {x.layout} tensor (not strided)")
        if x.device.type == "meta":
            raise TypeError(f"save: leaf {where} is a meta tensor (it has no data)")
        x = x.detach()
        shared = False
        if x.numel() > 0:
            storage = (x.device.type, x.device.index, x.untyped_storage().data_ptr())
            view = (*storage, x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)
            if self.dedupe and view in self._views:
                self.aliases[path] = self._views[view]
                return
            self._views.setdefault(view, path)
            shared = storage in self._storages
            self._storages.add(storage)
        if x.device.type != "cpu":
            x = x.cpu()  # a fresh contiguous copy
        elif shared:
            x = x.clone(memory_format=torch.contiguous_format)
        else:
            x = x.contiguous()
        self.tensors[path] = x
