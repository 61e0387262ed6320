"""Warm start: encoder weights trained on public data (``fedfuse pretrain``), loaded into fresh encoders.

A file holds ONE encoder's weights (its own ``state_dict`` keys, e.g. ``conv1.weight``) in safetensors,
beside a small JSON description (``<file>.json``: the modality's kind and shape, the embedding size, the
encoder choice, what it was trained on). ``model.init.<modality> = "FILE"`` loads it into that modality's
encoder when a client's state is fresh; DP fine-tuning at the sites then starts from it. The weights come
from public data, so they add nothing to a site's privacy spend.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from common.errors import EncoderError
from common.fileio import atomic_save_tensors, atomic_write_json

DESCRIPTION_SUFFIX = ".json"


def description_path(path: str | Path) -> Path:
    """The JSON description beside a weights file (``encoder.safetensors`` -> ``encoder.safetensors.json``)."""
    return Path(str(path) + DESCRIPTION_SUFFIX)


def save_encoder_weights(path: str | Path, encoder: nn.Module, description: Mapping[str, Any]) -> Path:
    """Write ``encoder``'s weights to ``path`` (safetensors) and ``description`` beside it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path, {k: v.detach().contiguous().clone() for k, v in encoder.state_dict().items()})
    atomic_write_json(description_path(path), dict(description))
    return path


def read_encoder_weights(path: str | Path, encoder: nn.Module, modality: str) -> dict[str, torch.Tensor]:
    """The weights in ``path``, checked against ``encoder``: the same keys, the same shapes, floating point and
    finite. EncoderError says what differs and how to fix it."""
    where = f"model.init.{modality} = {str(path)!r}"
    path = Path(path).expanduser()
    if not path.is_file():
        raise EncoderError(f"{where}: no such file (a safetensors file of encoder weights, written by `fedfuse pretrain`)")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise EncoderError(f"{where}: not a readable safetensors file ({exc})") from None
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    hint = (
        "pretrain it for this modality's encoder (the same model.encoder choice, kind, shape, model.embed-dim, "
        "and model.norm / model.width for the built-in image and signal encoders)"
    )
    if missing or unexpected:
        differences = [
            f"{label} {keys[:3]}{'...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise EncoderError(
            f"{where}: its keys do not match the encoder of modality '{modality}' ({', '.join(differences)}); {hint}"
        )
    for key, value in weights.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise EncoderError(
                f"{where}: '{key}' has shape {tuple(value.shape)}, the encoder of modality "
                f"'{modality}' {tuple(own[key].shape)}; {hint}"
            )
        if value.dtype != own[key].dtype:
            raise EncoderError(f"{where}: '{key}' is {value.dtype}, the encoder expects {own[key].dtype}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise EncoderError(f"{where}: '{key}' holds NaN or infinite values")
    return weights


def warm_start(encoders: Mapping[str, nn.Module] | nn.ModuleDict, inits: Mapping[str, str]) -> list[str]:
    """Load each ``inits[modality]`` file into ``encoders[modality]`` (modalities this model lacks are skipped);
    every file is checked before any is loaded. Returns the modalities warm-started."""
    checked = {m: read_encoder_weights(path, encoders[m], m) for m, path in inits.items() if m in encoders}
    for modality, weights in checked.items():
        encoders[modality].load_state_dict(weights)
    return sorted(checked)
