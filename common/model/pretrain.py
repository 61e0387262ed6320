"""Pretraining one modality's encoder on PUBLIC data, without DP (``fedfuse pretrain``).

The encoder (the one ``model.encoder.<modality>`` would build) is trained with a linear classifier on
the site folder's labels; the classifier is dropped and the encoder's weights are written with a JSON
description (:mod:`common.model.warm_start`), for ``model.init.<modality>``. Only for data that is
public: nothing here is private, so nothing is clipped, noised or accounted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.data.samples import MultimodalData
from common.errors import ConfigError
from common.model.encoders import DEFAULT, build_encoder

log = logging.getLogger(__name__)
FORMAT = "fedfuse-encoder-weights/1"


@dataclass(frozen=True)
class PretrainConfig:
    encoder: str = DEFAULT  # as model.encoder.<modality>: the run must name the same encoder
    embed_dim: int = 32  # must equal the run's model.embed-dim
    norm: str = "none"  # must equal the run's model.norm (built-in image/signal encoders)
    width: int = 0  # must equal the run's model.width (built-in image/signal encoders)
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3  # Adam
    seed: int = 0  # initial weights and shuffling (public data: a fixed seed is fine)

    def __post_init__(self) -> None:
        if self.embed_dim < 1 or self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("pretrain: --embed-dim, --epochs and --batch-size must be >= 1 and --lr > 0")
        if self.width < 0:
            raise ConfigError("pretrain: --width must be >= 0 (0 = the encoder's default channels)")


def _inputs(data: MultimodalData, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples that hold ``modality``: (inputs scaled as the model scales them, labels)."""
    spec = data.schema.modalities[data.schema.names.index(modality)]
    present = data.mask[:, data.schema.names.index(modality)]
    x = data.inputs[modality][present]
    if spec.scaling is not None:  # the same fixed (offset, scale) as MultimodalModel.embed
        x = (x - spec.scaling[0]) / spec.scaling[1]
    return x, data.labels[present]


def pretrain_encoder(
    train: MultimodalData, test: MultimodalData | None, modality: str, config: PretrainConfig
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``modality``'s encoder + a linear classifier on ``train``; the encoder and a description of it."""
    if modality not in train.schema.names:
        raise ConfigError(f"pretrain: the site folder has no modality '{modality}' (it has {', '.join(train.schema.names)})")
    spec = train.schema.modalities[train.schema.names.index(modality)]
    x, y = _inputs(train, modality)
    if len(y) == 0:
        raise ConfigError(f"pretrain: no training sample of the site folder holds '{modality}'")
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoder = build_encoder(spec, config.embed_dim, config.encoder, norm=config.norm, width=config.width)
        classifier = nn.Linear(config.embed_dim, train.schema.num_classes)
    model = nn.Sequential(encoder, classifier)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start = time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        order, total = torch.randperm(len(y), generator=generator), 0.0
        for lo in range(0, len(y), config.batch_size):
            idx = order[lo : lo + config.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        log.info("pretrain %s: epoch %d/%d, training loss %.4f", modality, epoch + 1, config.epochs, total / len(y))
    model.eval()
    description: dict[str, Any] = {
        "format": FORMAT,
        "modality": modality,
        "spec": spec.to_dict(),
        **asdict(config),
        "private": False,
        "trained_on": {"site": "", "train_samples": int(len(y)), "labels": list(train.schema.labels)},
        "seconds": round(time.perf_counter() - start, 1),
    }
    if test is not None and modality in test.schema.names:
        tx, ty = _inputs(test, modality)
        if len(ty):
            with torch.no_grad():
                description["test_accuracy"] = round(float((model(tx).argmax(1) == ty).float().mean()), 4)
            description["test_samples"] = int(len(ty))
    return encoder, description
