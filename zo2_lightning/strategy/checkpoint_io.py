"""Checkpoint files of the zo2 strategies: written atomically, read without executing code.

``Trainer(strategy="zo2_offload")`` saves and loads through :class:`AtomicCheckpointIO` unless the Trainer is
given another ``CheckpointIO`` (``plugins=[...]`` or ``ZO2OffloadStrategy(checkpoint_io=...)``).

A save streams ``torch.save`` into a hidden temporary file beside the target, fsyncs it, and ``os.replace``-s
it over the target: a process killed mid-save (SIGKILL, OOM killer, a full disk) leaves the previous checkpoint
whole and a stray ``.<name>.<pid>.<hex>.tmp`` at worst. Unlike Lightning's own atomic save, the checkpoint is not
serialized into memory first, so saving a large model does not need a second host copy of it.

A load uses ``torch.load(weights_only=True)`` unless the caller passes ``weights_only=False``
(``trainer.fit(model, ckpt_path=..., weights_only=False)``); a file that needs pickled code to load is refused
with :class:`UnsafeCheckpointError`, and a truncated or garbled one with :class:`CorruptCheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

# how torch.load(weights_only=True) says a file names code (a class or function) rather than being damaged
_NAMES_CODE = ("GLOBAL ", "add_safe_globals")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects that only load by running pickled code, and the caller did not opt in."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is truncated or is not a checkpoint at all."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and fsynced on local paths and whose loads are weights-only.

    Remote paths (``s3://`` and other fsspec URLs) are saved by Lightning's own transactional write.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` so that ``path`` holds either the old file or the whole new one.

        Args:
            checkpoint: the state Lightning dumps (``Trainer.save_checkpoint``, ``ModelCheckpoint``).
            path: the target file; its directory is created if missing.
            storage_options: not supported (as for ``TorchCheckpointIO``).

        Raises:
            TypeError: if ``storage_options`` is given.
            OSError: if the write fails (a full disk, say); the previous file at ``path`` is left as it was.
        """
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)  # refuses storage_options; fsspec remote
            return
        path = os.path.abspath(os.fspath(path))
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        # same directory: os.replace is a rename within one filesystem, atomic on POSIX and Windows
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_directory(directory)  # and the rename itself survives a power cut

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint without executing code unless ``weights_only=False`` is passed.

        Args:
            path: the checkpoint file.
            map_location: as for ``torch.load``.
            weights_only: ``None`` or ``True``: tensors and plain containers only; ``False``: full unpickling
                (for files you trust).

        Returns:
            The checkpoint dict.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            UnsafeCheckpointError: if the file needs pickled code and ``weights_only`` is not ``False``.
            CorruptCheckpointError: if the file is truncated or not a torch checkpoint.
        """
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        safe = weights_only is not False
        try:
            checkpoint = pl_load(path, map_location=map_location, weights_only=safe)
        except pickle.UnpicklingError as err:
            if safe and any(sign in str(err) for sign in _NAMES_CODE):
                raise UnsafeCheckpointError(
                    f"Refusing to load {path}: it holds objects that only load by executing pickled code"
                    f" ({_first_reason(err)}). zo2_lightning loads checkpoints weights-only. If you trust the file"
                    " (you wrote it), opt in with `trainer.fit(model, ckpt_path=..., weights_only=False)` (or"
                    " validate/test/predict with the same argument)."
                ) from err
            raise _corrupt(path, err) from err
        except (RuntimeError, EOFError, ValueError) as err:  # torch's zip reader raises RuntimeError
            raise _corrupt(path, err) from err
        if not isinstance(checkpoint, dict):
            raise CorruptCheckpointError(
                f"{path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict with 'state_dict');"
                " pass the .ckpt file that ModelCheckpoint or trainer.save_checkpoint wrote."
            )
        return checkpoint


def _first_reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("WeightsUnpickler error"):
            return line
    return lines[0] if lines else type(err).__name__


def _corrupt(path: _PATH, err: BaseException) -> CorruptCheckpointError:
    size = os.path.getsize(path) if os.path.isfile(path) else "?"
    return CorruptCheckpointError(
        f"Cannot read checkpoint {path} ({size} bytes): it is truncated or not a torch checkpoint"
        f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Resume from an earlier"
        " checkpoint of the run (ModelCheckpoint(save_top_k=-1) or save_top_k >= 2 keeps several)."
    )


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
