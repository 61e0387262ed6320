"""Crash-safe file writes: a file is either its old or its new content, never half of each."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are saved, so that light commands (`fedfuse audit`) start fast
    import torch


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename inside ``folder`` durable (best effort where the OS does not allow it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, sync_dir: bool = True) -> None:
    """Replace ``path`` by ``data``: temp file in the same folder, fsync, rename, fsync the folder.

    ``sync_dir=False`` leaves the folder's fsync to the caller, who replaces several files of one folder
    and makes all the renames durable with one :func:`fsync_dir` (the content of each is fsynced here)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_dir:
        fsync_dir(path.parent)


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (JSON has none) by None, recursively."""
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(obj: Any) -> str:
    """``obj`` as fedfuse's JSON files hold it: indented, keys in order; NaN and infinities refused (not JSON)."""
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON (:func:`json_text`), atomically."""
    atomic_write_bytes(path, (json_text(obj) + "\n").encode("utf-8"))


def atomic_save_tensors(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    *,
    sync_dir: bool = True,
) -> None:
    """Save tensors as safetensors (no pickle), atomically (``sync_dir``: see :func:`atomic_write_bytes`)."""
    from safetensors.torch import save

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=metadata), sync_dir=sync_dir)


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never executes code, unlike pickle)."""
    from safetensors.torch import load_file

    return load_file(str(path))
