"""AV-Digits importer: spoken digits (FSDD) paired with handwritten digits (MNIST), one site per speaker.

Sources, in their publishers' layouts:

- FSDD: ``<fsdd>/recordings/{digit}_{speaker}_{take}.wav``, 8 kHz mono 16-bit PCM.
- MNIST: ``<mnist>/t10k-images-idx3-ubyte.gz`` and ``<mnist>/t10k-labels-idx1-ubyte.gz`` (IDX, gzip).

Each clip is paired with a distinct MNIST image of the same digit: per digit 0-9 in turn, the
clips sorted by (speaker, take) take the first images of a permutation, drawn with
``numpy.random.default_rng(seed)``, of that digit's images; no image is used twice. The pairing is
artificial, the modalities are real.

Modalities: ``audio`` (signal, ``[N_MELS, FRAMES]`` = [32, 61]): the clip padded with zeros or cut
to 1 s, a 256-sample periodic Hann window every 128 samples (no centring), power spectrum, 32 mel
bands (HTK mel scale, 0-4 kHz, triangular), ``ln(power + 1e-6)`` standardised with the fixed
constants LOG_MEL_MEAN and LOG_MEL_STD (so every site scales alike without sharing statistics);
``image`` (image, [1, 28, 28], pixel / 255 in [0, 1]). Split: takes 0-4 "test" (the publisher's
split), the others "train". Labels "0".."9".
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import struct
import wave
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from common.data.samples import MultimodalData
from common.data.schema import DatasetSchema, ModalitySpec
from common.data.site_folders import write_site
from common.errors import DataError

log = logging.getLogger(__name__)

SAMPLE_RATE = 8000
CLIP = SAMPLE_RATE  # samples kept per clip: 1 s
FRAME, HOP, N_MELS = 256, 128, 32
FRAMES = 1 + (CLIP - FRAME) // HOP  # 61
# Mean and std of ln(mel power + 1e-6) over every bin of all 3,000 FSDD clips (-9.86, 5.12: computed
# once with log_mel, rounded); fixed constants, not per-site statistics. Padding gives ln(1e-6) = -13.8.
LOG_MEL_MEAN, LOG_MEL_STD = -10.0, 5.0
TEST_TAKES = range(0, 5)  # the publisher's test split
LABELS = tuple(str(d) for d in range(10))
MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"
_CLIP_NAME = re.compile(r"(\d)_([A-Za-z0-9]+)_(\d+)\.wav")


def schema() -> DatasetSchema:
    """``audio`` (log-mel spectrogram) and ``image`` (MNIST digit); labels "0".."9"."""
    return DatasetSchema(
        (ModalitySpec("audio", "signal", (N_MELS, FRAMES)), ModalitySpec("image", "image", (1, 28, 28))),
        LABELS,
    )


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = FRAME, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular filters on the HTK mel scale from 0 Hz to rate / 2; shape (n_mels, n_fft // 2 + 1)."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = hz(np.linspace(0.0, mel(rate / 2), n_mels + 2))  # (n_mels + 2,)
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft  # (bins,)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs - lo) / (mid - lo)
    down = (hi - freqs) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down))  # (n_mels, bins)


_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(FRAME) / FRAME)  # periodic Hann
_MEL = mel_filterbank()


def log_mel(clip: np.ndarray) -> np.ndarray:
    """Standardised log-mel spectrogram (N_MELS, FRAMES) float32 of an int16 clip at 8 kHz."""
    x = np.zeros(CLIP, dtype=np.float64)
    x[: min(CLIP, len(clip))] = clip[:CLIP] / 32768.0
    frames = np.lib.stride_tricks.sliding_window_view(x, FRAME)[::HOP] * _WINDOW  # (FRAMES, FRAME)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (FRAMES, bins)
    logmel = np.log(power @ _MEL.T + 1e-6).T  # (N_MELS, FRAMES)
    return ((logmel - LOG_MEL_MEAN) / LOG_MEL_STD).astype(np.float32)


def read_wav(path: Path) -> np.ndarray:
    """The int16 samples of an 8 kHz mono 16-bit PCM wav file."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise DataError(f"{path}: not a readable wav file ({exc})") from None
    if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
        raise DataError(f"{path}: expected {SAMPLE_RATE} Hz mono 16-bit, got {rate} Hz, {channels} channel(s), {8 * width}-bit")
    clip = np.frombuffer(raw, dtype="<i2")
    if len(clip) == 0:
        raise DataError(f"{path}: no samples")
    return clip


def read_idx(path: Path, *, magic: int, dims: int) -> np.ndarray:
    """A gzip IDX file of unsigned bytes (MNIST): ``magic`` 2049 for labels, 2051 for images."""
    if not path.is_file():
        raise DataError(f"{path} is missing; expected the MNIST test set files {MNIST_IMAGES} and {MNIST_LABELS}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    head = 4 + 4 * dims
    if len(raw) < head or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path}: not an IDX file with magic number {magic}")
    shape = struct.unpack(f">{dims}I", raw[4:head])
    if len(raw) - head != int(np.prod(shape)):
        raise DataError(f"{path}: header says {list(shape)} ({int(np.prod(shape))} bytes) but {len(raw) - head} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def read_mnist(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test images (N, 28, 28) uint8 and labels (N,) uint8."""
    if not folder.is_dir():
        raise DataError(f"MNIST folder {folder} is not a folder; expected {MNIST_IMAGES} and {MNIST_LABELS} in it")
    images = read_idx(folder / MNIST_IMAGES, magic=2051, dims=3)
    labels = read_idx(folder / MNIST_LABELS, magic=2049, dims=1)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{folder}: expected N x 28 x 28 images and N labels, got {list(images.shape)} and {len(labels)}")
    return images, labels


def find_clips(fsdd: Path) -> list[tuple[int, str, int, Path]]:
    """(digit, speaker, take, path) of every FSDD recording, sorted by (speaker, digit, take)."""
    folder = fsdd / "recordings"
    if not folder.is_dir():
        raise DataError(f"FSDD folder {fsdd} has no recordings/ folder; expected recordings/{{digit}}_{{speaker}}_{{take}}.wav")
    clips, other = [], 0
    for path in folder.iterdir():
        m = _CLIP_NAME.fullmatch(path.name)
        if m:
            clips.append((int(m.group(1)), m.group(2), int(m.group(3)), path))
        else:
            other += 1
    if other:
        log.warning("%s: ignored %d file(s) not named {digit}_{speaker}_{take}.wav", folder, other)
    if not clips:
        raise DataError(f"{folder} has no recordings named {{digit}}_{{speaker}}_{{take}}.wav")
    return sorted(clips, key=lambda c: (c[1], c[0], c[2]))


def pair_images(digits: list[int], mnist_labels: np.ndarray, *, seed: int) -> np.ndarray:
    """A distinct MNIST index of the same digit for each entry of ``digits`` (fixed by ``seed``)."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(digits), dtype=np.int64)
    digits_arr = np.asarray(digits)
    for d in range(10):
        need = np.flatnonzero(digits_arr == d)
        pool = np.flatnonzero(mnist_labels == d)
        if len(need) > len(pool):
            raise DataError(f"{len(need)} clips of digit {d} but only {len(pool)} MNIST images of it; each image is used once")
        out[need] = rng.permutation(pool)[: len(need)]
    return out


def import_av_digits(
    fsdd: str | os.PathLike,
    mnist: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Write one site folder ``speaker-<name>`` per FSDD speaker under ``out``; returns their paths."""
    fsdd, mnist, out = Path(fsdd), Path(mnist), Path(out)
    clips = find_clips(fsdd)
    images, mnist_labels = read_mnist(mnist)
    # Pair over all clips at once, so that no image is used twice, even across sites
    paired = pair_images([c[0] for c in clips], mnist_labels, seed=seed)
    by_speaker: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(clips):
        by_speaker[c[1]].append(i)

    site_schema, written = schema(), []
    for speaker in sorted(by_speaker):
        rows = by_speaker[speaker]
        audio = np.stack([log_mel(read_wav(clips[i][3])) for i in rows])  # (N, 32, 61)
        image = (images[paired[rows]].astype(np.float32) / 255.0)[:, None]  # (N, 1, 28, 28)
        data = MultimodalData(
            site_schema,
            {"audio": torch.from_numpy(audio), "image": torch.from_numpy(image)},
            torch.ones((len(rows), 2), dtype=torch.bool),
            torch.tensor([clips[i][0] for i in rows], dtype=torch.int64),
        )
        split = ["test" if clips[i][2] in TEST_TAKES else "train" for i in rows]
        ids = [clips[i][3].stem for i in rows]
        name = f"speaker-{speaker}"
        written.append(write_site(out / name, data, split, name=name, overwrite=overwrite, sample_ids=ids))
    log.info("AV-Digits: wrote %d site(s) under %s", len(written), out)
    return written


PUBLIC_SITE = "mnist-unpaired"


def import_unpaired_mnist(
    fsdd: str | os.PathLike,
    mnist: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    test_every: int = 10,
    overwrite: bool = False,
) -> Path:
    """Write the MNIST images that AV-Digits (pairing ``seed``) does NOT use as one public site folder
    ``<out>/mnist-unpaired`` (modality ``image`` as in AV-Digits, labels "0".."9"; every ``test_every``-th
    image "test", the rest "train"): data to pretrain an image encoder on (``fedfuse pretrain``) without
    touching any image the AV-Digits sites hold."""
    fsdd, mnist, out = Path(fsdd), Path(mnist), Path(out)
    clips = find_clips(fsdd)
    images, mnist_labels = read_mnist(mnist)
    used = set(pair_images([c[0] for c in clips], mnist_labels, seed=seed).tolist())
    rest = np.array([i for i in range(len(mnist_labels)) if i not in used], dtype=np.int64)
    image_spec = next(m for m in schema().modalities if m.name == "image")
    site_schema = DatasetSchema((image_spec,), LABELS)
    data = MultimodalData(
        site_schema,
        {"image": torch.from_numpy(images[rest].astype(np.float32) / 255.0)[:, None]},  # (N, 1, 28, 28)
        torch.ones((len(rest), 1), dtype=torch.bool),
        torch.from_numpy(mnist_labels[rest].astype(np.int64)),
    )
    split = ["test" if k % test_every == 0 else "train" for k in range(len(rest))]
    path = write_site(
        out / PUBLIC_SITE, data, split, name=PUBLIC_SITE, overwrite=overwrite, sample_ids=[f"t10k-{i}" for i in rest.tolist()]
    )
    log.info("MNIST images unused by AV-Digits: %d written to %s", len(rest), path)
    return path
