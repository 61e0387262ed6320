"""Multi-modal samples in memory: per-modality tensors, a per-sample presence mask and labels.

A sample is ``{"inputs": {modality: tensor}, "mask": bool tensor (M,), "label": int}``. A
modality a sample lacks is zero-filled in ``inputs`` and ``False`` in ``mask``; every sample
has at least one modality present.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

import torch

from common.data.schema import DatasetSchema
from common.errors import DataError

_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


@dataclass(frozen=True, eq=False)
class MultimodalData:
    """N samples of the modalities in ``schema``; validated on construction."""

    schema: DatasetSchema
    inputs: dict[str, torch.Tensor]  # name -> (N, *shape), zero where absent
    mask: torch.Tensor  # (N, M) bool, column order = schema.names
    labels: torch.Tensor  # (N,) int64 in [0, num_classes)

    def __post_init__(self) -> None:
        schema = self.schema
        object.__setattr__(self, "inputs", dict(self.inputs))  # never mutate the caller's dict
        if set(self.inputs) != set(schema.names):
            missing = sorted(set(schema.names) - set(self.inputs))
            extra = sorted(set(self.inputs) - set(schema.names))
            raise DataError(
                "the samples' modalities do not match the schema: "
                + (f"missing {missing} " if missing else "")
                + (f"not in the schema {extra}" if extra else "")
                + f"(schema: {list(schema.names)})"
            )
        if not isinstance(self.labels, torch.Tensor) or self.labels.dim() != 1:
            raise DataError("labels must be a 1-D tensor of class indices")
        n = self.labels.shape[0]
        if n == 0:
            raise DataError("the dataset is empty: it needs at least one sample")
        if self.labels.dtype != torch.int64:
            raise DataError(f"labels must be int64, got {self.labels.dtype}")
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0 or hi >= schema.num_classes:
            raise DataError(f"labels must lie in [0, {schema.num_classes}), found values in [{lo}, {hi}]")
        if self.mask.dtype != torch.bool or tuple(self.mask.shape) != (n, len(schema.names)):
            raise DataError(
                f"mask must be a bool tensor of shape ({n}, {len(schema.names)}), got {self.mask.dtype} {tuple(self.mask.shape)}"
            )
        empty = (~self.mask.any(dim=1)).nonzero().flatten()
        if len(empty):
            raise DataError(
                f"{len(empty)} sample(s) have no modality present (first: index {int(empty[0])}); "
                "drop them or give them at least one modality"
            )
        for spec in schema.modalities:
            x = self.inputs[spec.name]
            if not isinstance(x, torch.Tensor):
                raise DataError(f"modality '{spec.name}': expected a tensor, got {type(x).__name__}")
            if tuple(x.shape) != (n, *spec.shape):
                raise DataError(
                    f"modality '{spec.name}': expected shape {(n, *spec.shape)} (N x {list(spec.shape)}), got {tuple(x.shape)}"
                )
            if x.dtype != torch_dtype(spec.dtype):
                raise DataError(f"modality '{spec.name}': expected dtype {spec.dtype}, got {x.dtype}")
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise DataError(f"modality '{spec.name}': contains NaN or infinite values")
            if spec.kind == "text" and len(x) and (int(x.min()) < 0 or int(x.max()) >= (spec.vocab_size or 0)):
                raise DataError(f"modality '{spec.name}': token ids must lie in [0, {spec.vocab_size})")
        # Absent modalities are zero-filled, whatever the caller passed.
        for i, name in enumerate(schema.names):
            absent = ~self.mask[:, i]
            if absent.any():
                x = self.inputs[name]
                view = absent.view(-1, *([1] * (x.dim() - 1)))
                self.inputs[name] = torch.where(view, torch.zeros((), dtype=x.dtype), x)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict:
        return {
            "inputs": {n: x[i] for n, x in self.inputs.items()},
            "mask": self.mask[i],
            "label": int(self.labels[i]),
        }

    @classmethod
    def from_samples(cls, schema: DatasetSchema, samples: Sequence[dict]) -> MultimodalData:
        """Build from per-sample dicts ``{"inputs": {name: tensor}, "label": int}``.

        A modality missing from a sample's ``inputs`` is absent for that sample.
        """
        if not samples:
            raise DataError("the dataset is empty: it needs at least one sample")
        n, names = len(samples), schema.names
        inputs = {m.name: torch.zeros((n, *m.shape), dtype=torch_dtype(m.dtype)) for m in schema.modalities}
        mask = torch.zeros((n, len(names)), dtype=torch.bool)
        labels = torch.empty(n, dtype=torch.int64)
        for i, s in enumerate(samples):
            unknown = set(s["inputs"]) - set(names)
            if unknown:
                raise DataError(
                    f"sample {i} declares modalities {sorted(unknown)} that the schema does not have (schema: {list(names)})"
                )
            for name, x in s["inputs"].items():
                spec = schema[name]
                x = torch.as_tensor(x)
                if tuple(x.shape) != spec.shape:
                    raise DataError(f"sample {i}, modality '{name}': expected shape {list(spec.shape)}, got {list(x.shape)}")
                if x.dtype != torch_dtype(spec.dtype):
                    raise DataError(f"sample {i}, modality '{name}': expected dtype {spec.dtype}, got {x.dtype}")
                inputs[name][i] = x
                mask[i, schema.index(name)] = True
            labels[i] = int(s["label"])
        return cls(schema, inputs, mask, labels)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> MultimodalData:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return MultimodalData(self.schema, {n: x[idx] for n, x in self.inputs.items()}, self.mask[idx], self.labels[idx])

    def restrict(self, names: Iterable[str]) -> MultimodalData:
        """Keep only the modalities ``names``; samples left with none are dropped."""
        schema = self.schema.restrict(list(names))
        cols = [self.schema.index(n) for n in schema.names]
        mask = self.mask[:, cols]
        keep = mask.any(dim=1).nonzero().flatten()
        if len(keep) == 0:
            raise DataError(f"no sample has any of the modalities {list(schema.names)}")
        return MultimodalData(schema, {n: self.inputs[n][keep] for n in schema.names}, mask[keep], self.labels[keep])

    def presence(self) -> dict[str, int]:
        """Number of samples that have each modality."""
        return {n: int(self.mask[:, i].sum()) for i, n in enumerate(self.schema.names)}


def hide_modalities_per_record(mask: torch.Tensor, p: float, draws: torch.Tensor) -> torch.Tensor:
    """Hide present modalities with probability ``p``, keeping at least one, from each record's own draws.

    ``draws`` (B, 2M) holds uniforms in [0, 1): row b decides record b's mask alone (M draws for hiding,
    M to pick the modality a record that lost every one keeps), so no record's mask depends on another's.
    Training takes the draws from secret per-record randomness (:mod:`common.privacy.randomness`).
    """
    if p <= 0:
        return mask
    m = mask.shape[1]
    if tuple(draws.shape) != (mask.shape[0], 2 * m):
        raise ValueError(f"draws must have shape {(mask.shape[0], 2 * m)} (B, 2M), got {tuple(draws.shape)}")
    kept = mask & ~(draws[:, :m] < p)  # (B, M)
    pick = (draws[:, m:] * mask).argmax(dim=1)  # (B,) a random present column
    one = torch.zeros_like(mask)
    one[torch.arange(len(mask)), pick] = True
    return torch.where(kept.any(dim=1, keepdim=True), kept, one)


def hide_modalities(mask: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly hide present modalities with probability ``p`` per sample, keeping at least one each.

    For building simulated datasets from a public seed (:mod:`common.data.partition`); training draws its
    modality dropout per record from secret randomness instead (:mod:`common.privacy.randomness`).
    """
    if p <= 0:
        return mask
    drop = torch.rand(mask.shape, generator=generator) < p
    kept = mask & ~drop
    # A sample that lost everything keeps one of its present modalities, chosen at random.
    lost_all = ~kept.any(dim=1)
    if lost_all.any():
        pick = (torch.rand(mask.shape, generator=generator) * mask).argmax(dim=1)  # a random present column
        one = torch.zeros_like(mask)
        one[torch.arange(len(mask)), pick] = True
        kept = torch.where(lost_all.unsqueeze(1), one, kept)
    return kept


def modality_subsets(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``names``, smallest first, in ``names`` order."""
    return [c for k in range(1, len(names) + 1) for c in combinations(names, k)]


def subset_key(names: Iterable[str]) -> str:
    """Canonical name of a modality subset, e.g. ``image+signal``."""
    return "+".join(names)
