"""Safetensors files written one tensor at a time, in bounded memory.

`safetensors.save_file` needs every tensor of a file in memory at once: a 5 GB shard of a 70B
checkpoint is 5 GB of host memory on top of the model. Here the tensors' names, shapes and
dtypes are known up front (from the model config), so each file's header is written first and
the tensors' bytes are appended as they arrive: the writer holds no tensor data at all. The
files are the format's own layout (an 8-byte little-endian header length, the JSON header with
each tensor's dtype, shape and `data_offsets`, the concatenated little-endian bytes), read back
by `safetensors.safe_open` and transformers like any other.
"""

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

# numpy dtype name -> the format's dtype code
_DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32",
                "int64": "I64"}


class TensorSpec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: str  # a numpy dtype name, a key of _DTYPE_CODES

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _itemsize(self.dtype)


def _itemsize(dtype: str) -> int:
    return (np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)).itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most `max_shard_bytes` (a bigger tensor gets its own file)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: Sequence[TensorSpec], metadata: dict | None) -> bytes:
    entries, offset = {}, 0
    for spec in specs:
        entries[spec.name] = {"dtype": _DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    if metadata:
        entries["__metadata__"] = metadata
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensor data then starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


class ShardedWriter:
    """Writes `specs` (in that order) into `directory` as `{prefix}.safetensors`, or shards
    `{prefix}-0000k-of-0000n.safetensors` with `{prefix}.safetensors.index.json`.

    `add(name, array)` takes the next tensor; `close()` checks that every one came and writes
    the index. Nothing is cleaned up on error: the caller writes into a staging directory that
    it removes (hf_io.save_hf, sparse_export.publish_dir).
    """

    def __init__(self, directory: str | os.PathLike, specs: Sequence[TensorSpec], *,
                 prefix: str = "model", max_shard_bytes: int, metadata: dict | None = None):
        if len({s.name for s in specs}) != len(specs):
            raise ValueError("tensor names repeat in the write plan")
        self.directory, self.prefix, self.metadata = Path(directory), prefix, metadata
        self.shards = plan_shards(specs, max_shard_bytes)
        self._shard, self._index, self._file = 0, 0, None

    def file_name(self, shard: int) -> str:
        if len(self.shards) == 1:
            return f"{self.prefix}.safetensors"
        return f"{self.prefix}-{shard + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def add(self, name: str, array: np.ndarray) -> None:
        if self._shard == len(self.shards):
            raise ValueError(f"tensor {name} comes after the last planned tensor")
        spec = self.shards[self._shard][self._index]
        dtype = np.dtype(array.dtype).name
        if (name, tuple(array.shape), dtype) != tuple(spec):
            raise ValueError(f"tensor {name} {tuple(array.shape)} {dtype} arrived where the "
                             f"plan has {spec.name} {spec.shape} {spec.dtype}")
        if self._file is None:
            self._file = open(self.directory / self.file_name(self._shard), "wb")
            self._file.write(_header(self.shards[self._shard], self.metadata))
        data = np.ascontiguousarray(array)
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        self._file.write(memoryview(data.reshape(-1).view(np.uint8)))
        self._index += 1
        if self._index == len(self.shards[self._shard]):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file, self._shard, self._index = None, self._shard + 1, 0

    def close(self) -> list[str]:
        """The files written; the index too when there are several."""
        if not self.shards[0]:  # nothing to write: one file of metadata alone
            with open(self.directory / self.file_name(0), "wb") as f:
                f.write(_header([], self.metadata))
            self._shard = 1
        if self._shard != len(self.shards):
            missing = [s.name for s in self.shards[self._shard][self._index:]]
            if self._file is not None:
                self._file.close()
            raise ValueError(f"the write stopped before tensor {missing[0]}")
        files = [self.file_name(k) for k in range(len(self.shards))]
        if len(self.shards) > 1:
            weight_map = {s.name: files[k] for k, shard in enumerate(self.shards) for s in shard}
            total = sum(s.nbytes for shard in self.shards for s in shard)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(
                weight_map.items()))}
            path = self.directory / f"{self.prefix}.safetensors.index.json"
            path.write_text(json.dumps(index, indent=2) + "\n")
            files.append(path.name)
        return files


def write_tensors(directory: str | os.PathLike, specs: Sequence[TensorSpec],
                  tensors: Iterable[tuple[str, np.ndarray]], **kwargs) -> list[str]:
    """All of `tensors` (in the order of `specs`) through one ShardedWriter."""
    writer = ShardedWriter(directory, specs, **kwargs)
    for name, array in tensors:
        writer.add(name, array)
    return writer.close()
