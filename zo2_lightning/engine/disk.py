"""Blocks on local disk: one safetensors file per block, read per use, replaced atomically.

``store = DiskStore("/nvme/zo2", n_blocks)``; ``store.write(i, flats)``; ``store.read_into(i, flats)``

Files are ordinary safetensors (one tensor ``seg{k}`` per dtype segment of the block), so they load
anywhere without executing code. A write goes to ``block_XXXXX.safetensors.tmp``, is fsynced, and replaces
the old file with ``os.replace``: a crash mid-write leaves the previous version intact. Reads go straight
into the caller's (reusable) buffer with ``readinto``, so the page cache, not the process, holds the file
and resident memory stays at the buffers in flight.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class DiskSpaceError(OSError):
    """Not enough free space for the offload files."""


class CorruptBlockFileError(OSError):
    """An offload file is truncated or does not hold the tensors the block expects."""


class DiskStore:
    """The host copy of every block as a file under ``root``.

    Args:
        root: a directory on a local drive (created if missing).
        blocks: number of blocks.
    """

    def __init__(self, root: str | os.PathLike, blocks: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blocks = blocks
        self.bytes_written = 0
        self.bytes_read = 0

    def path(self, i: int) -> Path:
        return self.root / f"block_{i:05d}.safetensors"

    def check_space(self, needed_bytes: int) -> None:
        """Refuse before writing anything if the drive cannot hold the files (plus one block being replaced)."""
        free = shutil.disk_usage(self.root).free
        existing = sum(self.path(i).stat().st_size for i in range(self.blocks) if self.path(i).exists())
        if free + existing < needed_bytes:
            raise DiskSpaceError(
                f"disk offload needs {needed_bytes / 2**30:.2f} GiB under {self.root} but only"
                f" {(free + existing) / 2**30:.2f} GiB is free: point offload_dir at a larger drive or use"
                " storage_dtype='bf16' to halve it."
            )

    def write(self, i: int, flats: Sequence[torch.Tensor]) -> None:
        """Atomically replace block ``i``'s file with ``flats`` (CPU tensors, one per segment)."""
        path = self.path(i)
        tmp = path.with_name(path.name + ".tmp")
        save_file({f"seg{k}": f.contiguous() for k, f in enumerate(flats)}, str(tmp), metadata={"block": str(i)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never a torn one
        self.bytes_written += sum(f.numel() * f.element_size() for f in flats)

    def _layout(self, i: int) -> tuple[int, dict]:
        path = self.path(i)
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise CorruptBlockFileError(f"cannot read the header of {path}: {e}") from e
        return 8 + n, header

    def read_into(self, i: int, outs: Sequence[torch.Tensor]) -> None:
        """Fill ``outs`` (contiguous CPU tensors, one per segment) from block ``i``'s file."""
        start, header = self._layout(i)
        path = self.path(i)
        size = path.stat().st_size
        with open(path, "rb") as fh:
            for k, out in enumerate(outs):
                meta = header.get(f"seg{k}")
                a, b = meta["data_offsets"] if meta else (0, -1)
                if meta is None or _DTYPES.get(meta["dtype"]) != out.dtype or b - a != out.numel() * out.element_size():
                    raise CorruptBlockFileError(
                        f"{path} does not hold segment {k} as {out.dtype} x {out.numel()}: the file belongs to a"
                        " different model or precision; delete the offload directory to start over."
                    )
                if start + b > size:
                    raise CorruptBlockFileError(f"{path} is truncated ({size} bytes, needs {start + b})")
                fh.seek(start + a)
                fh.readinto(memoryview(out.view(torch.uint8).numpy()))
                self.bytes_read += b - a

    def map(self, i: int, dtypes: Sequence[torch.dtype], numels: Sequence[int]) -> list[torch.Tensor]:
        """Copy-on-write memory maps of block ``i``'s segments (for reading weights without loading them)."""
        start, header = self._layout(i)
        out = []
        for k, (dtype, n) in enumerate(zip(dtypes, numels)):
            a, _ = header[f"seg{k}"]["data_offsets"]
            width = torch.empty(0, dtype=dtype).element_size()
            raw = np.memmap(self.path(i), dtype=np.uint8, mode="c", offset=start + a, shape=(n * width,))
            out.append(torch.from_numpy(raw).view(dtype))
        return out
