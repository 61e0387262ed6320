"""Per-record input transforms: fixed functions of one record, declared per modality in the run config.

``model.transforms = "acc=gravity+magnitude;gyro=magnitude"`` names, per modality, a chain of transforms
applied in order. They are part of the model (:class:`common.model.multimodal.MultimodalModel` applies them after the
schema's scaling and the zero-filling of absent inputs), so every site, every evaluation and the server's
held-out scoring apply the same ones. Each is a function of one record only, with constants fixed in
advance: no statistic over a site's records (a mean, a standard deviation) ever enters, so a record's
transformed value does not depend on any other record and DP-SGD's sensitivity is unchanged.

Transforms (``name`` or ``name(number)``):

- ``gravity`` / ``gravity(f)``: split each channel into its low-pass part (gravity) and the rest (body
  motion), as UCI HAR's preprocessing does: a 3rd-order Butterworth low-pass at ``f`` cycles per sample
  (default 0.006, UCI's 0.3 Hz at 50 Hz), run forwards and backwards over the record (no phase shift).
  C channels become 2C: the C gravity channels, then the C body channels. Signals only.
- ``magnitude``: append the Euclidean norm of each consecutive group of 3 channels (the axes of a 3-axis
  sensor; orientation-free). C channels become C + C / 3. Signals whose channel count is a multiple of 3.
- ``scale(f)``: multiply by the constant ``f`` (a fixed change of physical unit, e.g. ``scale(9.81)`` from g
  to m/s^2). Numeric kinds (image, signal, tabular).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import signal as sps

from common.data.schema import ModalitySpec
from common.errors import ConfigError

GRAVITY_CUTOFF = 0.3 / 50  # cycles per sample: UCI HAR's 0.3 Hz low-pass at 50 Hz
_ITEM = re.compile(r"^([a-z]+)(?:\(([^()]*)\))?$")


@dataclass(frozen=True)
class Transform:
    """One transform of a chain: its name and its constant (None where it takes none)."""

    name: str
    arg: float | None = None

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}({self.arg:g})"


# name -> (kinds it applies to, whether it takes a number, whether the number is required)
KNOWN: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "gravity": (("signal",), True, False),
    "magnitude": (("signal",), False, False),
    "scale": (("image", "signal", "tabular"), True, True),
}


def parse_transforms(text: str) -> dict[str, tuple[Transform, ...]]:
    """``"acc=gravity+magnitude;gyro=magnitude"`` as ``{modality: chain}``; ConfigError names what is wrong."""
    chains: dict[str, tuple[Transform, ...]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        modality, eq, chain = (s.strip() for s in part.partition("="))
        if not eq or not modality or not chain:
            raise ConfigError(
                f"model.transforms: expected 'modality=transform+transform', got '{part}' "
                '(e.g. "acc=gravity+magnitude;gyro=magnitude")'
            )
        if modality in chains:
            raise ConfigError(f"model.transforms: modality '{modality}' is named twice; give it one chain")
        chains[modality] = tuple(_parse_item(modality, item.strip()) for item in chain.split("+"))
    return chains


def _parse_item(modality: str, item: str) -> Transform:
    match = _ITEM.match(item)
    name = match.group(1) if match else item
    if match is None or name not in KNOWN:
        raise ConfigError(
            f"model.transforms: unknown transform '{item}' for modality '{modality}'; known: "
            f"{', '.join(sorted(KNOWN))} (a number in brackets where one applies, e.g. scale(9.81))"
        )
    _, takes, required = KNOWN[name]
    raw = match.group(2)
    if raw is None:
        if required:
            raise ConfigError(f"model.transforms: '{name}' for modality '{modality}' needs a number, e.g. {name}(2.0)")
        return Transform(name)
    if not takes:
        raise ConfigError(f"model.transforms: '{name}' for modality '{modality}' takes no number, got '{item}'")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"model.transforms: '{item}' for modality '{modality}': '{raw}' is not a number") from None
    if name == "gravity" and not 0 < value < 0.5:
        raise ConfigError(
            f"model.transforms: gravity's cut-off for modality '{modality}' is in cycles per sample "
            f"and must lie in (0, 0.5), got {value:g} (UCI HAR: 0.3 Hz / 50 Hz = 0.006)"
        )
    if name == "scale" and not (math.isfinite(value) and value != 0):
        raise ConfigError(f"model.transforms: scale for modality '{modality}' needs a finite non-zero factor, got {raw}")
    return Transform(name, value)


def check_modalities(chains: Mapping[str, Iterable[Transform]], modalities: Iterable[str]) -> None:
    """Every modality named in ``model.transforms`` must be one of the federation's."""
    known = list(modalities)
    unknown = sorted(set(chains) - set(known))
    if unknown:
        raise ConfigError(
            f"model.transforms names modalities the federation does not have: {unknown}; its modalities are {known}"
        )


def output_spec(spec: ModalitySpec, chain: Iterable[Transform]) -> ModalitySpec:
    """The spec the encoder sees after ``chain`` (channel counts change); ConfigError for a wrong kind or shape."""
    for t in chain:
        kinds = KNOWN[t.name][0]
        if spec.kind not in kinds:
            raise ConfigError(
                f"model.transforms: '{t}' applies to {' or '.join(kinds)} modalities; '{spec.name}' is of kind '{spec.kind}'"
            )
        if t.name == "gravity":
            spec = replace(spec, shape=(2 * spec.shape[0], *spec.shape[1:]), scaling=None)
        elif t.name == "magnitude":
            channels = spec.shape[0]
            if channels % 3:
                raise ConfigError(
                    f"model.transforms: 'magnitude' needs 3-axis channels (a multiple of 3); '{spec.name}' has {channels} here"
                )
            spec = replace(spec, shape=(channels + channels // 3, *spec.shape[1:]), scaling=None)
        else:
            spec = replace(spec, scaling=None)
    return spec


class RecordTransform:
    """A modality's chain as a function of a batch of records, each transformed on its own: (B, *shape) ->
    (B, *output shape). No parameters, no statistics; the same result for a record whatever else is in the batch."""

    def __init__(self, spec: ModalitySpec, chain: Iterable[Transform]):
        self.chain = tuple(chain)
        self.output = output_spec(spec, self.chain)  # checks kinds and shapes now, before any data
        self._sos = {
            t.arg or GRAVITY_CUTOFF: sps.butter(3, 2 * (t.arg or GRAVITY_CUTOFF), output="sos")
            for t in self.chain
            if t.name == "gravity"
        }

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.chain:
            if t.name == "gravity":
                x = self._gravity(x, t.arg or GRAVITY_CUTOFF)
            elif t.name == "magnitude":
                # x: (B, C, T) -> (B, C + C/3, T)
                axes = x.reshape(x.shape[0], x.shape[1] // 3, 3, *x.shape[2:])  # (B, C/3, 3, T)
                x = torch.cat([x, torch.linalg.vector_norm(axes, dim=2)], dim=1)
            else:
                x = x * t.arg
        return x

    def _gravity(self, x: torch.Tensor, cutoff: float) -> torch.Tensor:
        # x: (B, C, T) -> (B, 2C, T): low-pass (gravity) channels, then the remainder (body motion)
        if x.shape[0] == 0:
            return torch.cat([x, x], dim=1)
        values = x.detach().to(torch.float64).cpu().numpy()
        with np.errstate(all="ignore"):  # a non-finite record stays non-finite, on its own row only
            low = sps.sosfiltfilt(self._sos[cutoff], values, axis=-1)
        gravity = torch.as_tensor(np.ascontiguousarray(low), dtype=x.dtype, device=x.device)
        return torch.cat([gravity, x - gravity], dim=1)

    def __repr__(self) -> str:
        return "+".join(str(t) for t in self.chain)
