"""HAPT importer: raw accelerometer and gyroscope windows from the labelled segments, one site per subject.

Source: "Smartphone-Based Recognition of Human Activities and Postural Transitions" v2.1 (UCI), in
the publisher's layout::

    <source>/activity_labels.txt            "<id> <NAME>" for ids 1-12
    <source>/RawData/labels.txt             experiment, user, activity, start row, end row
    <source>/RawData/acc_expXX_userYY.txt   50 Hz, 3 axes (g), one row per sample
    <source>/RawData/gyro_expXX_userYY.txt  50 Hz, 3 axes (rad/s)
    <source>/Train/subject_id_train.txt     the publisher's training subjects (one id per window)
    <source>/Test/subject_id_test.txt       the publisher's test subjects

Rows in labels.txt are 1-based and inclusive. The README does not say so, but where successive
segments of an experiment touch (642 of 1,153 pairs) the next starts at end + 1, never at end;
and no start row is 0 nor any end row past its file's last row (the publisher used MATLAB).
Each segment ``[start, end]`` gives the windows of ``WINDOW`` rows starting at rows ``start,
start + STEP, ...`` that fit inside it; a segment shorter than ``WINDOW`` rows (many postural
transitions) gives none.

Splits: every window of a test subject is "test". A training subject's windows are "train",
except a deterministic held-out share ``holdout`` (default 0.2): numbering the subject's windows
0, 1, 2, ... in time order (experiment, then start row), window k is "test" when
floor((k + 1) * holdout) > floor(k * holdout), i.e. every 5th window (k = 4, 9, 14, ...) for 0.2.
Held-out windows overlap their neighbours by ``WINDOW - STEP`` rows, so their score is optimistic;
the test subjects give the honest one.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from common.data.samples import MultimodalData
from common.data.schema import DatasetSchema, ModalitySpec
from common.data.site_folders import write_site
from common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

WINDOW = 128  # rows per window: 2.56 s at 50 Hz, as in UCI HAR
STEP = 64  # 50 % overlap
AXES = 3
CLASSES = (6, 12)  # 6: the UCI HAR activities (ids 1-6); 12: with the postural transitions (7-12)
LAYOUT = (
    "expected the publisher's HAPT layout: activity_labels.txt, RawData/labels.txt, "
    "RawData/acc_expXX_userYY.txt, RawData/gyro_expXX_userYY.txt, Train/subject_id_train.txt, "
    "Test/subject_id_test.txt"
)


@dataclass(frozen=True)
class Segment:
    """One labelled stretch of an experiment: rows ``start``..``end`` (1-based, inclusive)."""

    experiment: int
    user: int
    activity: int
    start: int
    end: int


def schema(classes: int, activity_names: dict[int, str]) -> DatasetSchema:
    """Two signal modalities, ``acc`` and ``gyro`` (3 axes x WINDOW rows), and the activity names."""
    return DatasetSchema(
        (ModalitySpec("acc", "signal", (AXES, WINDOW)), ModalitySpec("gyro", "signal", (AXES, WINDOW))),
        tuple(activity_names[a] for a in range(1, classes + 1)),
    )


def window_starts(start: int, end: int) -> range:
    """0-based first rows of the windows inside the segment ``[start, end]`` (1-based, inclusive)."""
    return range(start - 1, end - WINDOW + 1, STEP)


def held_out(k: int, holdout: Fraction) -> bool:
    """Whether a training subject's k-th window (0-based, time order) is held out as "test"."""
    return math.floor((k + 1) * holdout) > math.floor(k * holdout)


def import_hapt(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    classes: int = 6,
    holdout: float = 0.2,
    overwrite: bool = False,
) -> list[Path]:
    """Write one site folder ``subject-XX`` per HAPT subject under ``out``; returns their paths."""
    source, out = Path(source), Path(out)
    if classes not in CLASSES:
        raise ConfigError(f"classes must be 6 (the UCI HAR activities) or 12 (with transitions), got {classes}")
    if not 0 <= holdout < 1:
        raise ConfigError(f"holdout must lie in [0, 1), got {holdout}")
    share = Fraction(str(holdout))  # exact, so that 0.2 marks exactly every 5th window
    _check_layout(source)
    names = read_activity_names(source / "activity_labels.txt")
    missing = [a for a in range(1, classes + 1) if a not in names]
    if missing:
        raise DataError(f"{source / 'activity_labels.txt'}: no name for activity id(s) {missing}")
    site_schema = schema(classes, names)
    subjects = read_subject_split(source)
    segments = read_segments(source / "RawData" / "labels.txt")
    unknown = sorted({s.user for s in segments} - set(subjects))
    if unknown:
        raise DataError(
            f"{source / 'RawData' / 'labels.txt'}: user(s) {unknown} are in neither Train/subject_id_train.txt "
            "nor Test/subject_id_test.txt"
        )
    by_user: dict[int, list[Segment]] = defaultdict(list)
    for seg in segments:
        by_user[seg.user].append(seg)
    # Every raw file must be there before any site is written
    raw = sorted({f"{sensor}_exp{s.experiment:02d}_user{s.user:02d}.txt" for s in segments for sensor in ("acc", "gyro")})
    missing = [f for f in raw if not (source / "RawData" / f).is_file()]
    if missing:
        raise DataError(
            f"{source / 'RawData'} lacks {len(missing)} raw file(s) that labels.txt refers to: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; {LAYOUT}"
        )

    written = []
    for user in sorted(by_user):
        split = subjects[user]
        acc, gyro, ids, labels, splits = [], [], [], [], []
        k = 0  # the subject's window number, in time order
        for exp in sorted({s.experiment for s in by_user[user]}):
            a, g = _read_experiment(source, exp, user)
            for seg in sorted((s for s in by_user[user] if s.experiment == exp), key=lambda s: s.start):
                if seg.end > len(a):
                    raise DataError(
                        f"{source / 'RawData' / 'labels.txt'}: segment rows {seg.start}-{seg.end} of experiment "
                        f"{exp} pass the end of its raw files ({len(a)} rows)"
                    )
                if seg.activity > classes:
                    continue
                for s in window_starts(seg.start, seg.end):
                    acc.append(a[s : s + WINDOW].T)  # (AXES, WINDOW)
                    gyro.append(g[s : s + WINDOW].T)
                    ids.append(f"exp{exp:02d}-row{s + 1:05d}")
                    labels.append(seg.activity - 1)
                    splits.append("test" if split == "test" or held_out(k, share) else "train")
                    k += 1
        if not ids:
            log.warning("subject %d has no window of the %d classes; no site written", user, classes)
            continue
        n = len(ids)
        data = MultimodalData(
            site_schema,
            {
                "acc": torch.from_numpy(np.stack(acc).astype(np.float32)),  # (N, 3, 128)
                "gyro": torch.from_numpy(np.stack(gyro).astype(np.float32)),
            },
            torch.ones((n, 2), dtype=torch.bool),
            torch.tensor(labels, dtype=torch.int64),
        )
        name = f"subject-{user:02d}"
        written.append(write_site(out / name, data, splits, name=name, overwrite=overwrite, sample_ids=ids))
    log.info("HAPT (%d classes): wrote %d site(s) under %s", classes, len(written), out)
    return written


def _check_layout(source: Path) -> None:
    if not source.is_dir():
        raise DataError(f"HAPT source {source} is not a folder; {LAYOUT}")
    needed = ["activity_labels.txt", "RawData/labels.txt", "Train/subject_id_train.txt", "Test/subject_id_test.txt"]
    missing = [p for p in needed if not (source / p).is_file()]
    if missing:
        raise DataError(f"HAPT source {source} lacks {', '.join(missing)}; {LAYOUT}")


def read_activity_names(path: Path) -> dict[int, str]:
    """Activity id -> name from activity_labels.txt (``"1 WALKING"`` per line)."""
    names = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"\s*(\d+)\s+(\S+)\s*", line)
        if not m:
            raise DataError(f"{path}, line {lineno}: expected '<id> <NAME>', got {line.strip()!r}")
        names[int(m.group(1))] = m.group(2)
    return names


def read_subject_split(source: Path) -> dict[int, str]:
    """Subject id -> "train" or "test", from the publisher's per-window subject lists."""
    split: dict[int, str] = {}
    for name, file in (("train", "Train/subject_id_train.txt"), ("test", "Test/subject_id_test.txt")):
        ids = _read_ints(source / file, columns=1)[:, 0]
        for user in np.unique(ids).tolist():
            if user in split:
                raise DataError(f"subject {user} is listed in both Train/subject_id_train.txt and Test/subject_id_test.txt")
            split[user] = name
    return split


def read_segments(path: Path) -> list[Segment]:
    """The labelled segments of labels.txt (experiment, user, activity, start row, end row)."""
    rows = _read_ints(path, columns=5)
    segments = [Segment(*map(int, r)) for r in rows]
    for i, s in enumerate(segments, 1):
        if not (1 <= s.activity <= 12 and 1 <= s.start <= s.end):
            raise DataError(f"{path}, line {i}: expected activity 1-12 and 1 <= start <= end, got {list(rows[i - 1])}")
    return segments


def _read_ints(path: Path, *, columns: int) -> np.ndarray:
    try:
        rows = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{path}: expected {columns} integer column(s) per line: {exc}") from None
    if rows.shape[1] != columns or len(rows) == 0:
        raise DataError(f"{path}: expected {columns} integer column(s) per line, got shape {list(rows.shape)}")
    return rows


def _read_experiment(source: Path, exp: int, user: int) -> tuple[np.ndarray, np.ndarray]:
    """The raw accelerometer and gyroscope rows of one experiment, each (rows, 3) float64."""
    out = []
    for sensor in ("acc", "gyro"):
        path = source / "RawData" / f"{sensor}_exp{exp:02d}_user{user:02d}.txt"
        if not path.is_file():
            raise DataError(f"{path} is missing; labels.txt has segments of experiment {exp}, user {user}; {LAYOUT}")
        try:
            x = np.loadtxt(path, dtype=np.float64, ndmin=2)
        except ValueError as exc:
            raise DataError(f"{path}: expected 3 numbers per line: {exc}") from None
        if x.shape[1] != AXES:
            raise DataError(f"{path}: expected {AXES} columns (x, y, z), got {x.shape[1]}")
        if not np.isfinite(x).all():
            raise DataError(f"{path}: contains NaN or infinite values")
        out.append(x)
    if len(out[0]) != len(out[1]):
        raise DataError(
            f"experiment {exp}, user {user}: acc has {len(out[0])} rows but gyro has {len(out[1])}; "
            "the two sensors must be sampled together"
        )
    return out[0], out[1]
