"""Training-time augmentation with multiplicity (De et al. 2022), inside record-level DP-SGD.

``train.augmentations = "acc+gyro=rotate(15)"`` names groups of modalities and what to draw for them: one
draw per record and copy, shared by the modalities of a group (both sensors of one phone turn together).
``train.multiplicity = K`` makes K augmented copies of every sampled record; their per-sample gradients
are averaged into the record's one gradient *before* clipping, so each record still moves the clipped sum
by at most C and the accounting is unchanged (the averaged gradient is a function of the one record and
its own secret draws). The draws come from the round's secret randomness, indexed by record
(:meth:`common.privacy.randomness.RoundRandomness.augmentation_draws`), never from the run's seed.

Augmentations:

- ``rotate(a)``: turn the sensor frame by a random rotation: a uniformly random axis and an angle uniform in
  [-a, a] degrees (0 < a <= 180; 180 is a uniformly random orientation), applied to every consecutive group
  of 3 channels (x, y, z) of each modality in the group. Signals whose channel count is a multiple of 3.

Evaluation never augments.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from common.data.schema import DatasetSchema
from common.errors import ConfigError

_ITEM = re.compile(r"^([a-z]+)\(([^()]*)\)$")
KNOWN = {"rotate": 3}  # name -> uniforms drawn per record, copy and group


@dataclass(frozen=True)
class Group:
    """Modalities that share one draw per record and copy, and what is drawn for them."""

    modalities: tuple[str, ...]
    name: str
    arg: float

    @property
    def width(self) -> int:
        return KNOWN[self.name]


@dataclass(frozen=True)
class Augmentation:
    """The augmentations of a run and their multiplicity K (copies per record, averaged before clipping)."""

    groups: tuple[Group, ...] = ()
    multiplicity: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.multiplicity, int) or isinstance(self.multiplicity, bool) or self.multiplicity < 1:
            raise ConfigError(f"train.multiplicity must be a positive integer, got {self.multiplicity!r}")
        if self.multiplicity > 1 and not self.groups:
            raise ConfigError("train.multiplicity > 1 needs train.augmentations (copies of a record would be identical)")

    @property
    def active(self) -> bool:
        return bool(self.groups)

    @property
    def width(self) -> int:
        """Uniforms one record needs per copy."""
        return sum(g.width for g in self.groups)

    def check(self, schema: DatasetSchema) -> None:
        """Every augmented modality this client holds must be a signal of 3-axis channel groups."""
        for group in self.groups:
            for name in group.modalities:
                if name not in schema:
                    continue  # a modality the federation has but this client does not hold
                spec = schema[name]
                if spec.kind != "signal" or spec.shape[0] % 3:
                    raise ConfigError(
                        f"train.augmentations: '{group.name}' turns 3-axis sensor signals; '{name}' is a "
                        f"{spec.kind} of shape {list(spec.shape)} (needs kind signal, channels a multiple of 3)"
                    )

    def apply(self, inputs: dict[str, torch.Tensor], draws: torch.Tensor) -> dict[str, torch.Tensor]:
        """K augmented copies of each record, record-major: (B, ...) -> (B * K, ...).

        ``draws`` (B, K, width) holds uniforms in [0, 1): row b is record b's own, so a record's copies never
        depend on the other records of the batch.
        """
        k = self.multiplicity
        out = {n: x.repeat_interleave(k, dim=0) for n, x in inputs.items()}  # (B*K, ...)
        flat = draws.reshape(-1, draws.shape[-1])  # (B*K, width)
        col = 0
        for group in self.groups:
            u = flat[:, col : col + group.width]
            col += group.width
            rotation = _rotations(u, math.radians(group.arg)).to(next(iter(out.values())).dtype)  # (B*K, 3, 3)
            for name in group.modalities:
                if name in out:
                    out[name] = _rotate(out[name], rotation)
        return out


def parse_augmentations(text: str, multiplicity: int = 1) -> Augmentation:
    """``"acc+gyro=rotate(15)"`` (groups separated by ';'); ConfigError says what is wrong and what to write."""
    groups: list[Group] = []
    seen: set[str] = set()
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        left, eq, right = (s.strip() for s in part.partition("="))
        modalities = tuple(m.strip() for m in left.split("+") if m.strip())
        match = _ITEM.match(right)
        if not eq or not modalities or not right:
            raise ConfigError(
                f"train.augmentations: expected 'modality+modality=augmentation(number)', got '{part}' "
                '(e.g. "acc+gyro=rotate(15)")'
            )
        if match is None or match.group(1) not in KNOWN:
            raise ConfigError(
                f"train.augmentations: unknown augmentation '{right}'; known: {', '.join(f'{n}(degrees)' for n in KNOWN)}"
            )
        try:
            value = float(match.group(2))
        except ValueError:
            raise ConfigError(f"train.augmentations: '{right}': '{match.group(2)}' is not a number") from None
        if not 0 < value <= 180:
            raise ConfigError(f"train.augmentations: rotate's largest angle must lie in (0, 180] degrees, got {value:g}")
        twice = seen.intersection(modalities)
        if twice:
            raise ConfigError(f"train.augmentations: modality {sorted(twice)[0]!r} is in two groups; give it one")
        seen.update(modalities)
        groups.append(Group(modalities, match.group(1), value))
    return Augmentation(tuple(groups), multiplicity)


def _rotations(u: torch.Tensor, max_angle: float) -> torch.Tensor:
    """Rotation matrices (R, 3, 3) from uniforms (R, 3): a uniform axis on the sphere, an angle in [-a, a]."""
    u = u.to(torch.float64)
    z = 2 * u[:, 0] - 1
    phi = 2 * math.pi * u[:, 1]
    r = torch.sqrt((1 - z * z).clamp(min=0))
    axis = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=1)  # (R, 3) unit vectors
    angle = (2 * u[:, 2] - 1) * max_angle  # (R,)
    kx = torch.zeros(len(u), 3, 3, dtype=torch.float64)  # cross-product matrices [k]x
    kx[:, 0, 1], kx[:, 0, 2], kx[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    kx = kx - kx.transpose(1, 2)
    s, c = torch.sin(angle).view(-1, 1, 1), torch.cos(angle).view(-1, 1, 1)
    return torch.eye(3, dtype=torch.float64) + s * kx + (1 - c) * (kx @ kx)  # Rodrigues' formula


def _rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    # x: (R, C, T), rotation: (R, 3, 3) -> each 3-channel group turned: (R, C, T)
    groups = x.reshape(x.shape[0], x.shape[1] // 3, 3, *x.shape[2:])  # (R, C/3, 3, T)
    return torch.einsum("rij,rgjt->rgit", rotation, groups).reshape(x.shape)
