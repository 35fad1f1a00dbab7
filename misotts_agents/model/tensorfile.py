"""A safetensors file read one tensor (or block of rows) at a time with plain file reads, never
mapped; and written one tensor at a time (:func:`write_tensorfile`, for converting checkpoints).

Why not ``safetensors.safe_open``: it maps the whole file, and every tensor read through the map
stays resident (counted in the process's resident size) until the map closes, so loading a bf16
model from the fp32 checkpoint peaks at file + model (9.9 GB for a 6.2 GB CSM-1B-size file,
benchmarks/loading.py; the 8B file alone is 32.75 GB). Here each tensor is read in pieces of at most
:data:`PIECE_BYTES` into one reusable host buffer and converted into its destination tensor
(on CUDA straight into device memory), so the peak is the model in its target dtype plus one piece.
Reads go through the page cache, which the kernel reclaims and which is not the process's memory.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a
JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the tensors' bytes, offsets relative to the end of the header, little-endian, row-major.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

PIECE_BYTES = 8 << 20  # host memory one read may use, whatever the tensor's size
MAX_HEADER_BYTES = 100 << 20  # the reference implementation's own limit

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorFileError(ValueError):
    """The file is not a readable safetensors file (bad header, offsets outside the file...)."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


class TensorFile:
    """An open safetensors file: its tensors' descriptions, and reads of one tensor at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - held open by the object; close() closes it
        try:
            self.tensors = self._read_header()
        except BaseException:
            self._file.close()
            raise
        self._buffer: torch.Tensor | None = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._buffer = None
        self._file.close()

    def _read_header(self) -> dict[str, TensorInfo]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise TensorFileError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if not 0 < length <= MAX_HEADER_BYTES or 8 + length > size:
            raise TensorFileError(f"header length {length} does not fit the file ({size} bytes)")
        try:
            header = json.loads(self._file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TensorFileError(f"header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise TensorFileError("header is not a JSON object")
        start = 8 + length
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(v) for v in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise TensorFileError(f"bad header entry for {name}: {exc!r}") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != nbytes:
                raise TensorFileError(f"{name}: offsets {begin}..{end} do not hold {entry['dtype']} {list(shape)}")
            if start + end > size:
                raise TensorFileError(f"{name} ends at byte {start + end}, past the end of the file ({size} bytes)")
            tensors[name] = TensorInfo(dtype, shape, start + begin, nbytes)
        return tensors

    def read_into(self, name: str, out: torch.Tensor, first_row: int | None = None) -> None:
        """Read tensor ``name`` into ``out`` (same shape; any dtype and device: converted piece by piece).

        With ``first_row``, ``out`` holds ``len(out)`` rows from that row on (a block of a matrix).
        """
        info = self.tensors[name]
        rows = info.shape if first_row is None else (len(out), *info.shape[1:])
        start = 0 if first_row is None else first_row * math.prod(info.shape[1:])
        bad_block = first_row is not None and not 0 <= first_row <= first_row + len(out) <= info.shape[0]
        if tuple(out.shape) != rows or bad_block or not out.is_contiguous():
            raise ValueError(f"{name}: destination {tuple(out.shape)} (row {first_row}) does not match {info.shape}")
        flat = out.view(-1)
        offset = info.offset + start * info.dtype.itemsize
        if out.dtype == info.dtype and out.device.type == "cpu":
            self._read_exactly(offset, flat.view(torch.uint8), name)  # straight into place
            return
        per_piece = max(1, PIECE_BYTES // info.dtype.itemsize)
        for first in range(0, flat.numel(), per_piece):
            count = min(per_piece, flat.numel() - first)
            raw = self._piece(count * info.dtype.itemsize, out.device)
            self._read_exactly(offset + first * info.dtype.itemsize, raw, name)
            flat[first : first + count].copy_(raw.view(info.dtype))

    def _piece(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A view of the reusable host buffer (pinned when feeding a GPU, for direct transfers)."""
        if self._buffer is None or self._buffer.numel() < nbytes:
            size = max(nbytes, 1 << 20)
            self._buffer = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        return self._buffer[:nbytes]

    def _read_exactly(self, offset: int, into: torch.Tensor, name: str) -> None:
        view = into.numpy().data.cast("B")  # the array's own buffer (typed as memoryview)
        self._file.seek(offset)
        done = 0
        while done < len(view):
            n = self._file.readinto(view[done:])
            if not n:
                raise TensorFileError(f"{name}: the file ends inside the tensor")
            done += n


def write_tensorfile(
    path: str | Path,
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file one tensor at a time: the header from ``layout`` (name: dtype,
    shape, in file order), then each tensor as ``tensors`` yields it, in the same order and
    matching its entry. Only one tensor is ever held, so a checkpoint can be converted in memory
    the size of its largest tensor."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned, as the reference writes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        expected = iter(layout.items())
        for name, tensor in tensors:
            want, (dtype, shape) = next(expected, (None, (None, None)))
            if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(f"{name} {tensor.dtype} {tuple(tensor.shape)} is not the next entry ({want})")
            out.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        left = next(expected, None)
        if left is not None:
            raise ValueError(f"no tensor given for {left[0]}")
