"""Site data on disk: one folder per site (schema.json, index.csv, one .npy per modality).

Layout (see docs/site-format.md)::

    <site>/schema.json     {"format": "fedfuse-site", "version": 1, "name": ..., "modalities": {...},
                            "labels": [...], "splits": [...]}
    <site>/index.csv       sample,split,label,<modality 1>,...   one row per sample, presence as 1/0
    <site>/<modality>.npy  (N, *shape) of the declared dtype; rows of samples that lack it are zeros

``validate_site`` reports every problem it finds; ``load_site`` refuses a folder with any problem;
``write_site`` builds a folder in a temporary sibling and renames it into place.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data.samples import MultimodalData
from common.data.schema import DatasetSchema, ModalitySpec
from common.errors import DataError, SchemaError
from common.fileio import fsync_dir

log = logging.getLogger(__name__)

FORMAT = "fedfuse-site"
VERSION = 1
SCHEMA_FILE = "schema.json"
INDEX_FILE = "index.csv"
INDEX_COLUMNS = ("sample", "split", "label")  # then one presence column per modality, schema order
SCHEMA_FIELDS = ("format", "version", "name", "modalities", "labels", "splits")
MAX_LISTED = 10  # per-row problems of one kind listed one by one; the rest are counted in one line
CHUNK_BYTES = 32 * 2**20  # .npy files are scanned in chunks of about this many bytes
_INT = re.compile(r"-?[0-9]+")
_PRESENCE, _UNKNOWN = {"1": 1, "0": 0}, 2  # presence cell -> code; _UNKNOWN: neither "1" nor "0"
_SPLIT_ORDER = {"train": 0, "test": 2}  # order of "splits" in schema.json: train, others, test
TRAIN_SPLIT, TEST_SPLIT = "train", "test"  # the split names fedfuse uses; samples of other splits are not used
SPLIT_ROLES = {TRAIN_SPLIT: "training", TEST_SPLIT: "held-out evaluation"}
_NEAR_SPLITS = {
    "training": TRAIN_SPLIT,
    "trn": TRAIN_SPLIT,
    "testing": TEST_SPLIT,
    "tst": TEST_SPLIT,
    "eval": TEST_SPLIT,
    "evaluation": TEST_SPLIT,
    "heldout": TEST_SPLIT,
    "held-out": TEST_SPLIT,
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a site folder: the file, the field within it, and what is wrong."""

    file: str  # e.g. "index.csv", "acc.npy", "schema.json", "." (the folder itself)
    field: str  # e.g. "row 17, column 'label'", "shape", "modalities.acc"; "" for the whole file
    message: str

    def __str__(self) -> str:
        where = f"{self.file}, {self.field}" if self.field else self.file
        return f"{where}: {self.message}"


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field is ambiguous
class Site:
    """One site's samples, loaded from its folder, with each sample's split name."""

    name: str
    path: Path
    data: MultimodalData
    split: tuple[str, ...]  # split name of each sample, aligned with data

    @property
    def schema(self) -> DatasetSchema:
        return self.data.schema

    def part(self, split: str) -> MultimodalData | None:
        """The samples of ``split``; None if the site has none."""
        idx = [i for i, s in enumerate(self.split) if s == split]
        return self.data.subset(idx) if idx else None


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def write_site(
    path: str | os.PathLike,
    data: MultimodalData,
    split: Sequence[str],
    *,
    name: str,
    overwrite: bool = False,
    sample_ids: Sequence[str] | None = None,
) -> Path:
    """Write ``data`` as a site folder at ``path``, atomically; returns the folder's path.

    ``split`` gives each sample's split name; ``sample_ids`` (default ``"0"``, ``"1"``, ...) must
    be unique. The folder is built in a hidden temporary sibling, fsynced, then renamed into place;
    an existing folder is refused unless ``overwrite``, and then swapped out only once the new one
    is complete.
    """
    path = Path(path)
    n = len(data)
    split = tuple(split)
    ids = tuple(str(i) for i in range(n)) if sample_ids is None else tuple(sample_ids)
    # Check the arguments before touching the disk
    if not isinstance(name, str) or not name.strip():
        raise DataError("write_site: name must be a non-empty string (the site's name)")
    if len(split) != n:
        raise DataError(f"write_site: split has {len(split)} entries for {n} samples; give one split name per sample")
    bad = sorted({repr(s) for s in split if not isinstance(s, str) or not s})
    if bad:
        raise DataError(f"write_site: split names must be non-empty strings, got {', '.join(bad)}")
    if len(ids) != n:
        raise DataError(f"write_site: sample_ids has {len(ids)} entries for {n} samples")
    if any(not isinstance(s, str) or not s for s in ids):
        raise DataError("write_site: sample ids must be non-empty strings")
    dupes = [s for s, c in Counter(ids).items() if c > 1]
    if dupes:
        raise DataError(f"write_site: sample ids must be unique; repeated: {dupes[:5]}")
    if path.exists() and not overwrite:
        raise DataError(f"{path} already exists; remove it or pass overwrite=True (--overwrite) to replace it")

    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"  # hidden: not a site yet
    tmp.mkdir()  # (mkdtemp would make it private to this user)
    try:
        # Build the complete folder next to its final place
        splits = sorted(set(split), key=lambda s: (_SPLIT_ORDER.get(s, 1), s))
        doc = {"format": FORMAT, "version": VERSION, "name": name, **data.schema.to_dict(), "splits": splits}
        with open(tmp / SCHEMA_FILE, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            _sync(f)
        mask = data.mask.numpy().astype(np.int8)  # (N, M)
        labels = data.labels.tolist()
        with open(tmp / INDEX_FILE, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow([*INDEX_COLUMNS, *data.schema.names])
            for i in range(n):
                writer.writerow([ids[i], split[i], labels[i], *mask[i].tolist()])
            _sync(f)
        for spec in data.schema.modalities:
            with open(tmp / f"{spec.name}.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(data.inputs[spec.name].numpy()), allow_pickle=False)
                _sync(f)
        fsync_dir(tmp)
        # Swap it into place: the old folder (if any) goes only once the new one is complete
        old = None
        if path.exists():
            old = parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        fsync_dir(parent)
        if old is not None and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote site '%s' (%d samples) to %s", name, n, path)
    return path


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


class _Problems:
    """Collects problems; per-row problems of one kind beyond MAX_LISTED are only counted."""

    def __init__(self) -> None:
        self.items: list[Problem] = []
        self._seen: Counter = Counter()
        self._more: dict[tuple[str, str], str] = {}

    def add(self, file: str, field: str, message: str, *, kind: str | None = None) -> None:
        if kind is not None:
            self._seen[(file, kind)] += 1
            if self._seen[(file, kind)] > MAX_LISTED:
                self._more[(file, kind)] = kind
                return
        self.items.append(Problem(file, field, message))

    def done(self) -> list[Problem]:
        for (file, kind), _ in self._more.items():
            extra = self._seen[(file, kind)] - MAX_LISTED
            self.items.append(Problem(file, "", f"{extra} more row(s) with the same problem: {kind}"))
        return self.items


@dataclass
class _Parsed:
    """What validation learnt about a folder; load_site builds the Site from it."""

    doc: dict | None = None
    schema: DatasetSchema | None = None
    splits: tuple[str, ...] | None = None
    ids: list[str] | None = None
    split: list[str] | None = None
    labels: np.ndarray | None = None  # (N,) int64
    presence: dict[str, np.ndarray] | None = None  # modality -> (N,) uint8 (1, 0, _UNKNOWN), schema columns


def validate_site(path: str | os.PathLike) -> list[Problem]:
    """Every problem found in the site folder ``path`` (empty if the folder is a valid site)."""
    return _check(Path(path))[0]


def _check(path: Path) -> tuple[list[Problem], _Parsed]:
    out = _Problems()
    parsed = _Parsed()
    if not path.is_dir():
        out.add(".", "", f"{path} is not a folder" + ("" if path.exists() else " (it does not exist)"))
        return out.done(), parsed
    _check_schema(path, out, parsed)
    _check_index(path, out, parsed)
    _check_arrays(path, out, parsed)
    return out.done(), parsed


def _check_schema(path: Path, out: _Problems, parsed: _Parsed) -> None:
    f = SCHEMA_FILE
    file = path / f
    if not file.is_file():
        out.add(f, "", "missing; every site folder needs a schema.json (see docs/site-format.md)")
        return
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        out.add(f, "", f"cannot be read: {exc}")
        return
    except json.JSONDecodeError as exc:
        out.add(f, f"line {exc.lineno}, column {exc.colno}", f"malformed JSON: {exc.msg}")
        return
    if not isinstance(doc, dict):
        out.add(f, "", f"must be a JSON object with fields {list(SCHEMA_FIELDS)}, got {type(doc).__name__}")
        return
    parsed.doc = doc
    for key in SCHEMA_FIELDS:
        if key not in doc:
            out.add(f, key, "missing field")
    for key in sorted(set(doc) - set(SCHEMA_FIELDS)):
        out.add(f, key, f"unknown field; known fields: {list(SCHEMA_FIELDS)}")
    if "format" in doc and doc["format"] != FORMAT:
        out.add(f, "format", f"unknown format {doc['format']!r}; expected {FORMAT!r}")
    if "version" in doc and (type(doc["version"]) is not int or doc["version"] != VERSION):
        newer = type(doc["version"]) is int and doc["version"] > VERSION
        out.add(
            f,
            "version",
            f"unsupported version {doc['version']!r}; this fedfuse reads version {VERSION}"
            + (" (the folder was written by a newer fedfuse: upgrade)" if newer else ""),
        )
    if "name" in doc and (not isinstance(doc["name"], str) or not doc["name"].strip()):
        out.add(f, "name", f"must be a non-empty string, got {doc['name']!r}")
    if "splits" in doc:
        splits = doc["splits"]
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) and s for s in splits):
            out.add(f, "splits", f"must be a non-empty list of split names (e.g. ['train', 'test']), got {splits!r}")
        elif len(set(splits)) != len(splits):
            out.add(f, "splits", f"split names must be unique, got {splits}")
        else:
            parsed.splits = tuple(splits)
    if "modalities" in doc and "labels" in doc:
        parsed.schema = _schema_from(doc, out)


def _schema_from(doc: Mapping[str, Any], out: _Problems) -> DatasetSchema | None:
    """The DatasetSchema of ``doc``, checking each modality on its own so that all problems show."""
    try:
        return DatasetSchema.from_dict({"modalities": doc["modalities"], "labels": doc["labels"]})
    except SchemaError as exc:
        first = exc
    # Find every problem: each modality alone, then the labels with the valid modalities
    before = len(out.items)
    mods, specs = doc["modalities"], []
    if isinstance(mods, Mapping) and mods:
        for name, d in mods.items():
            try:
                specs.append(ModalitySpec.from_dict(name, d))
            except SchemaError as exc:
                out.add(SCHEMA_FILE, f"modalities.{name}", str(exc))
    elif isinstance(mods, Mapping):
        out.add(SCHEMA_FILE, "modalities", "a site needs at least one modality")
    else:
        out.add(SCHEMA_FILE, "modalities", "must be an object of name -> {kind, shape, dtype}")
    # A placeholder modality lets DatasetSchema check the labels when no modality is valid
    stand_in = [ModalitySpec("placeholder", "tabular", (1,))]
    try:
        modalities = {m.name: m.to_dict() for m in specs or stand_in}
        DatasetSchema.from_dict({"modalities": modalities, "labels": doc["labels"]})
    except SchemaError as exc:
        out.add(SCHEMA_FILE, "labels", str(exc))
    if len(out.items) == before:  # not attributed to one field: report it as it came
        out.add(SCHEMA_FILE, "", str(first))
    return None


def _check_index(path: Path, out: _Problems, parsed: _Parsed) -> None:
    f = INDEX_FILE
    file = path / f
    if not file.is_file():
        out.add(f, "", "missing; every site folder needs an index.csv (one row per sample)")
        return
    schema, splits = parsed.schema, parsed.splits
    try:
        with open(file, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh, strict=True)
            try:
                header = next(reader, None)
            except csv.Error as exc:
                out.add(f, "header", f"malformed CSV: {exc}")
                return
            if not header:
                out.add(f, "", "empty; expected a header line " + ",".join([*INDEX_COLUMNS, "<modality>", "..."]))
                return
            columns = _check_header(header, schema, out)
            if columns is None:
                return
            ids: list[str] = []
            split_of: list[str] = []
            labels: list[int] = []
            present: dict[str, bytearray] = {m: bytearray() for m in columns}
            first_row: dict[str, int] = {}
            i = -1
            try:
                for i, row in enumerate(reader):
                    _check_row(i, row, header, columns, schema, splits, first_row, out, ids, split_of, labels, present)
            except csv.Error as exc:
                out.add(f, f"row {i + 1}", f"malformed CSV (line {reader.line_num}): {exc}; later rows were not read")
                return
    except (OSError, UnicodeDecodeError) as exc:
        out.add(f, "", f"cannot be read: {exc}")
        return
    if not ids:
        out.add(f, "", "has no samples; a site needs at least one row after the header")
        return
    parsed.ids, parsed.split, parsed.labels = ids, split_of, np.asarray(labels, dtype=np.int64)
    parsed.presence = {m: np.frombuffer(bytes(b), dtype=np.uint8) for m, b in present.items()}


def _check_header(header: list[str], schema: DatasetSchema | None, out: _Problems) -> dict[str, int] | None:
    """Column index of each presence column, or None when the header is beyond use."""
    f = INDEX_FILE
    if tuple(header[:3]) != INDEX_COLUMNS:
        out.add(f, "header", f"must start with {','.join(INDEX_COLUMNS)}, got {','.join(header[:3])}")
        return None
    mods = header[3:]
    dupes = sorted(m for m, c in Counter(mods).items() if c > 1)
    if dupes:
        out.add(f, "header", f"repeated presence column(s) {dupes}")
    if not mods:
        out.add(f, "header", "no presence columns; add one column per modality in schema.json")
    columns = {m: 3 + i for i, m in enumerate(mods) if m not in dupes}
    if schema is None:
        return columns
    names = list(schema.names)
    for m in mods:
        if m not in schema:
            out.add(f, f"column '{m}'", "presence column for a modality that schema.json does not declare")
    for m in names:
        if m not in mods:
            out.add(f, "header", f"no presence column for modality '{m}' declared in schema.json")
    ordered = [m for m in mods if m in schema]
    if ordered != [m for m in names if m in mods]:
        out.add(f, "header", f"presence columns must follow schema.json's modality order {names}, got {mods}")
    return {m: c for m, c in columns.items() if m in schema}


def _check_row(
    i: int,
    row: list[str],
    header: list[str],
    columns: dict[str, int],
    schema: DatasetSchema | None,
    splits: tuple[str, ...] | None,
    first_row: dict[str, int],
    out: _Problems,
    ids: list[str],
    split_of: list[str],
    labels: list[int],
    present: dict[str, bytearray],
) -> None:
    f = INDEX_FILE
    if len(row) != len(header):
        out.add(f, f"row {i}", f"has {len(row)} fields, the header has {len(header)}", kind="wrong number of fields")
        row = (row + [""] * len(header))[: len(header)]
    sample, split, label = row[0], row[1], row[2]
    # Sample id
    if not sample:
        out.add(f, f"row {i}, column 'sample'", "empty sample id", kind="empty sample id")
    elif sample in first_row:
        out.add(
            f,
            f"row {i}, column 'sample'",
            f"sample id {sample!r} already used in row {first_row[sample]}",
            kind="duplicate sample id",
        )
    else:
        first_row[sample] = i
    # Split
    if splits is not None and split not in splits:
        out.add(
            f, f"row {i}, column 'split'", f"unknown split {split!r}; schema.json declares {list(splits)}", kind="unknown split"
        )
    # Label
    value = -1
    if not _INT.fullmatch(label):
        out.add(f, f"row {i}, column 'label'", f"label {label!r} is not an integer", kind="label not an integer")
    else:
        value = int(label)
        if schema is not None and not 0 <= value < schema.num_classes:
            out.add(
                f,
                f"row {i}, column 'label'",
                f"label {value} is out of range [0, {schema.num_classes})",
                kind="label out of range",
            )
    # Presence
    any_present = False
    for m, c in columns.items():
        v = row[c]
        if v not in ("0", "1"):
            out.add(f, f"row {i}, column '{m}'", f"presence must be 1 or 0, got {v!r}", kind=f"bad presence ({m})")
        any_present |= v == "1"
        present[m].append(_PRESENCE.get(v, _UNKNOWN))
    if columns and not any_present and all(row[c] in ("0", "1") for c in columns.values()):
        out.add(f, f"row {i}", "sample has no modality present; drop it or mark a modality present", kind="no modality present")
    ids.append(sample)
    split_of.append(split)
    labels.append(value)


def _check_arrays(path: Path, out: _Problems, parsed: _Parsed) -> None:
    schema = parsed.schema
    declared = parsed.doc.get("modalities") if parsed.doc is not None else None
    if isinstance(declared, Mapping):  # without a readable list of modalities, no file is "extra"
        for extra in sorted(p.name for p in path.glob("*.npy") if p.stem not in declared):
            out.add(extra, "", "array for a modality that schema.json does not declare; declare it or remove the file")
    if schema is None:
        return
    n = len(parsed.ids) if parsed.ids is not None else None
    for spec in schema.modalities:
        presence = parsed.presence.get(spec.name) if parsed.presence is not None else None
        _check_array(path, spec, n, presence, out)


def _check_array(path: Path, spec: ModalitySpec, n: int | None, presence: np.ndarray | None, out: _Problems) -> None:
    f = f"{spec.name}.npy"
    file = path / f
    if not file.is_file():
        out.add(f, "", f"missing; modality '{spec.name}' is declared in schema.json")
        return
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        out.add(f, "", f"not a readable .npy array: {exc}")
        return
    if not isinstance(arr, np.ndarray):
        out.add(f, "", "not a single .npy array")
        return
    ok = True
    if arr.dtype != np.dtype(spec.dtype):
        out.add(f, "dtype", f"dtype {arr.dtype} does not match schema.json's {spec.dtype}")
        ok = False
    if arr.ndim != 1 + len(spec.shape) or tuple(arr.shape[1:]) != spec.shape:
        expected = ", ".join(map(str, spec.shape))
        out.add(f, "shape", f"shape {list(arr.shape)} does not match (N, {expected}) from schema.json")
        ok = False
    elif n is not None and arr.shape[0] != n:
        out.add(f, "rows", f"{arr.shape[0]} rows but index.csv has {n} samples")
        presence = None
    if not ok:
        return
    if presence is None:  # without a matching index, check every row's values
        presence = np.ones(arr.shape[0], dtype=np.uint8)
    rows = max(1, CHUNK_BYTES // max(1, arr[0:1].nbytes))
    for a in range(0, arr.shape[0], rows):
        x = np.asarray(arr[a : a + rows]).reshape(min(rows, arr.shape[0] - a), -1)  # (chunk, features)
        here, absent = presence[a : a + rows] == 1, presence[a : a + rows] == 0
        if spec.kind == "text":
            bad = here & ((x < 0) | (x >= (spec.vocab_size or 0))).any(axis=1)
            for j in np.flatnonzero(bad):
                out.add(f, f"row {a + j}", f"token id(s) outside [0, {spec.vocab_size})", kind="token id out of range")
        elif x.dtype.kind == "f":
            bad = here & ~np.isfinite(x).all(axis=1)
            for j in np.flatnonzero(bad):
                out.add(f, f"row {a + j}", "NaN or infinite value(s) in a present sample", kind="non-finite value")
        stray = absent & (x != 0).any(axis=1)
        for j in np.flatnonzero(stray):
            out.add(
                f,
                f"row {a + j}",
                "non-zero values in a row whose sample lacks the modality (must be zeros)",
                kind="non-zero absent row",
            )


def split_role(split: str) -> str:
    """What fedfuse does with the samples of ``split``."""
    return SPLIT_ROLES.get(split, f"not used (fedfuse trains on '{TRAIN_SPLIT}' and evaluates on '{TEST_SPLIT}')")


def split_hint(splits: Sequence[str]) -> str:
    """A hint for split names that look like 'train' or 'test' but are not ("" if none)."""
    return "; ".join(
        f"'{s}' is not used (did you mean '{_NEAR_SPLITS[s.lower()]}'?)"
        for s in splits
        if s.lower() in _NEAR_SPLITS and s != _NEAR_SPLITS[s.lower()]
    )


# ---------------------------------------------------------------------------
# Loading and summaries
# ---------------------------------------------------------------------------


def load_site(path: str | os.PathLike) -> Site:
    """Load and validate the site folder ``path``; raises DataError listing every problem."""
    site, problems = check_site(path)
    if site is None:
        raise DataError(
            f"site folder {path} is not valid ({len(problems)} problem(s)); fix them or re-import:\n  "
            + "\n  ".join(str(p) for p in problems)
        )
    return site


def check_site(path: str | os.PathLike) -> tuple[Site | None, list[Problem]]:
    """Validate ``path`` and, if it has no problem, load it, in one pass: ``(site or None, problems)``."""
    path = Path(path)
    problems, parsed = _check(path)
    if problems:
        return None, problems
    assert parsed.schema is not None and parsed.doc is not None and parsed.presence is not None
    schema = parsed.schema
    # Copy-on-write memory maps: pages are read on demand, the files are never written
    inputs = {m: torch.from_numpy(np.load(path / f"{m}.npy", mmap_mode="c", allow_pickle=False)) for m in schema.names}
    mask = torch.from_numpy(np.stack([parsed.presence[m] == 1 for m in schema.names], axis=1))  # (N, M) bool
    data = MultimodalData(schema, inputs, mask, torch.from_numpy(parsed.labels))
    return Site(name=parsed.doc["name"], path=path, data=data, split=tuple(parsed.split or ())), []


def summarize_site(site: Site) -> dict[str, Any]:
    """Samples per split, per-modality presence counts and class counts (by label name)."""
    counts = Counter(site.data.labels.tolist())
    return {
        "name": site.name,
        "path": str(site.path),
        "samples": len(site.data),
        "splits": dict(sorted(Counter(site.split).items())),
        "split_roles": {s: split_role(s) for s in sorted(set(site.split))},
        "presence": site.data.presence(),
        "classes": {label: counts.get(i, 0) for i, label in enumerate(site.schema.labels)},
    }


# ---------------------------------------------------------------------------
# Federations: a folder of site folders
# ---------------------------------------------------------------------------


def site_folders(path: str | os.PathLike) -> list[Path]:
    """The site folders in ``path``, sorted by name (hidden folders, e.g. unfinished writes, skipped)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; expected a folder of site folders")
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_federation(path: str | os.PathLike) -> list[Site]:
    """Every site in the folder ``path`` (one sub-folder per site, sorted by folder name)."""
    path = Path(path)
    if (path / SCHEMA_FILE).exists():
        raise DataError(f"{path} is a single site folder (it has {SCHEMA_FILE}); pass the folder that contains the sites")
    folders = site_folders(path)
    if not folders:
        raise DataError(f"{path} has no site folders; expected one sub-folder per site (see docs/site-format.md)")
    sites, bad = [], []
    for folder in folders:
        site, problems = check_site(folder)
        if site is None:
            bad.append(f"site '{folder.name}' ({len(problems)} problem(s)):\n    " + "\n    ".join(map(str, problems)))
        else:
            sites.append(site)
    if bad:
        raise DataError(f"{len(bad)} of {len(folders)} site(s) in {path} are not valid:\n  " + "\n  ".join(bad))
    return sites


def federation_schema(sites: Sequence[Site]) -> DatasetSchema:
    """The union of the sites' modalities (in order of first appearance) with their shared labels."""
    if not sites:
        raise SchemaError("a federation needs at least one site")
    first = sites[0]
    specs: dict[str, tuple[ModalitySpec, Site]] = {}
    for site in sites:
        if site.schema.labels != first.schema.labels:
            raise SchemaError(
                f"sites '{first.name}' and '{site.name}' have different labels: {list(first.schema.labels)} vs "
                f"{list(site.schema.labels)}; every site must use the same label names in the same order"
            )
        for spec in site.schema.modalities:
            seen = specs.setdefault(spec.name, (spec, site))
            if seen[0] != spec:
                raise SchemaError(
                    f"modality '{spec.name}' differs between sites '{seen[1].name}' ({seen[0].to_dict()}) and "
                    f"'{site.name}' ({spec.to_dict()}); a modality must have the same kind, shape and dtype everywhere"
                )
    return DatasetSchema(tuple(s for s, _ in specs.values()), first.schema.labels)
