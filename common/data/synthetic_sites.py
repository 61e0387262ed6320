"""Site folders of the embedded synthetic dataset, for demos and tests of a deployment (``fedfuse data synth``).

A spec such as ``berlin=image+signal,paris=signal,rome=image+tabular+text`` names each site and the
modalities it holds (``text``: the synthetic dataset's optional sentences, for the built-in text encoders). Each site gets its own samples from :func:`common.data.synthetic.generate` (site k of
the spec, counted from 0, with seed ``seed + k``), restricted to its modalities, 80 % ``train`` and
20 % ``test``, written as a site folder (docs/site-format.md). The folder of sites is built in a hidden
sibling and renamed into place, so a failed write leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path

from common.errors import DataError
from common.fileio import fsync_dir

TEST_SHARE = 0.2
MIN_SAMPLES = 10  # per site: at least 2 test samples and 8 to train on
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SPEC_HELP = "NAME=MODALITY[+MODALITY...],... e.g. berlin=image+signal,paris=signal,rome=image+tabular+text"


def parse_sites(spec: str) -> dict[str, tuple[str, ...]]:
    """``"berlin=image+signal,paris=signal"`` -> ``{"berlin": ("image", "signal"), "paris": ("signal",)}``."""
    from common.data import synthetic  # here, not at import: torch (`fedfuse data --help` stays fast)

    known = synthetic.schema(text=True).names
    sites: dict[str, tuple[str, ...]] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, mods = (s.strip() for s in part.partition("="))
        if not eq or not mods:
            raise DataError(f"--sites: '{part}' names no modalities; write {SPEC_HELP}")
        if not _NAME.fullmatch(name):
            raise DataError(
                f"--sites: site name '{name}' must start with a letter or digit and contain only "
                "letters, digits, '.', '_' and '-' (it becomes a folder name)"
            )
        if name in sites:
            raise DataError(f"--sites: site '{name}' is given twice")
        modalities = tuple(m.strip() for m in mods.split("+"))
        unknown = [m for m in modalities if m not in known]
        if unknown:
            raise DataError(
                f"--sites: site '{name}': unknown modality {unknown[0]!r}; the synthetic dataset has {', '.join(known)}"
            )
        if len(set(modalities)) != len(modalities):
            raise DataError(f"--sites: site '{name}' names a modality twice ({mods})")
        sites[name] = tuple(m for m in known if m in modalities)  # schema order
    if not sites:
        raise DataError(f"--sites is empty; write {SPEC_HELP}")
    return sites


def write_synthetic_sites(
    out: str | os.PathLike[str], sites: dict[str, tuple[str, ...]], *, samples: int = 240, seed: int = 0
) -> dict[str, Path]:
    """Write one synthetic site folder per site under ``out`` (new or empty); returns name -> folder."""
    from common.data import synthetic
    from common.data.site_folders import write_site

    out = Path(out)
    if samples < MIN_SAMPLES:
        raise DataError(f"--samples must be at least {MIN_SAMPLES} per site (train and test need samples), got {samples}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty folder; choose a new --out folder or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        n_test = max(2, round(samples * TEST_SHARE))
        split = ["train"] * (samples - n_test) + ["test"] * n_test  # generate() shuffles: a random split
        for k, (name, modalities) in enumerate(sites.items()):
            text = any("text" in mods for mods in sites.values())  # the federation's modalities: one schema for all
            data = synthetic.generate(samples, seed=seed + k, text=text).restrict(modalities)
            write_site(tmp / name, data, split, name=name)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {name: out / name for name in sites}
