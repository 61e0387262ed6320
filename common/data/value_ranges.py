"""Value ranges of a site's modalities, for the site's own eyes (``fedfuse data inspect``).

The encoders expect inputs of order 1 (after the schema's fixed ``scaling``). A modality in raw sensor
units (depth in millimetres, pressure in pascals) can keep a model at chance for a whole run without any
error, so a site looks at its ranges before it trains. The figures are computed on the site's private
records and are printed locally only: nothing here is sent anywhere, and nothing here changes the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from common.data.site_folders import Site

LARGE = 50.0  # a typical magnitude (99th percentile of |x|) above this is unlikely to be intended for the encoders
UNIT_RATIO = 100.0  # typical magnitudes of one modality this far apart across sites suggest different units
SAMPLE_VALUES = 1_000_000  # percentiles are taken over at most this many values (evenly spaced), per modality


@dataclass(frozen=True)
class Range:
    """One modality's values at one site, over its present samples (after scaling when ``scaled``)."""

    modality: str
    present: int
    min: float
    max: float
    mean: float
    std: float
    p01: float  # 1st percentile
    p99: float  # 99th percentile
    typical: float  # 99th percentile of |x|: the scale the encoder sees
    scaled: bool  # the schema declares a scaling and these figures are after it

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def modality_ranges(site: Site) -> list[Range]:
    """Every numeric modality's value range at ``site``, over the samples that have it, as the model sees it."""
    out = []
    for i, spec in enumerate(site.schema.modalities):
        rows = np.flatnonzero(site.data.mask[:, i].numpy())
        if spec.kind == "text" or len(rows) == 0:
            continue
        x = np.asarray(site.data.inputs[spec.name].numpy()[rows], dtype=np.float64).reshape(-1)  # (present * features)
        if spec.scaling is not None:
            x = (x - spec.scaling[0]) / spec.scaling[1]
        sample = x[:: max(1, len(x) // SAMPLE_VALUES)]
        p01, p99 = np.percentile(sample, [1, 99])
        out.append(
            Range(
                spec.name,
                len(rows),
                float(x.min()),
                float(x.max()),
                float(x.mean()),
                float(x.std()),
                float(p01),
                float(p99),
                float(np.percentile(np.abs(sample), 99)),
                spec.scaling is not None,
            )
        )
    return out


def range_notes(ranges: dict[str, list[Range]]) -> list[str]:
    """Likely unit mistakes: modalities far from order 1, constant ones, and ones whose scale differs across sites."""
    notes = []
    for site, rs in ranges.items():
        for r in rs:
            if r.typical > LARGE:
                notes.append(
                    f"{site}/{r.modality}: values of order {r.typical:.4g} (99th percentile of |x|) reach the "
                    "encoder; it expects values of order 1. If these are raw units (millimetres, raw counts), "
                    'declare a fixed "scaling" for the modality in schema.json, from the sensor\'s documented '
                    "units and range (docs/site-format.md)"
                )
            elif r.std == 0:
                notes.append(f"{site}/{r.modality}: every present value is {r.min:.4g}: the modality carries no information")
    by_modality: dict[str, list[tuple[str, float]]] = {}
    for site, rs in ranges.items():
        for r in rs:
            if r.typical > 0:
                by_modality.setdefault(r.modality, []).append((site, r.typical))
    for modality, values in by_modality.items():
        (lo_site, lo), (hi_site, hi) = min(values, key=lambda v: v[1]), max(values, key=lambda v: v[1])
        if hi / lo >= UNIT_RATIO:
            notes.append(
                f"{modality}: values of order {hi:.4g} at {hi_site} but {lo:.4g} at {lo_site}: the sites may "
                "record it in different units (e.g. millimetres and metres); convert to one unit"
            )
    return notes
