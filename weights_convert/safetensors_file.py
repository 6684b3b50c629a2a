"""The safetensors format, read by memory map and written one tensor at a time.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 `N`, then `N` bytes of JSON header
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the raw
little-endian data; offsets are relative to the first byte after the header.

We parse the header ourselves so that a damaged file fails with a message naming the file and the fault (truncated,
header not JSON, offsets out of range or overlapping, a dtype we do not know), and we map the data with `mmap`
(private, copy-on-write): a tensor read from the file is a view of the page cache, so loading a checkpoint in its
own dtype costs no copy and no second resident copy of the weights. `SafetensorsFile.tensor(name)` returns that
view; `release(name)` tells the kernel its pages may be dropped (used after a cast made a copy).

The writer streams: header first, then each tensor's bytes as it is produced, so a 5 GB file never sits in memory.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded; the message names the file and the fault."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset in the file (absolute)
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _index(value: object) -> int:
    """A shape entry or offset: a JSON integer >= 0 (not a float, a bool or a string of digits)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(value)
    return value


def _parse_header(path: Path, size: int, head: bytes) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Validate the header and return (tensors, metadata, data start)."""
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes, truncated?)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
    try:
        header = json.loads(head[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    except RecursionError:  # e.g. 100,000 nested '[': Python's parser gives up; a real header is two levels deep
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON object expected)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: '__metadata__' must be an object of strings "
                              f"(str -> str), got {json.dumps(metadata)[:80]}")
    start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(_index(s) for s in entry["shape"])
            begin, end = (_index(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: {entry!r}") from None
        info = TensorInfo(dtype, shape, start + begin, start + end)
        nbytes = info.numel * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} "
                                  f"{entry['dtype']} (expected {nbytes})")
        if info.end > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {info.end}, the file has "
                                  f"{size} bytes")
        tensors[name] = info
    spans = sorted((t.begin, t.end, k) for k, t in tensors.items() if t.end > t.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: corrupt safetensors file: tensors {a!r} and {b!r} overlap")
    return tensors, dict(metadata), start


class SafetensorsFile:
    """A safetensors file opened by memory map. Header-only questions (keys, shapes, dtypes) read no data."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            head += f.read(min(n, MAX_HEADER_BYTES)) if n <= MAX_HEADER_BYTES else b""
        self.info, self.metadata, self._start = _parse_header(self.path, size, head)
        self._map: mmap.mmap | None = None
        self._size = size

    def keys(self) -> list[str]:
        return list(self.info)

    def __contains__(self, key: str) -> bool:
        return key in self.info

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.info[key].dtype

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: private and writable (torch wants writable memory); the file is never modified.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor `key` as a view of the mapped file (no copy) when its offset is aligned, else a copy."""
        info = self.info[key]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        mm = self._mapped()
        if info.begin % info.dtype.itemsize:  # misaligned data: torch needs aligned memory, take a copy
            raw = bytearray(mm[info.begin:info.end])
            return torch.frombuffer(raw, dtype=info.dtype).reshape(info.shape)
        return torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=info.begin).reshape(info.shape)

    def release(self, key: str) -> None:
        """Let the kernel drop the pages of `key` from this process (after a cast made its own copy)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.info[key]
        page = mmap.PAGESIZE
        first = (info.begin + page - 1) // page * page  # only whole pages that hold nothing but this tensor
        last = info.end // page * page
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        n = 1
        for s in shape:
            n *= s
        nbytes = n * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_streaming(path: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                    tensors: Iterable[torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file whose tensors arrive one at a time, in the order of `entries`.

    entries: (name, dtype, shape) of every tensor, known up front (the header comes first); each tensor from
    `tensors` must match its entry. Peak memory is one tensor.
    """
    path = Path(path)
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("write_streaming: duplicate tensor names")
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(_header_bytes(entries, metadata))
            it: Iterator[torch.Tensor] = iter(tensors)
            for name, dtype, shape in entries:
                t = next(it, None)
                if t is None:
                    raise ValueError(f"write_streaming: no tensor for {name!r}")
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"write_streaming: tensor {name!r} is {t.dtype} {list(t.shape)}, the header "
                                     f"says {dtype} {list(shape)}")
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            if next(it, None) is not None:
                raise ValueError("write_streaming: more tensors than entries")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> Path:
    """Write a dict of tensors (sorted by name, as safetensors' own writer does)."""
    names = sorted(tensors)
    entries = [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in names]
    return write_streaming(path, entries, (tensors[k] for k in names), metadata)
