"""The embedded synthetic dataset: three modalities that each reveal a different part of the label.

Six classes. Each modality sees only a coarse *view* of the class:

============  ===========================================
modality      classes it tells apart (the rest look alike)
============  ===========================================
``image``     0, 1      (classes 2-5 share one pattern)
``signal``    2, 3      (classes 0, 1, 4, 5 share one pattern)
``tabular``   4, 5      (classes 0-3 share one pattern)
``text``      1, 3      (optional, ``text=True``; the other classes share one pattern)
============  ===========================================

So a single modality reaches about 50 % accuracy, two about 83 %, and all three nearly 100 %:
fusion measurably beats any single modality. Everything is generated in memory from a seed;
nothing is downloaded.

The text modality (token ids, 0 = padding) is opt-in so that the three-modality dataset, and every
figure measured on it, stays as it is: ``generate(..., text=True)`` draws the same image, signal and
tabular samples and adds a sentence per sample, for the built-in text encoders (``fedfuse data synth
--sites a=image+text``).
"""

from __future__ import annotations

import math

import torch

from common.data.samples import MultimodalData
from common.data.schema import DatasetSchema, ModalitySpec

LABELS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")
# Per modality: the view (0, 1 = a distinct pattern, 2 = the shared pattern) of each class.
VIEWS = {
    "image": (0, 1, 2, 2, 2, 2),
    "signal": (2, 2, 0, 1, 2, 2),
    "tabular": (2, 2, 2, 2, 0, 1),
    "text": (2, 0, 2, 1, 2, 2),
}
IMAGE_SIZE = 12
SIGNAL_CHANNELS, SIGNAL_LENGTH = 2, 48
TABULAR_FEATURES = 8
TEXT_LENGTH, TEXT_VOCAB = 16, 48  # token ids: 0 padding, 1-3 one keyword per view, the rest filler words
TEXT_KEYWORDS = 3  # keyword occurrences per sentence, among 5-16 words


def schema(*, text: bool = False) -> DatasetSchema:
    """The synthetic dataset's schema (with ``text``: a fourth modality, a sentence of token ids)."""
    modalities: tuple[ModalitySpec, ...] = (
        ModalitySpec("image", "image", (1, IMAGE_SIZE, IMAGE_SIZE)),
        ModalitySpec("signal", "signal", (SIGNAL_CHANNELS, SIGNAL_LENGTH)),
        ModalitySpec("tabular", "tabular", (TABULAR_FEATURES,)),
    )
    if text:
        modalities += (ModalitySpec("text", "text", (TEXT_LENGTH,), "int64", vocab_size=TEXT_VOCAB),)
    return DatasetSchema(modalities, LABELS)


def _image(view: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    # A bright 4x4 square whose position depends on the view, at a jittered location.
    n, s = len(view), IMAGE_SIZE
    x = noise * torch.randn((n, 1, s, s), generator=g)
    corners = torch.tensor([[1, 1], [1, 7], [7, 4]])  # one per view
    jitter = torch.randint(-1, 2, (n, 2), generator=g)
    pos = corners[view] + jitter
    amp = 0.8 + 0.4 * torch.rand(n, generator=g)
    for i in range(n):
        r, c = int(pos[i, 0]), int(pos[i, 1])
        x[i, 0, r : r + 4, c : c + 4] += amp[i]
    return x


def _signal(view: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    # Sinusoids whose frequency (and phase offset between the two channels) depends on the view.
    n = len(view)
    t = torch.arange(SIGNAL_LENGTH, dtype=torch.float32) / SIGNAL_LENGTH  # (T,)
    freq = torch.tensor([2.0, 5.0, 9.0])[view].unsqueeze(1)  # (N, 1)
    shift = torch.tensor([0.0, math.pi / 2, math.pi])[view].unsqueeze(1)
    phase = 2 * math.pi * torch.rand((n, 1), generator=g)
    amp = 0.8 + 0.4 * torch.rand((n, 1), generator=g)
    ch0 = amp * torch.sin(2 * math.pi * freq * t + phase)
    ch1 = amp * torch.sin(2 * math.pi * freq * t + phase + shift)
    return torch.stack([ch0, ch1], dim=1) + noise * torch.randn((n, SIGNAL_CHANNELS, SIGNAL_LENGTH), generator=g)


def _tabular(view: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    # Three well-separated cluster centres in feature space.
    centres = torch.zeros((3, TABULAR_FEATURES))
    centres[0, :3] = 1.5
    centres[1, 3:6] = 1.5
    centres[2, 6:] = 1.5
    return centres[view] + noise * torch.randn((len(view), TABULAR_FEATURES), generator=g)


def _text(view: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    # A sentence of 5-16 filler words with the view's keyword at TEXT_KEYWORDS random places; with probability
    # ``noise`` / 2 each keyword is replaced by another view's, so the text is as unsure as the other modalities.
    n = len(view)
    lengths = torch.randint(5, TEXT_LENGTH + 1, (n,), generator=g)
    tokens = torch.randint(4, TEXT_VOCAB, (n, TEXT_LENGTH), generator=g)
    keywords = (view + 1).unsqueeze(1).expand(n, TEXT_KEYWORDS).clone()  # (N, K): ids 1-3
    confused = torch.rand((n, TEXT_KEYWORDS), generator=g) < noise / 2
    keywords[confused] = torch.randint(1, 4, (int(confused.sum()),), generator=g)
    places = torch.rand((n, TEXT_LENGTH), generator=g).masked_fill(torch.arange(TEXT_LENGTH) >= lengths[:, None], 2.0)
    tokens.scatter_(1, places.argsort(dim=1)[:, :TEXT_KEYWORDS], keywords)  # K distinct places inside the sentence
    return tokens.masked_fill(torch.arange(TEXT_LENGTH) >= lengths[:, None], 0)  # (N, L) int64, 0 after the sentence


def generate(
    num_samples: int, *, seed: int = 0, noise: float = 0.6, class_probs: torch.Tensor | None = None, text: bool = False
) -> MultimodalData:
    """``num_samples`` samples with every modality present, shuffled.

    Classes are balanced, or drawn from ``class_probs`` (length 6) to simulate label skew. With ``text``, a fourth
    modality (drawn after the others: the image, signal and tabular samples are those of ``text=False``).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    g = torch.Generator().manual_seed(seed)
    if class_probs is None:
        labels = torch.arange(num_samples) % len(LABELS)
        labels = labels[torch.randperm(num_samples, generator=g)]
    else:
        labels = torch.multinomial(class_probs, num_samples, replacement=True, generator=g)
    views = {m: torch.tensor(v)[labels] for m, v in VIEWS.items()}
    inputs = {
        "image": _image(views["image"], g, noise),
        "signal": _signal(views["signal"], g, noise),
        "tabular": _tabular(views["tabular"], g, noise),
    }
    if text:
        inputs["text"] = _text(views["text"], g, noise)
    mask = torch.ones((num_samples, len(inputs)), dtype=torch.bool)
    return MultimodalData(schema(text=text), inputs, mask, labels.to(torch.int64))
