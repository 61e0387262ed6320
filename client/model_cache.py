"""The models a ClientApp process trained last, kept so that a site's next round skips rebuilding its model.

A simulation runs many sites' rounds in one Ray actor, one after another; rebuilding a site's model and reading its
weights back from disk cost 4-6 ms a round (about a fifth of the time a round spends outside training, `fedfuse
bench round-overhead`). The site's state folder stays the truth:

- an entry is found by the site's own state folder, so no model crosses between sites;
- it is used only while the model file is the very file written when it was kept (same inode, size and
  modification time) and the model is built the same way (client, data schema, model config, seed);
- a round takes its entry out and puts the model back only after the trained model was saved, so a round that
  failed, and anything that replaced the file since, leaves a model that is read from disk again;
- the process keeps at most ``max_models`` models and ``max_bytes`` of their parameters and buffers (least recently
  trained out first; a model's Python objects add about 100 KiB): with more sites than fit, the others are read
  from disk as before.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.model.multimodal import MultimodalModel

CACHE_BYTES = 64 * 2**20  # parameters and buffers kept per process, all sites together
CACHE_MODELS = 256  # models kept per process


@dataclass
class _Entry:
    model: MultimodalModel
    built_as: Any  # what the model was built from: a different value builds a different model
    file: tuple[int, int, int]  # the model file when kept: (inode, size, mtime in ns)
    size: int  # bytes of parameters and buffers


def _file_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _size(model: MultimodalModel) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class ModelCache:
    """Each site's last trained model in this process, valid while its model file is unchanged (see the module)."""

    def __init__(self, max_bytes: int = CACHE_BYTES, max_models: int = CACHE_MODELS):
        self.max_bytes, self.max_models = max_bytes, max_models
        self._entries: OrderedDict[Path, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # a thread-pool runtime may run two sites at once

    def take(self, folder: Path, model_file: Path, built_as: Any) -> MultimodalModel | None:
        """The site's model if kept and still what ``model_file`` holds, taken out of the cache; else None."""
        with self._lock:
            entry = self._entries.pop(folder, None)
        if entry is None or entry.built_as != built_as or entry.file != _file_key(model_file):
            return None
        model = entry.model
        for p in model.parameters():
            p.grad = None  # as a freshly built model: no gradient left from the last round's optimizer
        return model.train()

    def keep(self, folder: Path, model_file: Path, built_as: Any, model: MultimodalModel) -> None:
        """Keep the site's model, just saved to ``model_file`` (nothing is kept if it no longer trains as built)."""
        key = _file_key(model_file)
        size = _size(model)
        if key is None or size > self.max_bytes or not all(p.requires_grad for p in model.parameters()):
            return
        with self._lock:
            self._entries.pop(folder, None)
            self._entries[folder] = _Entry(model, built_as, key, size)
            while len(self._entries) > self.max_models or sum(e.size for e in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
