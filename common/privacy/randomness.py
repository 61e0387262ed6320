"""Secret, per-record randomness of one training round: Poisson sampling, modality dropout, augmentation, noise.

Every random choice that touches a client's records comes from one secret key per round, drawn from
the operating system (``secrets``), never from a seed the server knows or from torch's global RNG.
Each choice is a function of (key, purpose, step, record index) only: record i's draws at step t are
the i-th values of a stream of their own, so adding a record never changes what happens to the
others (a stream indexed by position in the batch would: one extra sampled record shifts the draws
of every record after it, and the clipped sum of neighbouring datasets then moves by more than C).

Tests that need bit-identical rounds pass a fixed key (``train_round(..., _randomness=...)``); no
configuration can reach that.
"""

from __future__ import annotations

import secrets
from enum import IntEnum

import numpy as np
import torch

from common.data.samples import hide_modalities_per_record


class _Purpose(IntEnum):
    """One independent stream per kind of choice (the spawn key's first element)."""

    POISSON = 1
    MODALITY_DROPOUT = 2
    NOISE = 3
    SHUFFLE = 4  # non-private rounds only
    AUGMENTATION = 5


class RoundRandomness:
    """The random choices of one round, derived from a secret 128-bit key."""

    def __init__(self, key: int | None = None):
        # key=None: a fresh secret key from the OS (the only way training gets one)
        self._key = secrets.randbits(128) if key is None else int(key)

    def _stream(self, purpose: _Purpose, step: int) -> np.random.Generator:
        # SeedSequence spawn keys give statistically independent streams per (purpose, step)
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(self._key, spawn_key=(int(purpose), step))))

    def poisson_batch(self, step: int, *, num_examples: int, sample_rate: float) -> torch.Tensor:
        """Row indices of step ``step``'s batch: each record joins independently with probability ``sample_rate``."""
        u = self._stream(_Purpose.POISSON, step).random(num_examples)  # u[i] is record i's draw
        return torch.from_numpy(np.flatnonzero(u < sample_rate)).to(torch.int64)

    def hide_modalities(self, step: int, idx: torch.Tensor, mask: torch.Tensor, p: float, *, num_examples: int) -> torch.Tensor:
        """Modality dropout for the records ``idx`` (rows of ``mask``) at step ``step``, drawn per record."""
        if p <= 0:
            return mask
        m = mask.shape[1]
        # Draws for every record of the dataset, row i = record i's, so a record's mask never depends on the batch.
        draws = self._stream(_Purpose.MODALITY_DROPOUT, step).random((num_examples, 2 * m))
        rows = torch.from_numpy(draws[idx.numpy()]).to(torch.float32) if len(idx) else torch.empty(0, 2 * m)
        return hide_modalities_per_record(mask, p, rows)

    def augmentation_draws(self, step: int, idx: torch.Tensor, *, copies: int, width: int, num_examples: int) -> torch.Tensor:
        """Uniforms (len(idx), copies, width) for the augmented copies of the records ``idx`` at step ``step``.

        Drawn for every record of the dataset, row i = record i's, so a record's copies never depend on the batch.
        """
        draws = self._stream(_Purpose.AUGMENTATION, step).random((num_examples, copies, width))
        if not len(idx):
            return torch.empty(0, copies, width)
        return torch.from_numpy(draws[idx.numpy()])

    def permutation(self, epoch: int, num_examples: int) -> torch.Tensor:
        """A shuffle of the records for one epoch of non-private training."""
        return torch.from_numpy(self._stream(_Purpose.SHUFFLE, epoch).permutation(num_examples)).to(torch.int64)

    def noise_generator(self) -> torch.Generator:
        """The torch generator the DP noise is drawn from (Opacus's DPOptimizer)."""
        seed = int(self._stream(_Purpose.NOISE, 0).integers(0, 2**63 - 1))
        return torch.Generator().manual_seed(seed)
