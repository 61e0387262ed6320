"""Dataset schema: which modalities exist, their kind, shape and dtype, and the label names."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.errors import SchemaError

# Kind -> (number of dimensions of one sample, allowed dtypes). One encoder per kind (encoders.py).
KINDS: dict[str, tuple[int, tuple[str, ...]]] = {
    "image": (3, ("float32",)),  # C x H x W
    "signal": (2, ("float32",)),  # C x T (time series, audio features)
    "tabular": (1, ("float32",)),  # F
    "text": (1, ("int64",)),  # L token ids, 0 = padding
}

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class ModalitySpec:
    """One modality: a name (e.g. ``acc``), a kind (e.g. ``signal``), a per-sample shape and dtype."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    vocab_size: int | None = None  # text only: token ids lie in [0, vocab_size)
    scaling: tuple[float, float] | None = None  # (offset, scale): the model sees (x - offset) / scale; public constants

    def __post_init__(self) -> None:
        where = f"modality '{self.name}'"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise SchemaError(
                f"{where}: name must be lower-case letters, digits or '_' (start with a letter, at most 32 characters)"
            )
        if self.kind not in KINDS:
            raise SchemaError(f"{where}: unknown kind '{self.kind}'; known kinds: {sorted(KINDS)}")
        ndim, dtypes = KINDS[self.kind]
        shape = tuple(self.shape)
        if len(shape) != ndim or not all(isinstance(s, int) and s > 0 for s in shape):
            raise SchemaError(f"{where}: kind '{self.kind}' needs a shape of {ndim} positive integers, got {list(self.shape)}")
        object.__setattr__(self, "shape", shape)
        if self.dtype not in dtypes:
            raise SchemaError(f"{where}: kind '{self.kind}' needs dtype {' or '.join(dtypes)}, got '{self.dtype}'")
        if self.kind == "text":
            if not isinstance(self.vocab_size, int) or self.vocab_size < 2:
                raise SchemaError(f"{where}: kind 'text' needs an integer vocab_size >= 2")
        elif self.vocab_size is not None:
            raise SchemaError(f"{where}: vocab_size applies to kind 'text' only")
        if self.scaling is not None:
            offset, scale = self.scaling
            if self.kind == "text":
                raise SchemaError(f"{where}: scaling applies to numeric kinds, not to token ids")
            if (
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (offset, scale))
                or scale <= 0
            ):
                raise SchemaError(
                    f"{where}: scaling needs a finite offset and a scale > 0, got offset {offset!r}, scale {scale!r}"
                )
            object.__setattr__(self, "scaling", (float(offset), float(scale)))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "shape": list(self.shape), "dtype": self.dtype}
        if self.vocab_size is not None:
            out["vocab_size"] = self.vocab_size
        if self.scaling is not None:
            out["scaling"] = {"offset": self.scaling[0], "scale": self.scaling[1]}
        return out

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> ModalitySpec:
        if not isinstance(data, Mapping):
            raise SchemaError(f"modality '{name}': expected a table with kind, shape, dtype")
        unknown = set(data) - {"kind", "shape", "dtype", "vocab_size", "scaling"}
        if unknown:
            raise SchemaError(f"modality '{name}': unknown field(s) {sorted(unknown)}")
        for key in ("kind", "shape"):
            if key not in data:
                raise SchemaError(f"modality '{name}': missing field '{key}'")
        shape = data["shape"]
        if not isinstance(shape, (list, tuple)):
            raise SchemaError(f"modality '{name}': shape must be a list of integers")
        return cls(
            name=name,
            kind=data["kind"],
            shape=tuple(shape),
            dtype=data.get("dtype", "float32"),
            vocab_size=data.get("vocab_size"),
            scaling=_scaling(name, data.get("scaling")),
        )


def _scaling(name: str, value: Any) -> tuple[float, float] | None:
    """``{"offset": a, "scale": b}`` from schema.json as ``(a, b)``."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"offset", "scale"}:
        raise SchemaError(
            f'modality \'{name}\': scaling must be {{"offset": number, "scale": number}} (the model '
            f"sees (x - offset) / scale), got {value!r}"
        )
    return value["offset"], value["scale"]


@dataclass(frozen=True)
class DatasetSchema:
    """Modalities (in a fixed order: the order of the presence mask's columns) and label names."""

    modalities: tuple[ModalitySpec, ...]
    labels: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mods = tuple(self.modalities)
        if not mods:
            raise SchemaError("a schema needs at least one modality")
        names = [m.name for m in mods]
        if len(set(names)) != len(names):
            raise SchemaError(f"modality names must be unique, got {names}")
        labels = tuple(self.labels)
        if len(labels) < 2:
            raise SchemaError(f"a schema needs at least 2 labels, got {list(labels)}")
        if len(set(labels)) != len(labels):
            raise SchemaError(f"label names must be unique, got {list(labels)}")
        object.__setattr__(self, "modalities", mods)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(names)})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def __getitem__(self, name: str) -> ModalitySpec:
        try:
            return self.modalities[self._index[name]]
        except KeyError:
            raise SchemaError(f"unknown modality '{name}'; this schema has {list(self.names)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def index(self, name: str) -> int:
        """Column of ``name`` in the presence mask."""
        self[name]  # raises a clear error for unknown names
        return self._index[name]

    def restrict(self, names: tuple[str, ...] | list[str]) -> DatasetSchema:
        """The same schema with only ``names`` (kept in this schema's order)."""
        wanted = set(names)
        for n in wanted:
            self[n]
        return DatasetSchema(tuple(m for m in self.modalities if m.name in wanted), self.labels)

    def to_dict(self) -> dict[str, Any]:
        return {"modalities": {m.name: m.to_dict() for m in self.modalities}, "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetSchema:
        if not isinstance(data, Mapping):
            raise SchemaError("a schema must be a table with 'modalities' and 'labels'")
        for key in ("modalities", "labels"):
            if key not in data:
                raise SchemaError(f"schema: missing field '{key}'")
        mods = data["modalities"]
        if not isinstance(mods, Mapping):
            raise SchemaError("schema: 'modalities' must be a table of name -> {kind, shape, dtype}")
        labels = data["labels"]
        if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
            raise SchemaError("schema: 'labels' must be a list of label names")
        return cls(tuple(ModalitySpec.from_dict(n, d) for n, d in mods.items()), tuple(labels))
