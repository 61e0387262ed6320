"""Tests of the HAPT and AV-Digits importers: tiny fake sources in the publishers' layouts, then the real data."""

from __future__ import annotations

import gzip
import os
import struct
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.importers import av_digits, hapt
from common.data.importers.av_digits import import_av_digits, log_mel, mel_filterbank
from common.data.importers.hapt import import_hapt
from common.data.site_folders import federation_schema, load_federation, load_site, validate_site
from common.errors import ConfigError, DataError
from fedfuse.cli import main

ACTIVITIES = (
    "WALKING",
    "WALKING_UPSTAIRS",
    "WALKING_DOWNSTAIRS",
    "SITTING",
    "STANDING",
    "LAYING",
    "STAND_TO_SIT",
    "SIT_TO_STAND",
    "SIT_TO_LIE",
    "LIE_TO_SIT",
    "STAND_TO_LIE",
    "LIE_TO_STAND",
)

# ---------------------------------------------------------------------------
# HAPT on a fake source
# ---------------------------------------------------------------------------

# (experiment, user, activity, start, end): 1-based inclusive rows, as in RawData/labels.txt
SEGMENTS = [
    (1, 1, 1, 1, 300),  # 300 rows: windows at rows 1, 65, 129 (the next would end at 320)
    (1, 1, 7, 301, 400),  # 100 rows: too short for a window
    (1, 1, 4, 401, 600),  # 200 rows: windows at 401, 465
    (2, 1, 2, 1, 256),  # 256 rows: windows at 1, 65, 129
    (2, 1, 8, 257, 386),  # 130 rows: one window at 257
    (3, 2, 5, 10, 137),  # exactly 128 rows: one window at 10
]
ROWS = {(1, 1): 600, (2, 1): 400, (3, 2): 200}


def fake_hapt(root: Path, segments=SEGMENTS, rows=ROWS) -> Path:
    """A HAPT folder in the publisher's layout; acc row r (0-based) is (r, 1000 + r, 2000 + r), gyro = -acc."""
    for d in ("RawData", "Train", "Test"):
        (root / d).mkdir(parents=True)
    (root / "activity_labels.txt").write_text("".join(f"{i} {n}  \n" for i, n in enumerate(ACTIVITIES, 1)))
    (root / "RawData" / "labels.txt").write_text("".join(" ".join(map(str, s)) + "\n" for s in segments))
    for (exp, user), n in rows.items():
        r = np.arange(n, dtype=np.float64)[:, None] + np.array([0.0, 1000.0, 2000.0])
        np.savetxt(root / "RawData" / f"acc_exp{exp:02d}_user{user:02d}.txt", r)
        np.savetxt(root / "RawData" / f"gyro_exp{exp:02d}_user{user:02d}.txt", -r)
    (root / "Train" / "subject_id_train.txt").write_text("1\n1\n1\n")
    (root / "Test" / "subject_id_test.txt").write_text("2\n2\n")
    return root


def test_hapt_window_starts() -> None:
    assert list(hapt.window_starts(1, 300)) == [0, 64, 128]
    assert list(hapt.window_starts(10, 137)) == [9]
    assert list(hapt.window_starts(301, 400)) == []
    assert list(hapt.window_starts(1, 128 + 64 * 5)) == [0, 64, 128, 192, 256, 320]


def test_hapt_holdout_marks_every_fifth() -> None:
    from fractions import Fraction

    assert [k for k in range(20) if hapt.held_out(k, Fraction("0.2"))] == [4, 9, 14, 19]
    assert [k for k in range(10) if hapt.held_out(k, Fraction("0.5"))] == [1, 3, 5, 7, 9]
    assert not any(hapt.held_out(k, Fraction(0)) for k in range(10))


def test_hapt_six_classes(tmp_path: Path) -> None:
    # Prepare
    source = fake_hapt(tmp_path / "hapt")
    # Execute
    paths = import_hapt(source, tmp_path / "out")
    # Assert: one site per subject, windows of the 6 activities only
    assert [p.name for p in paths] == ["subject-01", "subject-02"]
    one, two = load_site(paths[0]), load_site(paths[1])
    assert one.schema.labels == ACTIVITIES[:6] and one.schema.names == ("acc", "gyro")
    assert one.schema["acc"].shape == (3, 128)
    ids = (paths[0] / "index.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in ids] == [
        "exp01-row00001",
        "exp01-row00065",
        "exp01-row00129",
        "exp01-row00401",
        "exp01-row00465",
        "exp02-row00001",
        "exp02-row00065",
        "exp02-row00129",
    ]
    assert one.data.labels.tolist() == [0, 0, 0, 3, 3, 1, 1, 1]
    # Every 5th window of a training subject, in time order, is held out
    assert one.split == ("train",) * 4 + ("test",) + ("train",) * 3
    assert two.split == ("test",) and two.data.labels.tolist() == [4]


def test_hapt_windows_are_exact_rows(tmp_path: Path) -> None:
    # Prepare
    source = fake_hapt(tmp_path / "hapt")
    # Execute
    site = load_site(import_hapt(source, tmp_path / "out")[0])
    # Assert: window 1 covers rows 64..191 (0-based): 50 % overlap with windows 0 and 2
    acc, gyro = site.data.inputs["acc"], site.data.inputs["gyro"]
    expected = torch.arange(64, 192, dtype=torch.float32) + torch.tensor([[0.0], [1000.0], [2000.0]])
    assert torch.equal(acc[1], expected)
    assert torch.equal(gyro[1], -expected)
    assert torch.equal(acc[0][:, 64:], acc[1][:, :64]) and torch.equal(acc[1][:, 64:], acc[2][:, :64])
    assert float(acc[3][0, 0]) == 400.0  # the segment starting at row 401 (1-based)


def test_hapt_twelve_classes_and_no_holdout(tmp_path: Path) -> None:
    # Prepare
    source = fake_hapt(tmp_path / "hapt")
    # Execute
    site = load_site(import_hapt(source, tmp_path / "out", classes=12, holdout=0.0)[0])
    # Assert: the 130-row transition gives one window; the 100-row one none
    assert site.schema.labels == ACTIVITIES
    assert site.data.labels.tolist() == [0, 0, 0, 3, 3, 1, 1, 1, 7]
    assert set(site.split) == {"train"}


def test_hapt_via_cli(tmp_path: Path) -> None:
    source = fake_hapt(tmp_path / "hapt")
    args = ["data", "import", "hapt", "--source", str(source), "--out", str(tmp_path / "out")]
    assert main([*args, "--classes", "12"]) == 0
    assert main(args) == 2  # the sites exist: refused without --overwrite
    assert main([*args, "--overwrite"]) == 0
    assert main(["data", "validate", str(tmp_path / "out")]) == 0
    assert load_site(tmp_path / "out" / "subject-01").schema.num_classes == 6


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda s: (s / "Train" / "subject_id_train.txt").unlink(), "lacks Train/subject_id_train.txt"),
        (lambda s: (s / "RawData" / "gyro_exp02_user01.txt").unlink(), "lacks 1 raw file.*gyro_exp02_user01.txt"),
        (lambda s: (s / "Test" / "subject_id_test.txt").write_text("3\n"), r"user\(s\) \[2\] are in neither"),
        (lambda s: (s / "Test" / "subject_id_test.txt").write_text("1\n2\n"), "listed in both"),
        (lambda s: (s / "RawData" / "labels.txt").write_text("1 1 1 1\n"), "expected 5 integer column"),
        (lambda s: (s / "RawData" / "labels.txt").write_text("1 1 1 1 900\n"), "pass the end of its raw files"),
        (lambda s: np.savetxt(s / "RawData" / "gyro_exp01_user01.txt", np.zeros((10, 3))), "acc has 600 rows but gyro has 10"),
    ],
)
def test_hapt_bad_layout(tmp_path: Path, breakage, message: str) -> None:
    # Prepare
    source = fake_hapt(tmp_path / "hapt")
    breakage(source)
    # Execute / Assert
    with pytest.raises(DataError, match=message):
        import_hapt(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_hapt_missing_source_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder; expected the publisher's HAPT layout"):
        import_hapt(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ConfigError, match="classes must be 6"):
        import_hapt(tmp_path, tmp_path / "out", classes=7)
    with pytest.raises(ConfigError, match="holdout"):
        import_hapt(tmp_path, tmp_path / "out", holdout=1.0)


# ---------------------------------------------------------------------------
# AV-Digits on a fake source
# ---------------------------------------------------------------------------

SPEAKERS, DIGITS, TAKES = ("alice", "bob"), (0, 1, 2), range(7)


def write_wav(path: Path, samples: np.ndarray, *, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_av(root: Path, n_images: int = 200) -> tuple[Path, Path]:
    """FSDD (2 speakers x 3 digits x 7 takes) and MNIST (image i filled with i, label i % 10)."""
    fsdd, mnist = root / "fsdd", root / "mnist"
    (fsdd / "recordings").mkdir(parents=True)
    mnist.mkdir()
    t = np.arange(12000) / 8000
    for s, speaker in enumerate(SPEAKERS):
        for d in DIGITS:
            for take in TAKES:
                n = 3000 + 1500 * take  # some shorter than 1 s, some longer
                tone = 8000 * np.sin(2 * np.pi * (200 + 100 * d + 50 * s) * t[:n])
                write_wav(fsdd / "recordings" / f"{d}_{speaker}_{take}.wav", tone)
    (fsdd / "README.md").write_text("not a recording\n")
    idx = np.arange(n_images)
    write_idx(mnist / "t10k-images-idx3-ubyte.gz", 2051, np.broadcast_to(idx[:, None, None], (n_images, 28, 28)))
    write_idx(mnist / "t10k-labels-idx1-ubyte.gz", 2049, idx % 10)
    return fsdd, mnist


def test_log_mel_shape_and_fixed_scaling() -> None:
    # Execute
    silence = log_mel(np.zeros(100, dtype=np.int16))
    # Assert
    assert silence.shape == (32, 61) and silence.dtype == np.float32
    assert np.allclose(silence, (np.log(1e-6) - av_digits.LOG_MEL_MEAN) / av_digits.LOG_MEL_STD)
    assert (mel_filterbank().sum(axis=1) > 0).all()  # no empty mel band
    tone = (8000 * np.sin(2 * np.pi * 1000 * np.arange(8000) / 8000)).astype(np.int16)
    assert int(log_mel(tone)[:, 30].argmax()) == int(mel_filterbank()[:, 32].argmax())  # 1 kHz = FFT bin 32


def test_av_digits_sites_split_and_pairing(tmp_path: Path) -> None:
    # Prepare
    fsdd, mnist = fake_av(tmp_path)
    # Execute
    paths = import_av_digits(fsdd, mnist, tmp_path / "out", seed=3)
    # Assert: one site per speaker, takes 0-4 test
    assert [p.name for p in paths] == ["speaker-alice", "speaker-bob"]
    sites = [load_site(p) for p in paths]
    assert all(validate_site(p) == [] for p in paths)
    assert sites[0].schema.labels == tuple("0123456789")
    assert sites[0].schema["audio"].shape == (32, 61) and sites[0].schema["image"].shape == (1, 28, 28)
    ids = [line.split(",")[0] for line in (paths[0] / "index.csv").read_text().splitlines()[1:]]
    assert ids[:8] == [f"0_alice_{t}" for t in range(7)] + ["1_alice_0"]
    assert Counter(sites[0].split) == {"test": 15, "train": 6}
    assert sites[0].split[:7] == ("test",) * 5 + ("train",) * 2
    # Each clip has a distinct image of its own digit (image i is filled with i, label i % 10)
    used = []
    for site in sites:
        index = (site.data.inputs["image"][:, 0, 0, 0] * 255).round().to(torch.int64)
        assert torch.equal(index % 10, site.data.labels)
        used += index.tolist()
    assert len(used) == 42 and len(set(used)) == 42
    assert float(sites[0].data.inputs["image"].max()) <= 1.0


def test_av_digits_pairing_is_fixed_by_seed(tmp_path: Path) -> None:
    # Prepare
    fsdd, mnist = fake_av(tmp_path)
    # Execute
    a = load_site(import_av_digits(fsdd, mnist, tmp_path / "a", seed=0)[0]).data.inputs["image"]
    b = load_site(import_av_digits(fsdd, mnist, tmp_path / "b", seed=0)[0]).data.inputs["image"]
    c = load_site(import_av_digits(fsdd, mnist, tmp_path / "c", seed=1)[0]).data.inputs["image"]
    # Assert
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_av_digits_via_cli(tmp_path: Path) -> None:
    fsdd, mnist = fake_av(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "import", "av-digits", "--fsdd", str(fsdd), "--mnist", str(mnist), "--out", str(out)]) == 0
    assert main(["data", "validate", str(out)]) == 0


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda f, m: (f / "recordings").rename(f / "clips"), "has no recordings/ folder"),
        (lambda f, m: [p.unlink() for p in (f / "recordings").glob("*.wav")], "has no recordings named"),
        (lambda f, m: (m / "t10k-labels-idx1-ubyte.gz").unlink(), "t10k-labels-idx1-ubyte.gz is missing"),
        (lambda f, m: (m / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip"), "not a readable gzip file"),
        (lambda f, m: write_idx(m / "t10k-labels-idx1-ubyte.gz", 2051, np.zeros(200)), "magic number 2049"),
        (
            lambda f, m: write_idx(m / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(150)),
            "expected N x 28 x 28 images and N labels",
        ),
        (lambda f, m: write_wav(f / "recordings" / "0_alice_0.wav", np.zeros(100), rate=16000), "expected 8000 Hz mono 16-bit"),
    ],
)
def test_av_digits_bad_layout(tmp_path: Path, breakage, message: str) -> None:
    # Prepare
    fsdd, mnist = fake_av(tmp_path)
    breakage(fsdd, mnist)
    # Execute / Assert
    with pytest.raises(DataError, match=message):
        import_av_digits(fsdd, mnist, tmp_path / "out")


def test_av_digits_too_few_images(tmp_path: Path) -> None:
    fsdd, mnist = fake_av(tmp_path, n_images=100)  # 10 images per digit for 14 clips per digit
    with pytest.raises(DataError, match="14 clips of digit 0 but only 10 MNIST images"):
        import_av_digits(fsdd, mnist, tmp_path / "out")


# ---------------------------------------------------------------------------
# The real data (slow)
# ---------------------------------------------------------------------------


def shared_data(name: str) -> Path:
    """``$FEDFUSE_SHARED_DATA/<name>`` (default ``<repo>/../shared/data``); skips the test if absent."""
    root = Path(os.environ.get("FEDFUSE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not (root / name).is_dir():
        pytest.skip(f"real data not found at {root / name}; set FEDFUSE_SHARED_DATA to the shared data folder")
    return root / name


@pytest.mark.slow
def test_hapt_real_data(tmp_path: Path) -> None:
    # Prepare
    source = shared_data("hapt")
    # Execute
    import_hapt(source, tmp_path / "out")
    sites = load_federation(tmp_path / "out")
    # Assert: 30 subjects, 21 of them in the publisher's training split
    assert len(sites) == 30
    assert sum("train" in s.split for s in sites) == 21
    assert sum(len(s.data) for s in sites) == 10411
    counts = Counter()
    for s in sites:
        counts.update(s.data.labels.tolist())
    assert [counts[i] for i in range(6)] == [1722, 1544, 1407, 1801, 1979, 1958]
    assert federation_schema(sites).names == ("acc", "gyro")


@pytest.mark.slow
def test_av_digits_real_data(tmp_path: Path) -> None:
    # Prepare
    fsdd, mnist = shared_data("fsdd"), shared_data("mnist")
    # Execute
    import_av_digits(fsdd, mnist, tmp_path / "out")
    sites = load_federation(tmp_path / "out")
    # Assert: 6 speakers x 500 clips; takes 0-4 of each digit are test
    speakers = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
    assert [s.name for s in sites] == [f"speaker-{n}" for n in speakers]
    assert [len(s.data) for s in sites] == [500] * 6
    assert all(Counter(s.split) == {"test": 50, "train": 450} for s in sites)
    assert all(s.data.labels.bincount().tolist() == [50] * 10 for s in sites)
    images = torch.cat([s.data.inputs["image"].flatten(1) for s in sites])
    assert len(torch.unique(images, dim=0)) == 3000  # no image used twice


def test_mnist_unpaired_holds_exactly_the_images_av_digits_does_not_use(tmp_path: Path) -> None:
    # Prepare: the AV-Digits sites of pairing seed 3 (image i is filled with i)
    from common.data.importers.av_digits import import_unpaired_mnist

    fsdd, mnist = fake_av(tmp_path)
    paired = [load_site(p) for p in import_av_digits(fsdd, mnist, tmp_path / "av", seed=3)]
    # Execute
    path = import_unpaired_mnist(fsdd, mnist, tmp_path / "public", seed=3, test_every=4)
    # Assert: one valid image-only site; its images and AV-Digits' are disjoint and together all of MNIST
    site = load_site(path)
    assert validate_site(path) == [] and site.schema.names == ("image",) and site.schema.labels == tuple("0123456789")

    def indices(s):
        return set((s.data.inputs["image"][:, 0, 0, 0] * 255).round().to(torch.int64).tolist())

    used, rest = set().union(*(indices(s) for s in paired)), indices(site)
    total = len(av_digits.read_mnist(mnist)[1])
    assert not used & rest and used | rest == set(range(total))
    assert torch.equal((site.data.inputs["image"][:, 0, 0, 0] * 255).round().to(torch.int64) % 10, site.data.labels)
    assert Counter(site.split)["test"] == (len(rest) + 3) // 4
